"""BidirectionalEditor deployment: whole-clip edits (`bidirectional_short`) for StreamEdit sessions.

The bidirectional DiT attends over the whole clip, so it cannot stream: the gateway buffers a session's frames
(at most the bidirectional preset's num_frames: 81 for the 2B model, 49 for tiny) and sends the complete clip
here once; the reply is every edited frame. Each call runs `engine.pipeline.edit_bidirectional` itself (VAE
encode of the whole clip, DPM-Solver++ with CFG over all latent frames, VAE decode) with the prompt conditioning
the TextEncoder deployment computed (`_Conditioning` stands in for the text model), so the output equals
`sana-stream edit --mode bidirectional_short` on the same clip, settings and seed.

Stateless (nothing kept between calls), so it keeps Ray Serve's default routing and a lost replica only means
the gateway sends the clip again. Compute runs on one worker thread, off the event loop.
Non-goals: splitting the three stages over the streaming deployments (the clip is short: one hop is cheaper),
batching clips of several sessions, H.264 in or out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from engine.pipeline import edit_bidirectional
from engine.session import SessionSettings
from services import telemetry
from services.stage import EngineSpec, Reply, build_engine, from_array


class _Conditioning:
    """The text model's two calls in `edit_bidirectional`, answered with conditioning computed elsewhere."""

    def __init__(self, text: dict[str, torch.Tensor]) -> None:
        self.text = text

    def encode(self, prompts: list[str]):
        return self.text["embeds"], self.text["mask"]

    def encode_plain(self, prompts: list[str], truncate: bool = False):
        return self.text["neg_embeds"], self.text["neg_mask"]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4)
class BidirectionalEditor:
    def __init__(self, spec: EngineSpec) -> None:
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        telemetry.setup("bidirectional")
        self.spec = dataclasses.replace(spec, mode="bidirectional_short")
        self.engine = build_engine(self.spec, ("dit", "vae"))
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.clips = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bidirectional-compute")

    async def edit(self, frames, settings: dict, text: dict, trace=(), session_id: str | None = None) -> Reply:
        """uint8 (n, H, W, 3) clip, SessionSettings as a dict, conditioning from the TextEncoder -> Reply(value=
        the edited uint8 (n, H, W, 3) clip)."""
        with telemetry.span("bidirectional.edit", trace, session_id=session_id, sana_stage="bidirectional",
                            replica_id=self.replica_id, frames=len(frames)):  # fmt: skip
            return await self._edit(frames, settings, text)

    async def _edit(self, frames, settings: dict, text: dict) -> Reply:
        t0 = time.perf_counter()
        s = SessionSettings(**settings)
        cond = {k: from_array(v).to(self.engine.device) for k, v in text.items()}
        engine = dataclasses.replace(self.engine, text=_Conditioning(cond))
        clip = np.array(frames)  # writable: the object store hands out read-only views
        out = await asyncio.get_running_loop().run_in_executor(self._pool, edit_bidirectional, engine, clip, s)
        self.clips += 1
        return Reply(self.replica_id, (time.perf_counter() - t0) * 1e3, out, {"frames": int(out.shape[0])})

    async def spans(self, clear: bool = False) -> list[dict]:
        return telemetry.finished_spans(clear)

    async def stats(self) -> dict:
        return {"replica_id": self.replica_id, "clips": self.clips}
