"""TextEncoder deployment: prompt -> DiT conditioning (embeddings + mask), cached by prompt hash, shared.

Stateless across sessions (any replica serves any prompt), so it keeps Ray Serve's default routing. The cache is
`engine.text.TextEncoder`'s LRU keyed by the prompt's sha256; `stats()` reports hits and misses. A prompt over
the DiT's text window raises `PromptTooLongError` (the gateway answers INVALID_ARGUMENT).
Non-goals: prompt enhancement, batching prompts of several sessions (prompts change rarely).
"""

from __future__ import annotations

import time

from ray import serve

from engine.pipeline import prompt_conditioning
from engine.session import SessionSettings
from engine.text import PromptTooLongError
from services import telemetry
from services.stage import BadInputError, EngineSpec, Reply, build_engine, to_array


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class TextEncoderStage:
    def __init__(self, spec: EngineSpec) -> None:
        import torch

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        telemetry.setup("text")
        self.engine = build_engine(spec, ("text",))
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.calls = 0

    async def encode(self, prompt: str, negative_prompt: str = "", cfg_scale: float = 1.0, trace=(),
                     session_id: str | None = None) -> Reply:  # fmt: skip
        """-> Reply(value={"embeds": (1, L, D), "mask": (1, L), ...} arrays) as `prompt_conditioning`."""
        t0 = time.perf_counter()
        self.calls += 1
        s = SessionSettings(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale)
        try:
            with telemetry.span("text.encode", trace, session_id=session_id, sana_stage="text",
                                replica_id=self.replica_id):  # fmt: skip
                text = prompt_conditioning(self.engine.text, s)
        except PromptTooLongError as e:  # its constructor takes keyword-only args: it does not survive pickling
            raise BadInputError(str(e).split(" Shorten it")[0] + ": shorten the prompt") from None
        return Reply(self.replica_id, (time.perf_counter() - t0) * 1e3, {k: to_array(v) for k, v in text.items()})

    async def count_tokens(self, prompt: str) -> tuple[int, int]:
        count = getattr(self.engine.text, "count_tokens", None)
        return count(prompt) if count else (0, 1 << 30)

    async def spans(self, clear: bool = False) -> list[dict]:
        return telemetry.finished_spans(clear)

    async def stats(self) -> dict:
        t = self.engine.text
        return {"replica_id": self.replica_id, "calls": self.calls, "hits": getattr(t, "_hits", 0),
                "misses": getattr(t, "_misses", 0)}  # fmt: skip
