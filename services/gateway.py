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
and is answered by one FramesOut. Source latents sent to the Generator are logged (LatentChunk) until its next
checkpoint; if the Generator replica dies (or no longer holds the session) the gateway restores the last
checkpoint on another replica and replays the log, forwarding only latents Egress has not seen yet, so the
client's stream continues with monotonic sequence numbers and identical output. Sessions on a draining replica
move (export -> adopt) at their next chunk boundary, or at once when no stream is driving them.

Non-goals: tenants' keys and quotas (a tenant is a hash of the bearer key, used to scope sessions), admission
control, batch jobs, telemetry export.
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
from services.generator import GenerateCall
from services.routing import Route
from services.stage import BadInputError, Reply, SessionNotFoundError
from services.store import SessionRecord, make_store
from services.wire import (
    STAGES,
    WireError,
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
class Live:
    """A session driven by a StreamEdit call of this gateway replica."""

    rec: SessionRecord
    settings: SessionSettings
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    handles: dict = field(default_factory=dict)
    recomputed: int = 0
    chunks: int = 0


class Gateway:
    """One replica: the gRPC server plus the session logic; handles to the stages come in the constructor."""

    async def __init__(self, ingest, text, generator, egress, config: GatewayConfig) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        self.cfg = config
        self.stages = {"ingest": ingest, "generator": generator, "egress": egress}
        self.text = text
        self.store = make_store(config.redis_url)
        self.preset = preset_for_mode(config.preset, "long_streaming")
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
        route = route or await self._route(sess, stage)
        reply = await getattr(self._handle(sess, stage), method).remote(*args, route=route)
        if method in ("open", "adopt"):
            sess.rec.replicas[stage] = reply.replica_id
        return reply

    async def _stage(self, sess: Live, stage: str, method: str, *args) -> Reply:
        """A call on a stage that cannot be recovered (ingest, egress): loss -> UNAVAILABLE."""
        try:
            return await self._call(sess, stage, method, *args)
        except Exception as e:
            if (err := _user_error(e)) is not None:
                raise err from None
            if _lost(e):
                raise StatusError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the {stage} replica holding session {sess.rec.session_id} was lost; its state cannot be "
                    "recovered (only the generator is checkpointed): open a new session",
                ) from None
            raise

    # --- open / resume ------------------------------------------------------------------------------------------

    async def _encode_prompt(self, prompt: str, settings: SessionSettings) -> Reply:
        try:
            return await self.text.encode.remote(prompt, settings.negative_prompt, settings.cfg_scale)
        except Exception as e:
            if (err := _user_error(e)) is not None:
                raise StatusError(err.code, err.message, keep=True) from None
            raise

    async def open(self, msg: pb.SessionOpen, tenant: str) -> tuple[Live, bool, str]:
        if msg.session_id or msg.resume_token:
            return await self._resume(msg, tenant)
        if msg.mode == pb.EDIT_MODE_BIDIRECTIONAL_SHORT:
            raise StatusError(grpc.StatusCode.UNIMPLEMENTED, "mode bidirectional_short is not served by StreamEdit")
        if msg.input_format not in (pb.FRAME_FORMAT_UNSPECIFIED, RAW, H264):
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown input_format {msg.input_format}")
        try:
            settings = settings_from_open(msg, self.preset)
        except (ValueError, TypeError) as e:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"bad session settings: {e}") from None
        sc = self.preset.vae.spatial_compression
        if settings.height % sc or settings.width % sc or settings.height <= 0 or settings.width <= 0:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"height and width must be positive multiples of {sc}; got {settings.width}x{settings.height}",
            )
        if not settings.prompt.strip():
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "the session needs a non-empty prompt")
        text = await self._encode_prompt(settings.prompt, settings)
        in_fmt = msg.input_format or RAW
        out_fmt = msg.output_format or in_fmt
        token = secrets.token_urlsafe(24)
        rec = SessionRecord(
            session_id=uuid.uuid4().hex,
            tenant=tenant,
            token_hash=hashlib.sha256(token.encode()).hexdigest(),
            prompt=settings.prompt,
            settings={**dataclasses.asdict(settings), "input_format": in_fmt},
            output_format=out_fmt,
        )
        await self.store.create(rec)
        sess = Live(rec, settings)
        s = dataclasses.asdict(settings)
        replies = await asyncio.gather(
            self._call(sess, "ingest", "open", rec.session_id, s, in_fmt == H264),
            self._call(sess, "generator", "open", rec.session_id, s, text.value),
            self._call(sess, "egress", "open", rec.session_id, s, out_fmt == H264),
        )
        if ck := replies[1].extra.get("checkpoint"):
            await self.store.put_checkpoint(rec.session_id, ck, 0)
        await self.store.put(rec)
        return sess, False, token

    async def _resume(self, msg: pb.SessionOpen, tenant: str) -> tuple[Live, bool, str]:
        rec = await self.store.get(msg.session_id)
        unknown = StatusError(grpc.StatusCode.NOT_FOUND, f"unknown session id or resume token ({msg.session_id!r})")
        if rec is None or rec.tenant != tenant:
            raise unknown
        if not secrets.compare_digest(rec.token_hash, hashlib.sha256(msg.resume_token.encode()).hexdigest()):
            raise unknown
        if rec.status in ("finished", "failed"):
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, f"session {rec.session_id} is {rec.status}")
        if rec.session_id in self.live:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION, f"session {rec.session_id} is attached to another StreamEdit call"
            )
        s = {k: v for k, v in rec.settings.items() if k != "input_format"}
        return Live(rec, SessionSettings(**s)), True, msg.resume_token

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
        s = sess.settings
        if sess.rec.settings.get("input_format", RAW) == H264:
            if not req.data:
                raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"frames request seq {req.seq} has no data")
            return bytes(req.data)
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

    async def process(self, sess: Live, payload, prompt: str | None, final: bool, seq: int) -> pb.FramesOut:
        t0 = time.perf_counter()
        rec = sess.rec
        timings = pb.ChunkTimings()
        text = None
        if prompt is not None:
            tr = await self._encode_prompt(prompt, sess.settings)
            text, timings.text_ms = tr.value, tr.ms
        async with sess.lock:
            await self._migrate_draining(sess)
            ing = await self._stage(sess, "ingest", "encode", rec.session_id, payload, final)
            timings.ingest_ms = ing.ms
            rec.frames_in = int(ing.extra["frames_in"])
            edited = None
            if ing.value is not None or final or prompt is not None:
                call = GenerateCall(rec.session_id, ing.value, final, prompt, text)
                gen = await self._generate(sess, call, seq)
                timings.generate_ms, timings.chunks = gen.ms, gen.extra.get("chunks", 0)
                timings.recomputed_chunks = gen.extra.get("recomputed", 0)
                sess.chunks += timings.chunks
                edited = gen.value
                if prompt is not None:
                    rec.prompt = prompt
            data, count = b"", 0
            if edited is not None or final:
                eg = await self._stage(sess, "egress", "decode", rec.session_id, edited, final, rec.frames_in)
                timings.egress_ms = eg.ms
                count = eg.extra["count"]
                data = eg.value if isinstance(eg.value, bytes) else np.ascontiguousarray(eg.value).tobytes()
            first = rec.frames_out
            rec.frames_out += count
            rec.next_seq = seq + 1
            await self.store.put(rec)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        inside = timings.ingest_ms + timings.generate_ms + timings.egress_ms + timings.text_ms
        timings.gateway_ms = max(0.0, timings.total_ms - inside)
        self.chunk_stats.append({"session": rec.session_id, "seq": seq, "chunks": timings.chunks,
                                 "total_ms": timings.total_ms, "gateway_ms": timings.gateway_ms})  # fmt: skip
        fmt = rec.output_format
        return pb.FramesOut(seq=seq, first_frame=first, count=count, format=fmt, data=data, timings=timings)

    # --- generator: checkpoints, replay, recovery ----------------------------------------------------------------

    async def _generate(self, sess: Live, call: GenerateCall, seq: int) -> Reply:
        rec = sess.rec
        lat = None if call.latents is None else _tensor(call.latents)
        entry = latents_to_proto(lat if lat is not None else _empty(), rec.session_id, 0, seq, call.final)
        if call.prompt is not None:
            entry.prompt = call.prompt
        await self.store.append_replay(rec.session_id, entry.SerializeToString())
        try:
            reply = await self._call(sess, "generator", "generate", call)
        except Exception as e:
            if (err := _user_error(e)) is not None:
                raise err from None
            if not _lost(e):
                raise
            reply = await self._recover_generator(sess, rec.replicas.get("generator", ""))
        if ck := reply.extra.pop("checkpoint", None):
            await self.store.put_checkpoint(rec.session_id, ck, reply.extra["latents_generated"])
        if reply.value is not None:
            rec.latents_forwarded += int(reply.value.shape[2])
        return reply

    async def _recover_generator(self, sess: Live, dead: str) -> Reply:
        """Restore the last checkpoint on another replica, replay the log; returns the unforwarded output."""
        import torch

        rec = sess.rec
        ck = await self.store.get_checkpoint(rec.session_id)
        if ck is None:
            raise StatusError(
                grpc.StatusCode.UNAVAILABLE,
                f"the generator replica of session {rec.session_id} was lost and no checkpoint exists "
                "(start the application with checkpoints enabled)",
            )
        blob, ck_latents = ck
        route = await self._route(sess, "generator", avoid=(dead,))
        for attempt in range(20):  # the dead replica may still be in routers' sets for a moment
            try:
                await self._call(sess, "generator", "adopt", blob, route=Route("", route.avoid))
                break
            except Exception as e:
                if not _lost(e) or attempt == 19:
                    raise
                await asyncio.sleep(0.25)
        log.warning("session %s: generator %s lost, restored on %s", rec.session_id, dead, rec.replicas["generator"])
        outs, ms, chunks = [], 0.0, 0
        for raw in await self.store.get_replay(rec.session_id):
            msg = pb.LatentChunk.FromString(raw)
            lat = latents_from_proto(msg)
            text = None
            if msg.HasField("prompt"):
                text = (await self._encode_prompt(msg.prompt, sess.settings)).value
            call = GenerateCall(rec.session_id, None if lat.shape[2] == 0 else lat.numpy(), msg.final,
                                msg.prompt if msg.HasField("prompt") else None, text, replay=True)  # fmt: skip
            r = await self._call(sess, "generator", "generate", call)
            ms += r.ms
            chunks += r.extra.get("chunks", 0)
            if r.value is not None:
                outs.append(_tensor(r.value))
        out = torch.cat(outs, dim=2) if outs else None
        produced = 0 if out is None else out.shape[2]
        skip = rec.latents_forwarded - ck_latents  # already went to egress before the loss
        fresh = None if out is None or produced <= skip else out[:, :, skip:]
        n_fresh = 0 if fresh is None else fresh.shape[2]
        recomputed = chunks - (1 if n_fresh else 0)
        sess.recomputed += max(0, recomputed)
        value = None if fresh is None else fresh.numpy()
        return Reply(rec.replicas["generator"], ms, value, {"chunks": 1 if n_fresh else 0, "recomputed": recomputed,
                                                            "latents_generated": ck_latents + produced})  # fmt: skip

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
                sess = sess or Live(rec, SessionSettings(**{k: v for k, v in rec.settings.items()
                                                            if k != "input_format"}))  # fmt: skip
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
            sess, resumed, token = await gw.open(first.open, tenant)
            rec = sess.rec
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
                    payload = gw.check_frames(sess, req.frames)
                    prompt = req.frames.prompt if req.frames.HasField("prompt") else None
                    out = await gw.process(sess, payload, prompt, False, req.frames.seq)
                    yield pb.StreamEditResponse(session_id=rec.session_id, resume_token=token, frames=out)
                elif kind == "end":
                    if req.end.seq != rec.next_seq:
                        raise StatusError(
                            grpc.StatusCode.ABORTED,
                            f"end seq {req.end.seq}: expected {rec.next_seq} (frames requests are missing)",
                            keep=True,
                        )
                    empty = b"" if rec.settings.get("input_format") == H264 else _no_frames(sess.settings)
                    out = await gw.process(sess, empty, None, True, req.end.seq)
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
            if sess is not None and not e.keep:
                await gw.free(sess.rec, status="failed")
                ended = True
            await context.abort(e.code, e.message)
        except SnapshotError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"session state could not be moved: {e}")
        finally:
            if sess is not None:
                gw.live.pop(sess.rec.session_id, None)
                if not ended:
                    sess.rec.status = "detached"
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
