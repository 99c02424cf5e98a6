"""Session registry, checkpoints and replay logs: Redis when a URL is given, else an in-process store.

Both stores implement `SessionStore` (async, the gateway's event loop) with the same semantics; the tests run
every behaviour against both. What lives here:

    session records   session -> tenant, status, replicas per stage, next sequence number, frames in/out,
                      created / last-seen (from an injectable clock), the resume token's hash
    checkpoints       the last Generator SessionSnapshot of a session (+ the latent frames it covers)
    replay log        source-latent LatentChunk messages sent to the Generator since that checkpoint
    draining          replica ids per stage that take no new sessions and are being emptied

Redis layout (prefix `sana:`): hash `session:{id}`, set `sessions`, hash `ckpt:{id}` (blob, latents), list
`replay:{id}`, set `draining:{stage}`.

Non-goals: the job queue (a later issue), tenants' keys and quotas (records only carry the tenant name).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Clock = Callable[[], float]

STATUSES = ("attached", "detached", "finished", "failed")
"""attached: a StreamEdit call drives it; detached: the client is gone, resumable until reaped."""


@dataclass
class SessionRecord:
    session_id: str
    tenant: str
    token_hash: str
    status: str = "attached"
    created: float = 0.0
    last_seen: float = 0.0
    next_seq: int = 0
    replicas: dict[str, str] = field(default_factory=dict)
    """stage -> replica unique id holding the session's part."""
    frames_in: int = 0
    frames_out: int = 0
    latents_forwarded: int = 0
    """Edited latent frames the Generator produced that went on to Egress (replay skips these)."""
    prompt: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    output_format: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionRecord:
        return cls(**json.loads(text))


class SessionStore(Protocol):
    clock: Clock

    async def create(self, rec: SessionRecord) -> None: ...
    async def get(self, session_id: str) -> SessionRecord | None: ...
    async def put(self, rec: SessionRecord) -> None: ...
    async def delete(self, session_id: str) -> None: ...
    async def list(self) -> list[SessionRecord]: ...
    async def idle(self, timeout_s: float) -> list[SessionRecord]: ...
    async def put_checkpoint(self, session_id: str, blob: bytes, latents: int) -> None: ...
    async def get_checkpoint(self, session_id: str) -> tuple[bytes, int] | None: ...
    async def append_replay(self, session_id: str, blob: bytes) -> None: ...
    async def get_replay(self, session_id: str) -> list[bytes]: ...
    async def set_draining(self, stage: str, replica_id: str, on: bool = True) -> None: ...
    async def draining(self, stage: str) -> set[str]: ...
    async def close(self) -> None: ...


def _is_idle(rec: SessionRecord, now: float, timeout_s: float) -> bool:
    """Not seen for `timeout_s`, whatever its status (a gateway skips the sessions its own streams drive: an
    attached session whose gateway died is reaped like a detached one)."""
    return now - rec.last_seen > timeout_s


class MemoryStore:
    """In-process store (one gateway replica): plain dicts, same behaviour as RedisStore."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._sessions: dict[str, str] = {}
        self._ckpt: dict[str, tuple[bytes, int]] = {}
        self._replay: dict[str, list[bytes]] = {}
        self._draining: dict[str, set[str]] = {}

    async def create(self, rec: SessionRecord) -> None:
        if rec.session_id in self._sessions:
            raise KeyError(f"session {rec.session_id} exists")
        rec.created = rec.last_seen = self.clock()
        self._sessions[rec.session_id] = rec.to_json()

    async def get(self, session_id: str) -> SessionRecord | None:
        text = self._sessions.get(session_id)
        return None if text is None else SessionRecord.from_json(text)

    async def put(self, rec: SessionRecord) -> None:
        rec.last_seen = self.clock()
        self._sessions[rec.session_id] = rec.to_json()

    async def delete(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._ckpt.pop(session_id, None)
        self._replay.pop(session_id, None)

    async def list(self) -> list[SessionRecord]:
        return [SessionRecord.from_json(t) for t in list(self._sessions.values())]

    async def idle(self, timeout_s: float) -> list[SessionRecord]:
        now = self.clock()
        return [r for r in await self.list() if _is_idle(r, now, timeout_s)]

    async def put_checkpoint(self, session_id: str, blob: bytes, latents: int) -> None:
        self._ckpt[session_id] = (blob, latents)
        self._replay[session_id] = []

    async def get_checkpoint(self, session_id: str) -> tuple[bytes, int] | None:
        return self._ckpt.get(session_id)

    async def append_replay(self, session_id: str, blob: bytes) -> None:
        self._replay.setdefault(session_id, []).append(blob)

    async def get_replay(self, session_id: str) -> list[bytes]:
        return list(self._replay.get(session_id, []))

    async def set_draining(self, stage: str, replica_id: str, on: bool = True) -> None:
        s = self._draining.setdefault(stage, set())
        (s.add if on else s.discard)(replica_id)

    async def draining(self, stage: str) -> set[str]:
        return set(self._draining.get(stage, set()))

    async def close(self) -> None:
        pass


class RedisStore:
    """The same store in Redis (redis-py asyncio), shared by every gateway replica."""

    def __init__(self, url: str, clock: Clock = time.time, prefix: str = "sana:") -> None:
        import redis.asyncio as aioredis

        self.clock = clock
        self.url = url
        self.p = prefix
        self.r = aioredis.from_url(url)

    async def create(self, rec: SessionRecord) -> None:
        rec.created = rec.last_seen = self.clock()
        ok = await self.r.set(f"{self.p}session:{rec.session_id}", rec.to_json(), nx=True)
        if not ok:
            raise KeyError(f"session {rec.session_id} exists")
        await self.r.sadd(f"{self.p}sessions", rec.session_id)

    async def get(self, session_id: str) -> SessionRecord | None:
        text = await self.r.get(f"{self.p}session:{session_id}")
        return None if text is None else SessionRecord.from_json(text)

    async def put(self, rec: SessionRecord) -> None:
        rec.last_seen = self.clock()
        await self.r.set(f"{self.p}session:{rec.session_id}", rec.to_json())

    async def delete(self, session_id: str) -> None:
        keys = [f"{self.p}{k}:{session_id}" for k in ("session", "ckpt", "replay")]
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(*keys)
            pipe.srem(f"{self.p}sessions", session_id)
            await pipe.execute()

    async def list(self) -> list[SessionRecord]:
        ids = sorted(x.decode() for x in await self.r.smembers(f"{self.p}sessions"))
        if not ids:
            return []
        texts = await self.r.mget([f"{self.p}session:{i}" for i in ids])
        return [SessionRecord.from_json(t) for t in texts if t is not None]

    async def idle(self, timeout_s: float) -> list[SessionRecord]:
        now = self.clock()
        return [r for r in await self.list() if _is_idle(r, now, timeout_s)]

    async def put_checkpoint(self, session_id: str, blob: bytes, latents: int) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(f"{self.p}ckpt:{session_id}", mapping={"blob": blob, "latents": latents})
            pipe.delete(f"{self.p}replay:{session_id}")
            await pipe.execute()

    async def get_checkpoint(self, session_id: str) -> tuple[bytes, int] | None:
        got = await self.r.hgetall(f"{self.p}ckpt:{session_id}")
        if not got:
            return None
        return got[b"blob"], int(got[b"latents"])

    async def append_replay(self, session_id: str, blob: bytes) -> None:
        await self.r.rpush(f"{self.p}replay:{session_id}", blob)

    async def get_replay(self, session_id: str) -> list[bytes]:
        return list(await self.r.lrange(f"{self.p}replay:{session_id}", 0, -1))

    async def set_draining(self, stage: str, replica_id: str, on: bool = True) -> None:
        key = f"{self.p}draining:{stage}"
        await (self.r.sadd(key, replica_id) if on else self.r.srem(key, replica_id))

    async def draining(self, stage: str) -> set[str]:
        return {x.decode() for x in await self.r.smembers(f"{self.p}draining:{stage}")}

    async def close(self) -> None:
        await self.r.aclose()


def make_store(redis_url: str | None, clock: Clock = time.time) -> SessionStore:
    return RedisStore(redis_url, clock) if redis_url else MemoryStore(clock)
