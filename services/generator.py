"""Generator deployment: the streaming DiT. Owns the DiT part of each session's state (and of its checkpoints).

Per session: the DiT cache (GDN states, softmax K/V window, FFN context), the prompt embeddings in use, the
source latents waiting for a full chunk and the cursor (`StreamingEditor.open_part(..., "generator")`).

Batching: calls enter through `generate`, which queues them on `_batch` (`serve.batch`, no added wait): every
call that arrives while a batch runs joins the next one (one call per session: a session's chunks are
sequential), and the batch runs as one `StreamingEditor.generate_batch`, where compatible chunks of different
sessions share their DiT forwards (`engine.step.ChunkRunner`).

Checkpoints: the gateway takes them, as one cut across the stateful stages (`export(drop=False)` here, in
Ingest and in Egress after the same request; services/recovery.py says what a cut holds and when it is taken).
This replica's part of a cut is the whole DiT part of the SessionState: GDN states, softmax K/V window, FFN
temporal context, prompt embeddings, source latents waiting for a full chunk, cursor.
Non-goals: admission control by capacity (later), CUDA graphs (engine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ray import serve

from services.routing import ROUTER_PATH, Route
from services.stage import EngineSpec, Reply, StatefulStage, from_array, to_array, traced


@dataclass
class GenerateCall:
    session_id: str
    latents: object = None
    """Source latents (1, C, t, h, w) as an array, or None (flush)."""
    final: bool = False
    prompt: str | None = None
    """A new instruction (with its `text` conditioning), effective from the next chunk."""
    text: dict | None = None


def _chunk_sizes(start: int, produced: int, state) -> list[int]:
    """The chunk sizes that produced `produced` latent frames after `start` (from the cache's chunk record)."""
    sizes, total = [], 0
    for t in reversed(state.dit.chunk_frames):
        if total >= produced:
            break
        sizes.append(t)
        total += t
    return sizes


@serve.deployment(
    request_router_config={"request_router_class": ROUTER_PATH},
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=16,
)
class Generator(StatefulStage):
    stage = "generator"
    part = "generator"
    model_parts = ("dit",)

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        self.batch_sizes: list[int] = []

    @traced
    async def open(self, session_id: str, settings: dict, text: dict, route: Route | None = None) -> Reply:
        t0 = time.perf_counter()
        self._open_state(session_id, settings, text={k: from_array(v) for k, v in text.items()})
        return self._reply(t0, self.replica_id)

    @traced
    async def generate(self, call: GenerateCall, route: Route | None = None) -> Reply:
        """Source latents in -> Reply(value=edited latents of the chunks they completed, or None)."""
        self._state(call.session_id)  # fail fast (and record affinity) before queueing
        return await self._batch(call)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _batch(self, calls: list[GenerateCall]) -> list[Reply]:
        self.batch_sizes.append(len(calls))
        return await self._compute(self._run_batch, calls)

    def _run_batch(self, calls: list[GenerateCall]) -> list[Reply]:
        """One `generate_batch` over the sessions of the batch: their full chunks share forwards."""
        t0 = time.perf_counter()
        states = [self.sessions[c.session_id] for c in calls]
        before = []
        for call, state in zip(calls, states):
            if call.prompt is not None:
                self.editor.set_prompt_text(state, call.prompt, {k: from_array(v) for k, v in call.text.items()})
            before.append(state.cursor.latents_generated)
        outs = self.editor.generate_batch([(st, from_array(c.latents), c.final) for c, st in zip(calls, states)])
        ms = (time.perf_counter() - t0) * 1e3
        replies = []
        for state, edited, n0 in zip(states, outs, before):
            extra: dict = {
                "latents_generated": state.cursor.latents_generated,
                "batch": len(calls),
                "chunks": 0 if edited is None else len(_chunk_sizes(n0, edited.shape[2], state)),
            }
            replies.append(Reply(self.replica_id, ms, to_array(edited), extra))
        return replies

    async def info(self, route: Route | None = None) -> dict:
        out = await super().info(route)
        out["batch_sizes"] = list(self.batch_sizes[-100:])
        return out
