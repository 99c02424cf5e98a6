"""Ingest deployment: H.264 decode (when the client sends Annex-B) + causal VAE encode, per-session cache.

Per session it holds the encoder part of the SessionState (the VAE's causal conv caches and the pixel frames
waiting for a full 8-frame step) and, for H.264 input, a PyAV decoder. Frames in: uint8 (n, H, W, 3) arrays
(zero-copy from the object store) or Annex-B bytes cut anywhere. Out: the source latents that became ready,
as an array, for the Generator.

Migration carries the encoder state; an H.264 decoder cannot be serialised, so a migrated H.264 session gets a
fresh decoder and must continue at a keyframe (IDR); raw RGB24 sessions migrate exactly.
Non-goals: other codecs or containers (the client sends a raw Annex-B elementary stream), scaling or cropping
(the client sends frames at the session's size).
"""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from services.routing import ROUTER_PATH, Route
from services.stage import BadInputError, CodecStage, to_array

H264_START_CODES = (b"\x00\x00\x01", b"\x00\x00\x00\x01")


class _H264Decoder:
    """A per-session Annex-B decoder: bytes in, RGB24 frames out, with the session's size enforced."""

    def __init__(self, height: int, width: int) -> None:
        import av

        self.codec = av.CodecContext.create("h264", "r")
        self.height, self.width = height, width
        self.bytes_in = 0
        self.frames_out = 0

    def _frames(self, packets) -> list[np.ndarray]:
        import av

        out = []
        try:
            for pkt in packets:
                for frame in self.codec.decode(pkt):
                    if (frame.height, frame.width) != (self.height, self.width):
                        raise BadInputError(
                            f"H.264 frames are {frame.width}x{frame.height}; the session expects "
                            f"{self.width}x{self.height}"
                        )
                    out.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as e:
            raise BadInputError(f"corrupt H.264 stream after {self.bytes_in} bytes: {e}") from None
        return out

    def push(self, data: bytes, final: bool) -> np.ndarray:
        import av

        if self.bytes_in == 0 and data and not data.startswith(H264_START_CODES):
            raise BadInputError(
                f"H.264 input must be an Annex-B stream starting with a start code (00 00 01); got {data[:4].hex()}"
            )
        self.bytes_in += len(data)
        try:
            packets = list(self.codec.parse(data)) if data else []
            frames = self._frames(packets)
            if final:
                frames += self._frames(list(self.codec.parse(b"")) + [None])
        except av.error.FFmpegError as e:
            raise BadInputError(f"corrupt H.264 stream after {self.bytes_in} bytes: {e}") from None
        self.frames_out += len(frames)
        if final and self.frames_out == 0 and self.bytes_in > 0:
            raise BadInputError(f"corrupt H.264 stream: {self.bytes_in} bytes held no decodable frame")
        if not frames:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.stack(frames)


@serve.deployment(
    request_router_config={"request_router_class": ROUTER_PATH},
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=16,
)
class Ingest(CodecStage):
    stage = "ingest"
    part = "encoder"
    model_parts = ("vae",)

    def _decoder(self, session_id: str) -> _H264Decoder:
        dec = self.codecs.get(session_id)
        if dec is None:
            s = self.sessions[session_id].settings
            dec = self.codecs[session_id] = _H264Decoder(s.height, s.width)
        return dec

    async def encode(self, session_id: str, frames, final: bool = False, route: Route | None = None):
        """frames: uint8 (n, H, W, 3) for RGB24 sessions, bytes for H.264 ones -> (latents array | None, n)."""
        t0 = time.perf_counter()
        state = self._state(session_id)

        def work():
            pix = self._decoder(session_id).push(frames, final) if session_id in self.h264 else frames
            if pix is None:
                pix = np.zeros((0, state.settings.height, state.settings.width, 3), np.uint8)
            if pix.shape[0] == 0 and not final:
                return None, 0
            return to_array(self.editor.encode(state, pix, final=final)), int(pix.shape[0])

        latents, n = await self._compute(work)
        return self._reply(t0, latents, frames=n, frames_in=state.cursor.frames_in)
