"""Python client for the EditService: stream frames (or H.264) in, collect edited frames, report FPS and latency.

    from services.client import EditClient
    with EditClient("127.0.0.1:9000") as c:
        result = c.stream(frames, "make it a watercolor", total_frames=len(frames))
    result.frames  # uint8 (n, H, W, 3), one per input frame

`stream` sends a SessionOpen, then one FramesIn per `chunk_frames` frames (paced at `fps` with realtime=True),
then EndOfInput; `prompts={seq: prompt}` changes the instruction from that request on. The response stream is
read concurrently (gRPC's bidirectional call), so sending never waits for the edit. Latency of a request =
its response time - its send time. Errors surface as `grpc.RpcError` with the server's status and message.
Non-goals: reconnect loops (resume is exposed: `stream(..., resume=(session_id, token, next_seq))`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from services.wire import pb, pb_grpc


@dataclass
class StreamResult:
    session_id: str = ""
    resume_token: str = ""
    frames: np.ndarray | None = None
    """RGB24 output: uint8 (n, H, W, 3). H.264 output: None (see h264)."""
    h264: bytes = b""
    responses: list = field(default_factory=list)
    """Every FramesOut (data stripped), in order."""
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    finished: pb.SessionFinished | None = None

    @property
    def fps(self) -> float:
        n = sum(r.count for r in self.responses)
        return n / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms or [0.0])
        return {"session_id": self.session_id, "frames": int(sum(r.count for r in self.responses)),
                "wall_s": round(self.wall_s, 3), "fps": round(self.fps, 2),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
                "latency_ms_p95": round(float(np.percentile(lat, 95)), 2)}  # fmt: skip


def open_request(prompt: str, height: int, width: int, **kw) -> pb.StreamEditRequest:
    return pb.StreamEditRequest(open=pb.SessionOpen(prompt=prompt, height=height, width=width, **kw))


def frames_request(seq: int, frames: np.ndarray, prompt: str | None = None) -> pb.StreamEditRequest:
    msg = pb.FramesIn(seq=seq, count=len(frames), data=np.ascontiguousarray(frames, np.uint8).tobytes())
    if prompt is not None:
        msg.prompt = prompt
    return pb.StreamEditRequest(frames=msg)


def end_request(seq: int) -> pb.StreamEditRequest:
    return pb.StreamEditRequest(end=pb.EndOfInput(seq=seq))


def _trace_metadata() -> list[tuple[str, str]]:
    try:
        from opentelemetry import propagate
    except ImportError:  # tracing is optional on the client
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


class EditClient:
    def __init__(self, address: str, *, api_key: str | None = None, max_message_bytes: int = 256 << 20) -> None:
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]  # fmt: skip
        self.channel = grpc.insecure_channel(address, options=opts)
        self.edit = pb_grpc.EditServiceStub(self.channel)
        self.admin = pb_grpc.AdminServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []

    def __enter__(self) -> EditClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # --- raw ----------------------------------------------------------------------------------------------------

    def call(self, requests: Iterator[pb.StreamEditRequest], timeout: float | None = None):
        """The bidirectional call as is: an iterator of StreamEditResponse (raises grpc.RpcError). The caller's
        current OpenTelemetry span, if any, goes along as W3C `traceparent` metadata."""
        return self.edit.StreamEdit(requests, metadata=self.metadata + _trace_metadata(), timeout=timeout)

    def get_session(self, session_id: str) -> pb.SessionInfo:
        return self.edit.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=self.metadata)

    def close_session(self, session_id: str) -> bool:
        return self.edit.CloseSession(pb.CloseSessionRequest(session_id=session_id), metadata=self.metadata).closed

    def drain(self, stage: str, replica_id: str, timeout_s: float = 30.0, undo: bool = False):
        req = pb.DrainReplicaRequest(stage=stage, replica_id=replica_id, timeout_s=timeout_s, undo=undo)
        return self.admin.DrainReplica(req, metadata=self.metadata)

    # --- streaming ----------------------------------------------------------------------------------------------

    def stream(
        self,
        frames: np.ndarray | None,
        prompt: str,
        *,
        chunk_frames: int = 24,
        fps: float = 16.0,
        realtime: bool = False,
        prompts: dict[int, str] | None = None,
        h264: bytes | None = None,
        h264_chunk_bytes: int = 64 << 10,
        on_response: Callable[[pb.StreamEditResponse], None] | None = None,
        between: Callable[[int], None] | None = None,
        timeout: float | None = None,
        **open_kw,
    ) -> StreamResult:
        """Edit a clip through the service. `frames` uint8 (n, H, W, 3), or `h264` Annex-B bytes (then pass
        height/width in open_kw). `between(seq)` runs before request `seq` is sent (tests: drain, kill)."""
        prompts = prompts or {}
        if h264 is None:
            assert frames is not None
            open_kw.setdefault("height", frames.shape[1])
            open_kw.setdefault("width", frames.shape[2])
            pieces = [frames[i : i + chunk_frames] for i in range(0, len(frames), chunk_frames)]
        else:
            open_kw["input_format"] = pb.FRAME_FORMAT_H264_ANNEXB
            pieces = [h264[i : i + h264_chunk_bytes] for i in range(0, len(h264), h264_chunk_bytes)]
        sent: dict[int, float] = {}
        period = chunk_frames / fps if realtime and h264 is None else 0.0
        res = StreamResult()
        opened = threading.Event()

        def requests():
            yield pb.StreamEditRequest(open=pb.SessionOpen(prompt=prompt, **open_kw))
            opened.wait(timeout or 600)
            t0 = time.perf_counter()
            for seq, piece in enumerate(pieces):
                if period:
                    time.sleep(max(0.0, t0 + seq * period - time.perf_counter()))
                if between:
                    between(seq)
                if h264 is None:
                    req = frames_request(seq, piece, prompts.get(seq))
                else:
                    req = pb.StreamEditRequest(frames=pb.FramesIn(seq=seq, data=piece))
                    if seq in prompts:
                        req.frames.prompt = prompts[seq]
                sent[seq] = time.perf_counter()
                yield req
            sent[len(pieces)] = time.perf_counter()
            yield end_request(len(pieces))

        outs, blobs = [], []
        t_start = time.perf_counter()
        try:
            for resp in self.call(requests(), timeout=timeout):
                if on_response:
                    on_response(resp)
                kind = resp.WhichOneof("kind")
                if kind == "opened":
                    res.session_id, res.resume_token = resp.session_id, resp.resume_token
                    opened.set()
                elif kind == "frames":
                    f = resp.frames
                    res.latencies_ms.append((time.perf_counter() - sent.get(f.seq, t_start)) * 1e3)
                    if f.format == pb.FRAME_FORMAT_H264_ANNEXB:
                        blobs.append(f.data)
                    elif f.count:
                        outs.append(np.frombuffer(f.data, np.uint8).reshape(f.count, open_kw["height"],
                                                                              open_kw["width"], 3))  # fmt: skip
                    stripped = pb.FramesOut()
                    stripped.CopyFrom(f)
                    stripped.data = b""
                    res.responses.append(stripped)
                elif kind == "finished":
                    res.finished = resp.finished
        finally:
            opened.set()
        res.wall_s = time.perf_counter() - t_start
        res.h264 = b"".join(blobs)
        if outs or not blobs:  # RGB24 output (also for H.264 input with output_format RGB24)
            h, w = open_kw["height"], open_kw["width"]
            res.frames = np.concatenate(outs) if outs else np.zeros((0, h, w, 3), np.uint8)
        return res
