"""Session affinity for the stateful stages: Ray Serve's consistent-hash router plus explicit placement.

Every call to Ingest / Generator / Egress goes through `handle.options(session_id=sid)` and carries a `Route`
keyword argument. `SessionRouter` (a `ConsistentHashRouter`, strict: no fallback replica) picks:

    1. `route.to`, when that replica is alive: the replica the session registry says holds the session. So a
       session's chunks reach the same replica while it lives, even when the ring changes (scale-up adds a
       replica and moves ~1/n of the ring, but not sessions that are already placed);
    2. otherwise the first replica on the ring for the session id that is not in `route.avoid` (draining or
       dead replicas): new sessions, migration targets, and recovery after a replica died.

The registry (services/store.py, Redis when shared) records the replica id each stage reports back, so every
gateway replica routes a session the same way. A replica that gets a call for a session it does not hold
raises `SessionNotFoundError`; the gateway treats that like a dead replica (restore / resume).

Non-goals: load-aware placement (admission control and capacity-based placement are a later step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

logger = logging.getLogger("ray.serve")

ROUTER_PATH = "services.routing.SessionRouter"


@dataclass(frozen=True)
class Route:
    """Placement hint for one call: `to` = replica unique id to use if alive; `avoid` = ids not to pick.
    `trace`: the caller's span as a W3C carrier (services/telemetry.py); the router ignores it."""

    to: str = ""
    avoid: tuple[str, ...] = ()
    trace: tuple[tuple[str, str], ...] = ()


class SessionRouter(ConsistentHashRouter):
    """Registry placement first, then the consistent-hash ring minus the replicas to avoid."""

    def initialize_state(self, **kwargs) -> None:
        kwargs.setdefault("num_fallback_replicas", 0)  # strict affinity: never spill a session elsewhere
        super().initialize_state(**kwargs)

    @staticmethod
    def _route(pending_request) -> Route:
        if pending_request is None:
            return Route()
        route = pending_request.kwargs.get("route")
        # Duck-typed: the router class may arrive pickled by value, with its own copy of `Route`.
        return Route(str(getattr(route, "to", "") or ""), tuple(getattr(route, "avoid", ()) or ()))

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        route = self._route(pending_request)
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        by_uid = {rid.unique_id: r for rid, r in self._replicas.items()}
        if route.to and route.to in by_uid:
            return [[by_uid[route.to]]]
        key = self._routing_key(pending_request)
        if key is None:
            return [candidate_replicas]
        # Walk the whole ring in order for this key and take the first replica not to avoid.
        saved = self._num_fallback_replicas
        self._num_fallback_replicas = len(self._replicas)
        try:
            ranked = self._lookup_ranked_replicas(key)
        finally:
            self._num_fallback_replicas = saved
        for rid in ranked:
            if rid.unique_id not in route.avoid and rid in self._replicas:
                return [[self._replicas[rid]]]
        return []  # every replica is to be avoided: back off until the set changes
