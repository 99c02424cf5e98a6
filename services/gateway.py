"""Gateway deployment: the gRPC ingress (a grpc.aio server inside the replica), validation, session registry,
routing by session id, migration and crash recovery.

Why a gRPC server in a deployment and not Ray Serve's gRPC proxy: Ray Serve 2.60's proxy does carry
bidirectional streams, but every incoming message is pulled by the replica from the proxy actor with one more
actor call, and every response goes back through the proxy's streaming generator: two extra Ray hops per chunk.
Measured on this project's 2-core CPU machine (loadtest/results/ingress_overhead_cpu.json, echo of one message,
p50): 4.6 KB (a tiny latent chunk) 6.7 ms through the proxy vs 0.5 ms direct; 1.8 MB (24 raw tiny frames) 33 vs
14 ms; 65 MB (24 raw 1280x704 frames) 1.68 s vs 1.23 s. The proxy costs ~6 ms per message plus a copy.
Several gateway replicas can share one port (gRPC sets SO_REUSEPORT; the kernel spreads connections); without
Redis the registry is in-process, so run one.

Per StreamEdit call: the first request opens (or resumes) a session; each frames request is checked (sequence
number, frame size), then goes Ingest -> Generator -> Egress through the session's replicas (services/routing.py)
and is answered by one FramesOut. Crash resume (services/recovery.py): at open and every `checkpoint.every`
chunks the gateway stores one consistent cut of the checkpointed stages' snapshots, and logs every request
since; when a replica of any checkpointed stage dies (or no longer holds the session) it restores all of them
from the cut (another replica for the lost one), replays the log with outputs dropped and runs the interrupted
request again, so the client's stream continues with monotonic sequence numbers and identical output. Sessions
on a draining replica move (export -> adopt) at their next chunk boundary, or at once when no stream drives them.

Mode bidirectional_short: the gateway buffers the clip (at most the bidirectional preset's num_frames), answers
each frames request with an empty FramesOut, and when the clip is complete (`total_frames` reached, or `end`)
sends it to the BidirectionalEditor deployment (services/bidirectional.py) and streams the edited frames back in
FramesOut messages under the message size limit. These sessions cannot be resumed (the clip lives in the call).

Tracing (services/telemetry.py): a span per call, per request and per stage call, the client's traceparent
metadata as the root's parent, the context carried into every replica.

Non-goals: tenants' keys and quotas (a tenant is a hash of the bearer key, used to scope sessions), admission
control, batch jobs, metrics export.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np
from ray import serve

from engine.pipeline import preset_for_mode
from engine.session import SessionSettings, SnapshotError
from engine.text import PromptTooLongError
from services import telemetry
from services.generator import GenerateCall
from services.recovery import CheckpointPolicy
from services.routing import Route
from services.stage import BadInputError, Reply, SessionNotFoundError, to_array
from services.store import SessionRecord, make_store
from services.wire import (
    STAGES,
    WireError,
    bidirectional_settings_from_open,
    latents_from_proto,
    latents_to_proto,
    pb,
    pb_grpc,
    rgb24_to_frames,
    settings_from_open,
)

log = logging.getLogger("ray.serve")

RAW, H264 = pb.FRAME_FORMAT_RGB24, pb.FRAME_FORMAT_H264_ANNEXB


@dataclass(frozen=True)
class GatewayConfig:
    preset: str = "tiny"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 9000
    redis_url: str | None = None
    max_message_bytes: int = 64 << 20
    """Largest request message accepted (RESOURCE_EXHAUSTED above it)."""
    idle_timeout_s: float = 300.0
    reap_interval_s: float = 5.0
    max_frames_per_request: int = 240
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    """Crash-resume cuts: cadence in chunks and the stages they hold (services/recovery.py)."""
    bidirectional_max_frames: int = 0
    """Longest bidirectional_short clip accepted (0: the bidirectional preset's num_frames, its clip length)."""


class _Lost(Exception):
    """A stage call failed because its replica is gone (killed, crashed) or no longer holds the session."""

    def __init__(self, stage: str, replica: str) -> None:
        super().__init__(f"{stage} replica {replica or '?'} lost")
        self.stage, self.replica = stage, replica


class StatusError(Exception):
    """Ends the call with a gRPC status; `keep` = the session's state is intact (resumable)."""

    def __init__(self, code: grpc.StatusCode, message: str, keep: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.keep = code, message, keep


def _cause(e: BaseException, cls: type) -> bool:
    """Is `e` (or the user exception a Ray error wraps) an instance of `cls`?"""
    return isinstance(e, cls) or isinstance(getattr(e, "cause", None), cls)


def _lost(e: BaseException) -> bool:
    """The replica is gone (killed, crashed, unreachable) or no longer holds the session."""
    import ray.exceptions as rex

    return _cause(e, SessionNotFoundError) or isinstance(
        e, rex.RayActorError | rex.ActorUnavailableError | rex.ActorDiedError
    )


def _user_error(e: BaseException) -> StatusError | None:
    for cls in (BadInputError, PromptTooLongError, WireError):
        if _cause(e, cls):
            cause = getattr(e, "cause", None)
            inner = cause if isinstance(cause, cls) else e  # Ray wraps a replica's exception; its text is noisy
            return StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(inner).splitlines()[0])
    return None


def _tenant(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.startswith("Bearer "):
            return "key-" + hashlib.sha256(value[7:].encode()).hexdigest()[:16]
    return "anonymous"


@dataclass
class Clip:
    """A bidirectional_short session's frames, buffered until the clip is complete."""

    limit: int
    text: dict
    frames: list = field(default_factory=list)
    count: int = 0
    done: bool = False


@dataclass
class Live:
    """A session driven by a StreamEdit call of this gateway replica."""

    rec: SessionRecord
    settings: SessionSettings
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    handles: dict = field(default_factory=dict)
    recomputed: int = 0
    chunks: int = 0
    clip: Clip | None = None
    """Set for bidirectional_short sessions."""


@dataclass
class Step:
    """One request's work, as the input of one stage: the client's payload (Ingest), source latents (Generator)
    or edited latents (Egress); what the replay log stores for the first checkpointed stage."""

    seq: int
    value: object = None
    prompt: str | None = None
    text: dict | None = None
    final: bool = False


class Gateway:
    """One replica: the gRPC server plus the session logic; handles to the stages come in the constructor."""

    async def __init__(self, ingest, text, generator, egress, config: GatewayConfig, bidirectional=None) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        telemetry.setup("gateway")
        self.cfg = config
        self.stages = {"ingest": ingest, "generator": generator, "egress": egress}
        self.text = text
        self.store = make_store(config.redis_url)
        self.preset = preset_for_mode(config.preset, "long_streaming")
        self.bidi = bidirectional
        self.bidi_preset = preset_for_mode(config.preset, "bidirectional_short")
        self.bidi_limit = config.bidirectional_max_frames or int(self.bidi_preset.num_frames)
        self.policy = config.checkpoint
        self.live: dict[str, Live] = {}
        self.chunk_stats: list[dict] = []
        opts = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", max(config.max_message_bytes, 256 << 20)),
            ("grpc.so_reuseport", 1),
        ]
        self.server = grpc.aio.server(options=opts)
        pb_grpc.add_EditServiceServicer_to_server(_EditServicer(self), self.server)
        pb_grpc.add_AdminServiceServicer_to_server(_AdminServicer(self), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("EditService", "AdminService")]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{config.grpc_host}:{config.grpc_port}")
        if self.port == 0:
            raise RuntimeError(f"gateway cannot listen on {config.grpc_host}:{config.grpc_port}")
        await self.server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())
        log.info("sana-stream gateway %s listening on %s:%d", self.replica_id, config.grpc_host, self.port)

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.stop(grace=1.0)

    # --- handle-facing API (tests, CLI) -----------------------------------------------------------------------

    async def address(self) -> str:
        return f"{self.cfg.grpc_host}:{self.port}"

    async def stats(self) -> dict:
        return {"replica_id": self.replica_id, "live": sorted(self.live), "chunks": list(self.chunk_stats[-1000:])}

    async def reap_now(self) -> list[str]:
        return await self._reap_once()

    async def spans(self, clear: bool = False) -> list[dict]:
        """Finished spans of this replica (OTEL_TRACES_EXPORTER=memory; tests)."""
        return telemetry.finished_spans(clear)

    # --- stage calls --------------------------------------------------------------------------------------------

    def _handle(self, sess: Live, stage: str):
        h = sess.handles.get(stage)
        if h is None:
            h = sess.handles[stage] = self.stages[stage].options(session_id=sess.rec.session_id)
        return h

    async def _route(self, sess: Live, stage: str, avoid: tuple[str, ...] = ()) -> Route:
        draining = tuple(sorted(await self.store.draining(stage)))
        return Route(to=sess.rec.replicas.get(stage, ""), avoid=draining + avoid)

    async def _call(self, sess: Live, stage: str, method: str, *args, route: Route | None = None) -> Reply:
        route = dataclasses.replace(route or await self._route(sess, stage), trace=telemetry.inject())
        reply = await getattr(self._handle(sess, stage), method).remote(*args, route=route)
        if method in ("open", "adopt"):
            sess.rec.replicas[stage] = reply.replica_id
        return reply

    # --- open / resume ------------------------------------------------------------------------------------------

    async def _encode_prompt(self, prompt: str, settings: SessionSettings, session_id: str | None = None) -> Reply:
        try:
            return await self.text.encode.remote(prompt, settings.negative_prompt, settings.cfg_scale,
                                                 trace=telemetry.inject(), session_id=session_id)  # fmt: skip
        except Exception as e:
            if (err := _user_error(e)) is not None:
                raise StatusError(err.code, err.message, keep=True) from None
            raise

    def _check_geometry(self, settings: SessionSettings) -> None:
        sc = self.preset.vae.spatial_compression
        if settings.height % sc or settings.width % sc or settings.height <= 0 or settings.width <= 0:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"height and width must be positive multiples of {sc}; got {settings.width}x{settings.height}",
            )
        if not settings.prompt.strip():
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "the session needs a non-empty prompt")

    async def open(self, msg: pb.SessionOpen, tenant: str) -> tuple[Live, bool, str]:
        if msg.session_id or msg.resume_token:
            return await self._resume(msg, tenant)
        if msg.mode == pb.EDIT_MODE_BIDIRECTIONAL_SHORT:
            return await self._open_bidirectional(msg, tenant)
        if msg.mode not in (pb.EDIT_MODE_UNSPECIFIED, pb.EDIT_MODE_LONG_STREAMING):
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown mode {msg.mode}")
        if msg.input_format not in (pb.FRAME_FORMAT_UNSPECIFIED, RAW, H264):
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown input_format {msg.input_format}")
        try:
            settings = settings_from_open(msg, self.preset)
        except (ValueError, TypeError) as e:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"bad session settings: {e}") from None
        self._check_geometry(settings)
        text = await self._encode_prompt(settings.prompt, settings)
        in_fmt = msg.input_format or RAW
        out_fmt = msg.output_format or in_fmt
        rec, token = self._new_record(tenant, settings, in_fmt, out_fmt, "long_streaming")
        await self.store.create(rec)
        sess = Live(rec, settings)
        s = dataclasses.asdict(settings)
        await asyncio.gather(
            self._call(sess, "ingest", "open", rec.session_id, s, in_fmt == H264),
            self._call(sess, "generator", "open", rec.session_id, s, text.value),
            self._call(sess, "egress", "open", rec.session_id, s, out_fmt == H264),
        )
        if self.policy.on:  # the first cut: a session can resume before its first chunk
            await self._cut(sess, -1, pb.ChunkTimings())
        await self.store.put(rec)
        return sess, False, token

    def _new_record(self, tenant: str, settings: SessionSettings, in_fmt: int, out_fmt: int, mode: str):
        token = secrets.token_urlsafe(24)
        rec = SessionRecord(
            session_id=uuid.uuid4().hex,
            tenant=tenant,
            token_hash=hashlib.sha256(token.encode()).hexdigest(),
            prompt=settings.prompt,
            settings={**dataclasses.asdict(settings), "input_format": in_fmt, "mode": mode},
            output_format=out_fmt,
        )
        return rec, token

    async def _open_bidirectional(self, msg: pb.SessionOpen, tenant: str) -> tuple[Live, bool, str]:
        if self.bidi is None:
            raise StatusError(
                grpc.StatusCode.UNIMPLEMENTED,
                "mode bidirectional_short is not deployed in this application (started with replicas bidirectional=0)",
            )
        if msg.input_format not in (pb.FRAME_FORMAT_UNSPECIFIED, RAW) or msg.output_format not in (
            pb.FRAME_FORMAT_UNSPECIFIED,
            RAW,
        ):
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "mode bidirectional_short takes and returns RGB24 frames (input_format / output_format); H.264 is "
                "served for long_streaming",
            )
        try:
            settings = bidirectional_settings_from_open(msg, self.bidi_preset)
        except (ValueError, TypeError) as e:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"bad session settings: {e}") from None
        self._check_geometry(settings)
        if settings.total_frames is not None and settings.total_frames > self.bidi_limit:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"total_frames={settings.total_frames}: mode bidirectional_short edits clips of at most "
                f"{self.bidi_limit} frames (the {self.bidi_preset.name} bidirectional model's clip length)",
            )
        text = await self._encode_prompt(settings.prompt, settings)
        rec, token = self._new_record(tenant, settings, RAW, RAW, "bidirectional_short")
        await self.store.create(rec)
        return Live(rec, settings, clip=Clip(self.bidi_limit, text.value)), False, token

    async def _resume(self, msg: pb.SessionOpen, tenant: str) -> tuple[Live, bool, str]:
        rec = await self.store.get(msg.session_id)
        unknown = StatusError(grpc.StatusCode.NOT_FOUND, f"unknown session id or resume token ({msg.session_id!r})")
        if rec is None or rec.tenant != tenant:
            raise unknown
        if not secrets.compare_digest(rec.token_hash, hashlib.sha256(msg.resume_token.encode()).hexdigest()):
            raise unknown
        if rec.status in ("finished", "failed"):
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, f"session {rec.session_id} is {rec.status}")
        if rec.settings.get("mode") == "bidirectional_short":
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {rec.session_id} is a bidirectional_short session: its clip was buffered in the call that "
                "ended, so it cannot be resumed; open a new session",
            )
        if rec.session_id in self.live:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION, f"session {rec.session_id} is attached to another StreamEdit call"
            )
        return Live(rec, _settings(rec)), True, msg.resume_token

    # --- one frames request -------------------------------------------------------------------------------------

    def check_frames(self, sess: Live, req: pb.FramesIn):
        """Sequence and size checks before any stage sees the request (the session stays intact on failure)."""
        expected = sess.rec.next_seq
        if req.seq != expected:
            what = "a gap" if req.seq > expected else ("a repeat" if req.seq == expected - 1 else "out of order")
            raise StatusError(
                grpc.StatusCode.ABORTED,
                f"frames request seq {req.seq} is {what}: expected seq {expected} (resume with the session id "
                f"and resume token and continue at seq {expected})",
                keep=True,
            )
        if sess.rec.settings.get("input_format", RAW) == H264:
            if not req.data:
                raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"frames request seq {req.seq} has no data")
            return bytes(req.data)
        return self._rgb24(sess, req)

    def _rgb24(self, sess: Live, req: pb.FramesIn) -> np.ndarray:
        s = sess.settings
        if req.count > self.cfg.max_frames_per_request:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"frames request seq {req.seq} has {req.count} frames; at most {self.cfg.max_frames_per_request}",
                keep=True,
            )
        try:
            return rgb24_to_frames(req.data, req.count, s.height, s.width)
        except WireError as e:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(e), keep=True) from None

    async def process(
        self, sess: Live, req: pb.FramesIn | None, payload, prompt: str | None, final: bool, seq: int
    ) -> pb.FramesOut:
        """One frames request (req; None for `end`, final=True) through the stages -> its FramesOut."""
        t0 = time.perf_counter()
        rec = sess.rec
        t = pb.ChunkTimings()
        text = None
        if prompt is not None:
            tr = await self._encode_prompt(prompt, sess.settings, rec.session_id)
            text, t.text_ms = tr.value, tr.ms
        async with sess.lock:
            await self._migrate_draining(sess)
            step = Step(seq, payload, prompt, text, final)
            head = self.policy.head
            value = payload
            for stage in STAGES[:head]:  # stages no cut holds: losing one ends the session
                value = await self._unrecoverable(sess, stage, value, step, t)
            if head < len(STAGES):
                step.value = value
                value = await self._recoverable(sess, step, t)
            data, count = value
            if not isinstance(data, bytes):
                data = np.ascontiguousarray(data).tobytes()
            sess.chunks += t.chunks
            first = rec.frames_out
            rec.frames_out += count
            rec.next_seq = seq + 1
            if head < len(STAGES) and not final:
                rec.cut_chunks += t.chunks
                if rec.cut_chunks < self.policy.every or not await self._cut(sess, seq, t):
                    await self.store.append_replay(rec.session_id, self._log_entry(step, req))
            await self.store.put(rec)
        return self._frames_out(sess, seq, first, count, data, t, t0)

    def _frames_out(self, sess: Live, seq: int, first: int, count: int, data: bytes, t, t0: float) -> pb.FramesOut:
        t.total_ms = (time.perf_counter() - t0) * 1e3
        inside = t.ingest_ms + t.generate_ms + t.egress_ms + t.text_ms + t.checkpoint_ms
        t.gateway_ms = max(0.0, t.total_ms - inside)
        self.chunk_stats.append({"session": sess.rec.session_id, "seq": seq, "chunks": t.chunks,
                                 "total_ms": t.total_ms, "gateway_ms": t.gateway_ms})  # fmt: skip
        del self.chunk_stats[:-1000]
        fmt = sess.rec.output_format
        return pb.FramesOut(seq=seq, first_frame=first, count=count, format=fmt, data=data, timings=t)

    # --- the stages of one request ------------------------------------------------------------------------------

    async def _stage_step(self, sess: Live, stage: str, value, step: Step, t, replay: bool = False):
        """Run one stage for one request: ingest -> source latents | None; generator -> edited latents | None;
        egress -> (frames array | H.264 bytes | None on replay, count). A lost replica raises `_Lost`."""
        rec = sess.rec
        try:
            if stage == "ingest":
                r = await self._call(sess, "ingest", "encode", rec.session_id, value, step.final)
                t.ingest_ms += r.ms
                rec.frames_in = int(r.extra["frames_in"])
                return r.value
            if stage == "generator":
                if value is None and not step.final and step.prompt is None:
                    return None
                call = GenerateCall(rec.session_id, value, step.final, step.prompt, step.text)
                r = await self._call(sess, "generator", "generate", call)
                t.generate_ms += r.ms
                chunks = int(r.extra.get("chunks", 0))
                if replay:
                    t.recomputed_chunks += chunks
                else:
                    t.chunks += chunks
                if step.prompt is not None:
                    rec.prompt = step.prompt
                return r.value
            if value is None and not step.final:
                return b"", 0
            r = await self._call(sess, "egress", "decode", rec.session_id, value, step.final, rec.frames_in, replay)
            t.egress_ms += r.ms
            return r.value, int(r.extra["count"])
        except Exception as e:
            if (err := _user_error(e)) is not None:
                raise err from None
            if _lost(e):
                raise _Lost(stage, rec.replicas.get(stage, "")) from e
            raise

    async def _run(self, sess: Live, step: Step, start: int, t, replay: bool = False):
        value = step.value
        for stage in STAGES[start:]:
            value = await self._stage_step(sess, stage, value, step, t, replay)
        return value

    async def _unrecoverable(self, sess: Live, stage: str, value, step: Step, t):
        try:
            return await self._stage_step(sess, stage, value, step, t)
        except _Lost:
            why = (f"checkpoint cuts hold only {', '.join(self.policy.stages)}" if self.policy.on
                   else "checkpoints are off: checkpoint_every=0")  # fmt: skip
            raise StatusError(
                grpc.StatusCode.UNAVAILABLE,
                f"the {stage} replica holding session {sess.rec.session_id} was lost; its state cannot be recovered "
                f"({why}): open a new session",
            ) from None

    # --- checkpoint cuts, replay, recovery ----------------------------------------------------------------------

    async def _cut(self, sess: Live, seq: int, t) -> bool:
        """Snapshot every checkpointed stage after request `seq` and store them as one cut (empties the log).
        False when a replica is lost meanwhile: the caller logs the request, the next one recovers."""
        rec = sess.rec
        c0 = time.perf_counter()
        stages = self.policy.stages
        with telemetry.span("gateway.checkpoint", session_id=rec.session_id, seq=seq) as sp:
            try:
                calls = (self._call(sess, st, "export", rec.session_id, False) for st in stages)
                replies = await asyncio.gather(*calls)
            except Exception as e:
                if _lost(e):
                    log.warning("session %s: checkpoint cut after seq %d skipped (%s)", rec.session_id, seq, e)
                    return False
                raise
            parts = {st: r.value for st, r in zip(stages, replies)}
            meta = {"next_seq": seq + 1, "frames_in": rec.frames_in, "frames_out": rec.frames_out,
                    "prompt": rec.prompt, "bytes": {st: len(b) for st, b in parts.items()}}  # fmt: skip
            await self.store.put_checkpoint(rec.session_id, parts, meta)
            telemetry.set_attributes(sp, checkpoint_bytes=sum(meta["bytes"].values()))
        rec.cut_chunks = 0
        t.checkpoint_ms = (time.perf_counter() - c0) * 1e3
        t.checkpoint_bytes = sum(meta["bytes"].values())
        return True

    def _log_entry(self, step: Step, req: pb.FramesIn | None) -> bytes:
        """The replay log's record of one request: the first checkpointed stage's input."""
        if STAGES[self.policy.head] == "ingest":
            return req.SerializeToString()
        lat = _empty() if step.value is None else _tensor(step.value)
        entry = latents_to_proto(lat, "", 0, step.seq, step.final)
        if step.prompt is not None:
            entry.prompt = step.prompt
        return entry.SerializeToString()

    def _replay_step(self, sess: Live, raw: bytes) -> Step:
        if STAGES[self.policy.head] == "ingest":
            req = pb.FramesIn.FromString(raw)
            if sess.rec.settings.get("input_format", RAW) == H264:
                payload = bytes(req.data)
            else:
                payload = self._rgb24(sess, req)
            return Step(req.seq, payload, req.prompt if req.HasField("prompt") else None)
        msg = pb.LatentChunk.FromString(raw)
        lat = latents_from_proto(msg)
        value = None if lat.shape[2] == 0 else to_array(lat)
        return Step(msg.seq, value, msg.prompt if msg.HasField("prompt") else None, None, msg.final)

    async def _recoverable(self, sess: Live, step: Step, t):
        """Run the checkpointed stages for one request; on a lost replica restore the cut, replay, run again."""
        dead: dict[str, set[str]] = {}
        for _ in range(4):
            c0 = t.chunks
            try:
                return await self._run(sess, step, self.policy.head, t)
            except _Lost as lost:
                t.recomputed_chunks += t.chunks - c0  # what the failed attempt finished is done again
                t.chunks = c0
                dead.setdefault(lost.stage, set()).add(lost.replica)
                await self._recover(sess, dead, t)
        raise StatusError(
            grpc.StatusCode.UNAVAILABLE,
            f"session {sess.rec.session_id}: stage replicas kept failing while it was being recovered",
        )

    async def _recover(self, sess: Live, dead: dict[str, set[str]], t) -> None:
        rec = sess.rec
        for _ in range(4):
            try:
                lost = ",".join(f"{st}:{r}" for st, rs in sorted(dead.items()) for r in sorted(rs))
                with telemetry.span("gateway.recover", session_id=rec.session_id, lost=lost):
                    return await self._restore_cut(sess, dead, t)
            except _Lost as again:  # another replica died during the recovery: once more, avoiding it too
                dead.setdefault(again.stage, set()).add(again.replica)
        raise StatusError(grpc.StatusCode.UNAVAILABLE, f"session {rec.session_id} could not be recovered")

    async def _restore_cut(self, sess: Live, dead: dict[str, set[str]], t) -> None:
        """Every checkpointed stage back to the last cut (lost ones on other replicas), then the log replayed."""
        rec = sess.rec
        ck = await self.store.get_checkpoint(rec.session_id)
        lost = ", ".join(f"{st} {' '.join(sorted(r))}" for st, r in sorted(dead.items()))
        if ck is None:
            raise StatusError(
                grpc.StatusCode.UNAVAILABLE,
                f"session {rec.session_id} lost its {lost} replica and has no checkpoint "
                "(start the application with checkpoints enabled)",
            )
        parts, meta = ck
        await asyncio.gather(*(self._adopt(sess, st, parts[st], dead.get(st, set())) for st in self.policy.stages))
        if "ingest" in self.policy.stages:
            rec.frames_in = int(meta["frames_in"])
        rec.prompt = meta["prompt"]
        replayed = 0
        log_entries = await self.store.get_replay(rec.session_id)
        for raw in log_entries:
            step = self._replay_step(sess, raw)
            if step.prompt is not None:
                step.text = (await self._encode_prompt(step.prompt, sess.settings, rec.session_id)).value
            _, count = await self._run(sess, step, self.policy.head, t, replay=True)
            replayed += count
            t.replayed_requests += 1
        if int(meta["frames_out"]) + replayed != rec.frames_out:
            raise StatusError(
                grpc.StatusCode.INTERNAL,
                f"session {rec.session_id}: replaying {len(log_entries)} requests from the checkpoint gave "
                f"{replayed} frames, the client got {rec.frames_out - int(meta['frames_out'])}",
            )
        sess.recomputed += 1
        log.warning("session %s: lost %s; restored the cut before seq %d on %s, replayed %d requests",
                    rec.session_id, lost, meta["next_seq"], rec.replicas, len(log_entries))  # fmt: skip

    async def _adopt(self, sess: Live, stage: str, blob: bytes, avoid: set[str]) -> None:
        """Install a stage's snapshot: on its current replica when that one lives, else on another."""
        cur = sess.rec.replicas.get(stage, "")
        to = "" if cur in avoid else cur
        avoid = set(avoid)
        for attempt in range(20):  # a dead replica may stay in routers' sets for a moment
            route = await self._route(sess, stage, avoid=tuple(sorted(avoid)))
            try:
                await self._call(sess, stage, "adopt", blob, route=Route(to, route.avoid))
                return
            except Exception as e:
                if not _lost(e) or attempt == 19:
                    if _lost(e):
                        raise _Lost(stage, to or cur) from e
                    raise
                if to:
                    avoid.add(to)
                    to = ""
                await asyncio.sleep(0.25)

    # --- bidirectional_short ------------------------------------------------------------------------------------

    def check_clip_frames(self, sess: Live, req: pb.FramesIn) -> np.ndarray:
        frames = self.check_frames(sess, req)
        clip, s = sess.clip, sess.settings
        if req.HasField("prompt"):
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"frames request seq {req.seq} changes the prompt: mode bidirectional_short edits the whole clip with "
                "the prompt of the open",
            )
        if clip.done:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"frames request seq {req.seq} after the clip was complete (total_frames={s.total_frames}); send end",
            )
        n = clip.count + len(frames)
        if n > clip.limit:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"frames request seq {req.seq} brings the clip to {n} frames: mode bidirectional_short edits clips "
                f"of at most {clip.limit} frames (the {self.bidi_preset.name} bidirectional model's clip length); "
                f"{clip.limit - clip.count} more fit",
            )
        if s.total_frames is not None and n > s.total_frames:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"frames request seq {req.seq} brings the clip to {n} frames, more than its total_frames="
                f"{s.total_frames}",
            )
        return frames

    async def process_clip(self, sess: Live, frames: np.ndarray | None, final: bool, seq: int) -> list[pb.FramesOut]:
        """Buffer a bidirectional_short request; edit the clip once complete -> its FramesOut message(s)."""
        t0 = time.perf_counter()
        rec, clip, s = sess.rec, sess.clip, sess.settings
        t = pb.ChunkTimings()
        if frames is not None and len(frames):
            clip.frames.append(np.array(frames))  # a copy: `frames` views the request's bytes
            clip.count += len(frames)
        rec.frames_in = clip.count
        rec.next_seq = seq + 1
        complete = final or (s.total_frames is not None and clip.count == s.total_frames)
        if not complete or clip.done:
            await self.store.put(rec)
            return [self._frames_out(sess, seq, rec.frames_out, 0, b"", t, t0)]
        if clip.count == 0:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "end before any frame: the clip is empty")
        video = np.concatenate(clip.frames)
        for attempt in range(3):  # the edit holds no state: a lost replica just means another try
            try:
                r = await self.bidi.edit.remote(video, dataclasses.asdict(s), clip.text, trace=telemetry.inject(),
                                                session_id=rec.session_id)  # fmt: skip
                break
            except Exception as e:
                if (err := _user_error(e)) is not None:
                    raise err from None
                if not _lost(e) or attempt == 2:
                    raise
                log.warning("session %s: bidirectional replica lost (%s); editing again", rec.session_id, e)
        clip.done, clip.frames = True, []
        rec.replicas["bidirectional"] = r.replica_id
        t.generate_ms, t.chunks = r.ms, 1
        sess.chunks += 1
        edited = np.ascontiguousarray(r.value)
        per = max(1, (self.cfg.max_message_bytes - (64 << 10)) // (s.height * s.width * 3))
        outs = []
        for i in range(0, len(edited), per):
            piece = edited[i : i + per]
            outs.append(self._frames_out(sess, seq, rec.frames_out, len(piece), piece.tobytes(), t, t0))
            rec.frames_out += len(piece)
            t = pb.ChunkTimings()
        await self.store.put(rec)
        return outs

    # --- migration ----------------------------------------------------------------------------------------------

    async def _migrate_draining(self, sess: Live) -> int:
        moved = 0
        for stage in STAGES:
            cur = sess.rec.replicas.get(stage)
            if cur and cur in await self.store.draining(stage):
                await self._migrate(sess, stage)
                moved += 1
        return moved

    async def _migrate(self, sess: Live, stage: str) -> None:
        old = sess.rec.replicas[stage]
        snap = await self._call(sess, stage, "export", sess.rec.session_id, True, route=Route(to=old))
        route = await self._route(sess, stage, avoid=(old,))
        await self._call(sess, stage, "adopt", snap.value, route=Route("", route.avoid))
        await self.store.put(sess.rec)
        log.info("session %s: %s moved %s -> %s (%d bytes, %.1f ms)", sess.rec.session_id, stage, old,
                 sess.rec.replicas[stage], len(snap.value), snap.ms)  # fmt: skip

    async def drain(self, stage: str, replica_id: str, timeout_s: float) -> tuple[int, int]:
        await self.store.set_draining(stage, replica_id)
        moved = 0
        deadline = time.monotonic() + timeout_s
        while True:
            held = [r for r in await self.store.list() if r.replicas.get(stage) == replica_id
                    and r.status not in ("finished", "failed")]  # fmt: skip
            if not held or time.monotonic() > deadline:
                return moved, len(held)
            for rec in held:
                sess = self.live.get(rec.session_id)
                if sess is None and rec.status == "attached":
                    continue  # driven by another gateway: it moves at its next chunk
                sess = sess or Live(rec, _settings(rec))
                async with sess.lock:
                    if sess.rec.replicas.get(stage) == replica_id:
                        await self._migrate(sess, stage)
                        moved += 1
            await asyncio.sleep(0.1)

    # --- lifecycle ----------------------------------------------------------------------------------------------

    async def free(self, rec: SessionRecord, status: str | None = None, delete: bool = False) -> None:
        """Drop the session's parts on every stage (best effort), then mark or delete the record."""
        sess = Live(rec, SessionSettings(prompt=rec.prompt or "-"))
        for stage in STAGES:
            if rec.replicas.get(stage):
                with contextlib.suppress(Exception):
                    await self._call(sess, stage, "close", rec.session_id, route=Route(to=rec.replicas[stage]))
        if delete:
            await self.store.delete(rec.session_id)
        elif status:
            rec.status = status
            await self.store.put(rec)

    async def _reap_once(self) -> list[str]:
        reaped = []
        for rec in await self.store.idle(self.cfg.idle_timeout_s):
            if rec.session_id in self.live:
                continue
            await self.free(rec, delete=True)
            reaped.append(rec.session_id)
        return reaped

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reap_interval_s)
            try:
                await self._reap_once()
            except Exception:
                log.exception("idle reaper")


def _settings(rec: SessionRecord) -> SessionSettings:
    return SessionSettings(**{k: v for k, v in rec.settings.items() if k not in ("input_format", "mode")})


def _tensor(a):
    import torch

    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def _empty():
    import torch

    return torch.zeros(1, 1, 0, 1, 1)


class _EditServicer(pb_grpc.EditServiceServicer):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def StreamEdit(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        gw = self.gw
        tenant = _tenant(context)
        sess: Live | None = None
        ended = False
        call = telemetry.start_span("videoedit.StreamEdit", context.invocation_metadata(), tenant=tenant)
        try:
            try:
                first = await anext(aiter(request_iterator))
            except StopAsyncIteration:
                raise StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT, "empty StreamEdit call: send a SessionOpen first"
                ) from None
            kind = first.WhichOneof("kind")
            if kind != "open":
                raise StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the first StreamEdit request must be `open` (a SessionOpen); got `{kind or 'nothing'}`",
                )
            with telemetry.span("gateway.open", call) as sp:
                sess, resumed, token = await gw.open(first.open, tenant)
                telemetry.set_attributes(sp, session_id=sess.rec.session_id, resumed=resumed)
            rec = sess.rec
            telemetry.set_attributes(call, session_id=rec.session_id)
            gw.live[rec.session_id] = sess
            rec.status = "attached"
            await gw.store.put(rec)
            s = sess.settings
            yield pb.StreamEditResponse(session_id=rec.session_id, resume_token=token, opened=pb.SessionOpened(
                next_seq=rec.next_seq, height=s.height, width=s.width, fps=s.fps, output_format=rec.output_format,
                resumed=resumed, frames_out=rec.frames_out))  # fmt: skip
            async for req in request_iterator:
                kind = req.WhichOneof("kind")
                if kind == "frames":
                    with telemetry.span("gateway.frames", call, session_id=rec.session_id, seq=req.frames.seq) as sp:
                        if sess.clip is not None:
                            frames = gw.check_clip_frames(sess, req.frames)
                            outs = await gw.process_clip(sess, frames, False, req.frames.seq)
                        else:
                            payload = gw.check_frames(sess, req.frames)
                            prompt = req.frames.prompt if req.frames.HasField("prompt") else None
                            outs = [await gw.process(sess, req.frames, payload, prompt, False, req.frames.seq)]
                        _span_result(sp, outs)
                    for out in outs:
                        yield pb.StreamEditResponse(session_id=rec.session_id, resume_token=token, frames=out)
                elif kind == "end":
                    if req.end.seq != rec.next_seq:
                        raise StatusError(
                            grpc.StatusCode.ABORTED,
                            f"end seq {req.end.seq}: expected {rec.next_seq} (frames requests are missing)",
                            keep=True,
                        )
                    with telemetry.span("gateway.end", call, session_id=rec.session_id, seq=req.end.seq) as sp:
                        if sess.clip is not None:
                            outs = await gw.process_clip(sess, None, True, req.end.seq)
                        else:
                            empty = b"" if rec.settings.get("input_format") == H264 else _no_frames(sess.settings)
                            outs = [await gw.process(sess, None, empty, None, True, req.end.seq)]
                        _span_result(sp, outs)
                    for out in outs:
                        yield pb.StreamEditResponse(session_id=rec.session_id, resume_token=token, frames=out)
                    yield pb.StreamEditResponse(session_id=rec.session_id, resume_token=token,
                        finished=pb.SessionFinished(frames_in=rec.frames_in, frames_out=rec.frames_out,
                                                    chunks=sess.chunks))  # fmt: skip
                    ended = True
                    await gw.free(rec, status="finished")
                    break
                else:
                    raise StatusError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"`{kind or 'nothing'}` after the session is open; expected `frames` or `end`",
                        keep=True,
                    )
        except StatusError as e:
            telemetry.set_error(call, f"{e.code.name}: {e.message}")
            if sess is not None and not e.keep:
                await gw.free(sess.rec, status="failed")
                ended = True
            await context.abort(e.code, e.message)
        except SnapshotError as e:
            telemetry.set_error(call, f"INTERNAL: {e}")
            await context.abort(grpc.StatusCode.INTERNAL, f"session state could not be moved: {e}")
        finally:
            if call is not None:
                call.end()
            if sess is not None:
                gw.live.pop(sess.rec.session_id, None)
                if not ended:  # resumable with the token, unless its clip (bidirectional_short) went with the call
                    sess.rec.status = "detached" if sess.clip is None else "failed"
                    with contextlib.suppress(Exception):
                        await gw.store.put(sess.rec)

    async def GetSession(self, request, context):  # noqa: N802
        rec = await self.gw.store.get(request.session_id)
        if rec is None or rec.tenant != _tenant(context):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {request.session_id!r}")
        return pb.SessionInfo(session_id=rec.session_id, status=rec.status, next_seq=rec.next_seq,
                              created_unix=rec.created, last_seen_unix=rec.last_seen, replicas=rec.replicas,
                              frames_in=rec.frames_in, frames_out=rec.frames_out, prompt=rec.prompt)  # fmt: skip

    async def CloseSession(self, request, context):  # noqa: N802
        rec = await self.gw.store.get(request.session_id)
        if rec is None or rec.tenant != _tenant(context):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {request.session_id!r}")
        await self.gw.free(rec, delete=True)
        return pb.CloseSessionResponse(closed=True)


def _span_result(sp, outs: list[pb.FramesOut]) -> None:
    if sp is not None and outs:
        t = outs[0].timings
        n = sum(o.count for o in outs)
        telemetry.set_attributes(sp, frames_out=n, chunks=t.chunks, recomputed_chunks=t.recomputed_chunks,
                                 checkpoint_bytes=t.checkpoint_bytes)  # fmt: skip


def _no_frames(s: SessionSettings) -> np.ndarray:
    return np.zeros((0, s.height, s.width, 3), np.uint8)


class _AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def DrainReplica(self, request, context):  # noqa: N802
        if request.stage not in STAGES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stage must be one of {', '.join(STAGES)}")
        if request.undo:
            await self.gw.store.set_draining(request.stage, request.replica_id, on=False)
            return pb.DrainReplicaResponse()
        moved, left = await self.gw.drain(request.stage, request.replica_id, request.timeout_s or 30.0)
        return pb.DrainReplicaResponse(migrated=moved, remaining=left)

    async def Echo(self, request, context):  # noqa: N802
        return request


GatewayDeployment = serve.deployment(Gateway, name="Gateway", ray_actor_options={"num_cpus": 0})
