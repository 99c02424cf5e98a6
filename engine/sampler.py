"""Flow-matching samplers of SANA-Streaming: the streaming Euler schedule and the bidirectional DPM-Solver.

Streaming (per chunk, a fresh schedule each chunk like the release):
    steps 4 -> t = [1000, 961, 893, 743], steps 2 -> [1000, 743], sigma = t / 1000 (fp32) then 0;
    any other count -> diffusers `FlowMatchEulerDiscreteScheduler(shift=flow_shift)`.
    Update x <- x + (sigma_next - sigma) v, computed in fp32 and rounded to v's dtype (bf16 on the GPU path), as
    diffusers' Euler step does; deterministic.

Bidirectional (`bidirectional_short`): 50-step second-order multistep DPM-Solver++ on flow sigmas with shift,
classifier-free guidance 6.0, through diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True,
prediction_type="flow_prediction")`. The release's own DPMS ("time_uniform_flow") spaces its times the same way up
to the first step (diffusers starts at 1 - 1/1000); the difference is below what a 50-step solve resolves.

Non-goals: the chunk loop and caches (engine/pipeline.py).
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

RELEASED_TIMESTEPS: dict[int, tuple[int, ...]] = {4: (1000, 961, 893, 743), 2: (1000, 743)}

CHUNK_FRAMES = 3
"""Latent frames per streaming chunk (24 pixel frames // temporal compression 8)."""


def chunk_bounds(num_latents: int, chunk: int = CHUNK_FRAMES) -> list[tuple[int, int]]:
    """The release's chunking of a clip of known length: [start, end) latent frames per chunk, the first chunk
    taking chunk + (T mod chunk) frames when T > chunk (`create_autoregressive_segments`), one chunk otherwise."""
    if num_latents <= chunk:
        return [(0, num_latents)]
    first = chunk + num_latents % chunk
    return [(0, first)] + [(a, a + chunk) for a in range(first, num_latents, chunk)]


DEFAULT_NEGATIVE_PROMPT = (
    "A chaotic sequence with misshapen, deformed limbs in heavy motion blur, sudden disappearance, jump cuts, "
    "jerky movements, rapid shot changes, frames out of sync, inconsistent character shapes, temporal artifacts, "
    "jitter, and ghosting effects, creating a disorienting visual experience."
)
"""Default negative prompt of the bidirectional mode (the streaming mode's is empty)."""


def bidirectional_prompt(prompt: str, motion_score: int = 10) -> str:
    """The bidirectional mode's prompt: stripped, with ' motion score: N.' appended when N > 0."""
    prompt = prompt.strip()
    return f"{prompt} motion score: {int(motion_score)}." if motion_score > 0 else prompt


_DEVICE_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}
"""(device, timesteps, sigmas) -> the device tables: shared by every schedule (sessions make one per chunk)."""


class StreamingSchedule:
    """The per-chunk timestep list and Euler update of the streaming sampler."""

    def __init__(self, steps: int = 4, flow_shift: float = 8.0) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        if steps in RELEASED_TIMESTEPS:
            self.timesteps = torch.tensor(RELEASED_TIMESTEPS[steps], dtype=torch.int64)
            self.sigmas = torch.cat([self.timesteps / 1000, torch.zeros(1)]).float()
        else:
            sched = FlowMatchEulerDiscreteScheduler(shift=flow_shift)
            sched.set_timesteps(steps)
            self.timesteps = sched.timesteps.clone()
            self.sigmas = sched.sigmas.clone().float()
        self._device_tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return self.steps

    def _on(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(timesteps, sigma steps) on `device`, copied there once: a copy from pageable host memory per forward
        would stall the host until the device caught up (a sync per step)."""
        device = torch.device(device)
        cached = self._device_tables.get(device)
        if cached is None:
            key = (device, self.timesteps.numpy().tobytes(), self.sigmas.numpy().tobytes())
            cached = _DEVICE_TABLES.get(key)
            if cached is None:  # once per process and device: a pageable copy waits for the device to drain
                cached = (self.timesteps.to(device), (self.sigmas[1:] - self.sigmas[:-1]).to(device))
                _DEVICE_TABLES[key] = cached
            self._device_tables[device] = cached
        return cached

    def timestep(self, i: int, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """The model's timestep input for step i, (batch,)."""
        if not 0 <= i < self.steps:
            raise ValueError(f"step {i} outside [0, {self.steps})")
        return self._on(device)[0][i].expand(batch)

    def step(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        """Euler update of step i: fp32 x + (sigma_{i+1} - sigma_i) v, rounded to v's dtype, returned as fp32."""
        dt = self._on(x.device)[1][i]
        return (x.float() + dt * v).to(v.dtype).float()


def cfg_combine(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: v_u + scale (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def make_bidirectional_scheduler(steps: int = 50, flow_shift: float = 8.0) -> DPMSolverMultistepScheduler:
    """Second-order multistep DPM-Solver++ on shifted flow sigmas (the release's `DPMS`, model_type flow)."""
    sched = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
    )
    sched.set_timesteps(steps)
    return sched
