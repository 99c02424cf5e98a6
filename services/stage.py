"""What the three stateful stages (ingest, generator, egress) share: models, per-session parts, snapshots.

A stage replica holds, per session, a `SessionState` with only its own part filled (`StreamingEditor.open_part`):
the VAE encoder cache in Ingest, the DiT cache + prompt embeddings in Generator, the VAE decoder context in
Egress. It can hand a session over (`export`: SessionSnapshot bytes; dropped for migration, kept for the
gateway's checkpoint cuts) and take one in (`adopt`, replacing whatever the replica held for that session),
which is how migration and crash resume move sessions. Every call records which session it served,
so tests (and operators) can check affinity. Model compute runs on one worker thread per replica, off the
event loop, so health checks and routing stay responsive while a chunk runs.

Non-goals: routing (routing.py picks the replica), durability (the gateway stores what `export` returns).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.pipeline import Engine, StreamingEditor, preset_for_mode
from engine.session import SessionSettings, SessionState
from services import telemetry
from services.wire import unwrap_snapshot, wrap_snapshot

if TYPE_CHECKING:
    from services.routing import Route


class SessionNotFoundError(LookupError):
    """A stage replica got a call for a session it does not hold (it died and came back, or never had it)."""


class BadInputError(ValueError):
    """The client sent something a stage cannot use (corrupt video, wrong frame size): INVALID_ARGUMENT."""


@dataclass(frozen=True)
class EngineSpec:
    """How each replica builds its models (picklable; the same for every stage of an application)."""

    preset: str = "tiny"
    mode: str = "long_streaming"
    device: str | None = None
    """None: cuda when available, else cpu."""
    dtype: str | None = None
    """None: the preset's on cuda, float32 on cpu (like Engine.load)."""
    dit_weights: str | None = None
    vae_weights: str | None = None
    text_weights: str | None = None
    seed: int = 0
    random_text: bool = False
    """Random prompt embeddings of the right shape instead of the text model (benchmarks at real shapes)."""
    random_weights: bool = False
    """Randomly initialised DiT and VAE and random prompt embeddings: full-size benchmarks without downloads."""
    torch_threads: int = 0
    """torch intra-op threads per replica (0: leave Ray's default)."""


def build_engine(spec: EngineSpec, parts: tuple[str, ...]) -> Engine:
    """An Engine holding only `parts` ("dit", "vae", "text"), built exactly as `Engine.load` builds them."""
    from engine.model.hybrid_dit import SanaStreamingDiT
    from engine.text import TextEncoder
    from engine.vae import VideoVAE
    from engine.weights import load_model

    cfg = preset_for_mode(spec.preset, spec.mode)
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec.dtype:
        dtype = getattr(torch, spec.dtype)
    else:
        dtype = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
    dit = vae = text = None
    if "dit" in parts:
        uri = None if spec.random_weights else (spec.dit_weights or cfg.dit_weights)
        if uri:
            dit = load_model(lambda: SanaStreamingDiT(cfg.dit), uri, device=device, dtype=dtype)
        else:
            dit = SanaStreamingDiT(cfg.dit).init_weights(seed=spec.seed).to(device=device, dtype=dtype)
        dit = dit.eval()
    if "vae" in parts:
        vae_uri = None if spec.random_weights else (spec.vae_weights or cfg.vae_weights)
        vae = VideoVAE(cfg.vae, vae_uri, device=device, dtype=dtype, seed=spec.seed)
    if "text" in parts:
        if spec.random_text or spec.random_weights:
            from engine.bench import RandomTextEncoder

            text = RandomTextEncoder(cfg.text.hidden_size, cfg.text.text_len, device, torch.float32)
        else:
            text = TextEncoder(cfg.text, spec.text_weights or cfg.text_weights, device=device, dtype=dtype)
    return Engine(cfg, dit, vae, text, device, dtype)  # type: ignore[arg-type]


def to_array(t: torch.Tensor | None) -> np.ndarray | torch.Tensor | None:
    """A tensor for a hop through Ray's object store: numpy (zero-copy reads) unless numpy lacks the dtype."""
    if t is None:
        return None
    t = t.detach().to("cpu")
    return t if t.dtype == torch.bfloat16 else t.numpy()


def from_array(a: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return None
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))  # a copy: object store is RO


def traced(fn):
    """A span `{stage}.{method}` around a stage method, child of the caller's span (`route.trace`), with the
    session id (the first argument, or its `.session_id`)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args, route: Route | None = None, **kw):
        first = args[0] if args else None
        sid = first if isinstance(first, str) else getattr(first, "session_id", None)
        with telemetry.span(f"{self.stage}.{name}", getattr(route, "trace", None), session_id=sid,
                            sana_stage=self.stage, replica_id=self.replica_id):  # fmt: skip
            return await fn(self, *args, route=route, **kw)

    return wrapper


@dataclass
class Reply:
    """What every stage call returns: who served it, how long the work took inside the replica, the value."""

    replica_id: str
    ms: float
    value: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class StatefulStage:
    """Base of Ingest, Generator and Egress deployments (one replica = one instance)."""

    stage = ""
    part = ""
    model_parts: tuple[str, ...] = ()

    def __init__(self, spec: EngineSpec) -> None:
        from ray import serve

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        telemetry.setup(self.stage)
        self.spec = spec
        self.engine = build_engine(spec, self.model_parts)
        self.editor = StreamingEditor(self.engine)
        self.sessions: dict[str, SessionState] = {}
        self.served: collections.Counter[str] = collections.Counter()
        """session -> calls served by this replica (the affinity record)."""
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage}-compute")

    # --- helpers ----------------------------------------------------------------------------------------------

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _state(self, session_id: str) -> SessionState:
        state = self.sessions.get(session_id)
        if state is None:
            raise SessionNotFoundError(f"session {session_id} is not held by {self.stage} replica {self.replica_id}")
        self.served[session_id] += 1
        return state

    def _reply(self, t0: float, value: Any = None, **extra) -> Reply:
        return Reply(self.replica_id, (time.perf_counter() - t0) * 1e3, value, extra)

    def _open_state(self, session_id: str, settings: dict, **kw) -> SessionState:
        state = self.editor.open_part(SessionSettings(**settings), self.part, **kw)
        self.sessions[session_id] = state
        self.served[session_id] += 1
        return state

    def _extra_snapshot(self, session_id: str) -> dict:
        """Stage-specific small state to carry in SessionSnapshot.extra (JSON)."""
        return {}

    def _codec_state(self, session_id: str) -> bytes:
        """Bytes that rebuild the session's codec on adopt (SessionSnapshot.codec_state); b"": none."""
        return b""

    def _adopt_extra(self, session_id: str, extra: dict, codec_state: bytes = b"") -> None:
        pass

    def _forget(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    # --- session hand-over ------------------------------------------------------------------------------------

    @traced
    async def export(self, session_id: str, drop: bool = True, route: Route | None = None) -> Reply:
        """SessionSnapshot bytes of this stage's part; with drop=True the replica forgets the session."""
        t0 = time.perf_counter()
        state = self._state(session_id)
        blob = await self._compute(wrap_snapshot, state, session_id, self.stage, self._extra_snapshot(session_id),
                                   self._codec_state(session_id))  # fmt: skip
        if drop:
            self._forget(session_id)
        return self._reply(t0, blob, bytes=len(blob))

    @traced
    async def adopt(self, blob: bytes, route: Route | None = None) -> Reply:
        """Take a session over from a SessionSnapshot (migration, resume); returns this replica's id. A session
        the replica already holds is replaced (crash resume rolls the surviving stages back to the same cut)."""
        import json

        t0 = time.perf_counter()
        msg = unwrap_snapshot(blob, self.stage)
        state = await self._compute(self.editor.restore, msg.engine_state)
        self._forget(msg.session_id)
        self.sessions[msg.session_id] = state
        self._adopt_extra(msg.session_id, json.loads(msg.extra or b"{}"), bytes(msg.codec_state))
        self.served[msg.session_id] += 1
        return self._reply(t0, msg.session_id)

    async def close(self, session_id: str, route: Route | None = None) -> Reply:
        t0 = time.perf_counter()
        held = session_id in self.sessions
        self._forget(session_id)
        return self._reply(t0, held)

    async def info(self, route: Route | None = None) -> dict:
        return {
            "stage": self.stage,
            "replica_id": self.replica_id,
            "sessions": sorted(self.sessions),
            "served": dict(self.served),
            "state_bytes": {k: v.nbytes()["total"] for k, v in self.sessions.items()},
        }

    async def spans(self, clear: bool = False, route: Route | None = None) -> list[dict]:
        """Finished spans of this replica (OTEL_TRACES_EXPORTER=memory; tests)."""
        return telemetry.finished_spans(clear)

    async def check_health(self) -> None:  # Ray Serve health check: the compute thread must be alive
        pass


class CodecStage(StatefulStage):
    """Ingest and Egress: stages whose sessions may carry H.264 instead of raw frames, with a per-session codec
    (decoder in, encoder out) created on first use. The H.264 flag migrates; a codec cannot be serialised, so the
    Ingest carries resync bytes instead (`_codec_state`) and the Egress starts a new encoder."""

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        self.codecs: dict[str, Any] = {}
        self.h264: set[str] = set()

    @traced
    async def open(self, session_id: str, settings: dict, h264: bool, route: Route | None = None):
        t0 = time.perf_counter()
        self._open_state(session_id, settings)
        if h264:
            self.h264.add(session_id)
        return self._reply(t0, self.replica_id)

    def _extra_snapshot(self, session_id: str) -> dict:
        return {"h264": session_id in self.h264}

    def _adopt_extra(self, session_id: str, extra: dict, codec_state: bytes = b"") -> None:
        if extra.get("h264"):
            self.h264.add(session_id)

    def _forget(self, session_id: str) -> None:
        super()._forget(session_id)
        self.codecs.pop(session_id, None)
        self.h264.discard(session_id)
