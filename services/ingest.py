"""Ingest deployment: H.264 decode (when the client sends Annex-B) + causal VAE encode, per-session cache.

Per session it holds the encoder part of the SessionState (the VAE's causal conv caches and the pixel frames
waiting for a full 8-frame step) and, for H.264 input, a PyAV decoder. Frames in: uint8 (n, H, W, 3) arrays
(zero-copy from the object store) or Annex-B bytes cut anywhere. Out: the source latents that became ready,
as an array, for the Generator.

Snapshots (migration, checkpoint cuts) carry the encoder state. An H.264 decoder cannot be serialised, so for
H.264 sessions the snapshot also carries the Annex-B bytes received since the last SPS NAL unit (the resync
point: x264 and most encoders send SPS/PPS before every IDR frame) or since the stream start:
`SessionSnapshot.codec_state`, at most one GOP of compressed video. Adopting feeds them to a fresh decoder and
drops its output, which leaves it in the state of the original (parser remainder included), so H.264 sessions
migrate and resume exactly, for streams without frame reordering (no B-frames: what a live encoder such as
x264 `zerolatency` sends); with B-frames, frames delayed across the resync point could be lost.
Non-goals: other codecs or containers (the client sends a raw Annex-B elementary stream), scaling or cropping
(the client sends frames at the session's size).
"""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from services.routing import ROUTER_PATH, Route
from services.stage import BadInputError, CodecStage, to_array, traced

H264_START_CODES = (b"\x00\x00\x01", b"\x00\x00\x00\x01")


class _H264Decoder:
    """A per-session Annex-B decoder: bytes in, RGB24 frames out, with the session's size enforced."""

    def __init__(self, height: int, width: int) -> None:
        import av

        self.codec = av.CodecContext.create("h264", "r")
        self.height, self.width = height, width
        self.bytes_in = 0
        self.frames_out = 0
        self.since_sps = bytearray()
        """Bytes from the last SPS NAL unit (or the stream start) on: what `resume` needs."""

    @classmethod
    def resume(cls, height: int, width: int, since_sps: bytes) -> _H264Decoder:
        """A decoder in the state of one that got `since_sps` last (the frames that re-decodes are dropped)."""
        dec = cls(height, width)
        if since_sps:
            dec.push(since_sps, final=False)
        return dec

    def _track(self, data: bytes) -> None:
        """Append to `since_sps`, cutting it at the last SPS (NAL type 7) start code, even one split across calls."""
        buf = self.since_sps
        pos = max(0, len(buf) - 3)
        buf += data
        last = -1
        while (p := buf.find(b"\x00\x00\x01", pos)) >= 0 and p + 3 < len(buf):
            if buf[p + 3] & 0x1F == 7:
                last = p
            pos = p + 1
        if last > 0:
            del buf[:last]

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
        self._track(data)
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

    def _codec_state(self, session_id: str) -> bytes:
        dec = self.codecs.get(session_id)
        return bytes(dec.since_sps) if dec is not None else b""

    def _adopt_extra(self, session_id: str, extra: dict, codec_state: bytes = b"") -> None:
        super()._adopt_extra(session_id, extra, codec_state)
        if codec_state:
            s = self.sessions[session_id].settings
            try:
                self.codecs[session_id] = _H264Decoder.resume(s.height, s.width, codec_state)
            except BadInputError as e:
                from engine.session import SnapshotError

                raise SnapshotError(f"the H.264 resync bytes of session {session_id} do not decode: {e}") from None

    @traced
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
