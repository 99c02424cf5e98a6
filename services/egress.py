"""Egress deployment: VAE decode with the per-session decoder context, then encode-out (RGB24 or H.264).

Per session: the decoder part of the SessionState (pending latents and the blended tail of the previous tile,
`engine.vae` "Decoder state") and, for H.264 output, a libx264 encoder (ultrafast, zerolatency: one frame in,
one packet out, no B-frames). Edited latents in (array), final pixel frames out: uint8 (n, H, W, 3) or Annex-B
bytes. Output frame n of a session is input frame n edited; the final flush trims the VAE padding using the
pixel-frame count Ingest received.

Migration carries the decoder context; an H.264 encoder cannot be serialised, so a migrated H.264-out session
starts a new encoder (its next output begins with an IDR frame and fresh SPS/PPS; Annex-B decoders accept it).
Crash resume replays requests whose output the client already has with `replay=True`: decoded (the decoder
context must advance) but not encoded, so the new encoder's first frame is the first one the client gets.
Non-goals: containers (mp4 muxing is the client's), bitrate control beyond a fixed CRF.
"""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
from ray import serve

from services.routing import ROUTER_PATH, Route
from services.stage import CodecStage, from_array, traced


class _H264Encoder:
    def __init__(self, height: int, width: int, fps: float, crf: int = 18) -> None:
        import av

        self.codec = av.CodecContext.create("libx264", "w")
        self.codec.width, self.codec.height, self.codec.pix_fmt = width, height, "yuv420p"
        rate = Fraction(fps).limit_denominator(1001)
        self.codec.framerate, self.codec.time_base = rate, 1 / rate
        self.codec.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": str(crf)}
        self.pts = 0

    def push(self, frames: np.ndarray, final: bool) -> bytes:
        import av

        out = bytearray()
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = self.pts
            self.pts += 1
            for pkt in self.codec.encode(vf):
                out += bytes(pkt)
        if final:
            for pkt in self.codec.encode(None):
                out += bytes(pkt)
        return bytes(out)


@serve.deployment(
    request_router_config={"request_router_class": ROUTER_PATH},
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=16,
)
class Egress(CodecStage):
    stage = "egress"
    part = "decoder"
    model_parts = ("vae",)

    @traced
    async def decode(self, session_id: str, edited, final: bool = False, frames_in: int = 0, replay: bool = False,
                     route: Route | None = None):  # fmt: skip
        """Edited latents (array or None) -> Reply(value=uint8 frames or H.264 bytes, extra count=n).
        replay=True: the client already has these frames (crash resume): value None, nothing encoded."""
        t0 = time.perf_counter()
        state = self._state(session_id)

        def work():
            if final:
                state.cursor.frames_in = frames_in
            frames = self.editor.decode(state, from_array(edited), final=final)
            if replay:
                return None, frames.shape[0]
            if session_id not in self.h264:
                return frames, frames.shape[0]
            enc = self.codecs.get(session_id)
            if enc is None:
                s = state.settings
                enc = self.codecs[session_id] = _H264Encoder(s.height, s.width, s.fps)
            return enc.push(frames, final), frames.shape[0]

        out, n = await self._compute(work)
        return self._reply(t0, out, count=int(n), frames_out=state.cursor.frames_out)
