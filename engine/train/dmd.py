"""The streaming stage (SANA_STREAMING.md 7b): chunk-wise generator rollout with the state cache, the
distribution-matching (DMD) loss against a frozen bidirectional teacher, and the trainable critic's loss.

Rollout (`rollout`): per chunk (the release's 3 + T mod 3, then 3s), start from noise, run the 4-step list
(1000, 961, 893, 743) with *stochastic re-noising* (x0 = x - sigma v, then x = (1 - sigma') x0 + sigma' eps),
exit at step k (one k for all chunks); only the exit forward keeps gradients. Then, unless it is the last chunk,
the t = 0 forward on the detached x0 writes the cache (the inference refresh).

DMD (`dmd_loss`): t ~ U{0..999} shifted by 8 (t' = 8t / (1 + 7t/1000)), clamped to [20, 980];
x_t = (1 - sigma) x_hat + sigma eps; x0_real = c + g (c - u) from the frozen teacher (c: prompt, u: null caption;
g = 0 skips the unconditional forward); x0_fake from the critic;
grad = (x0_fake - x0_real) / mean|x_hat - x0_real|;  L = 0.5 mse(x_hat, sg(x_hat - grad)).
Critic (`critic_loss`): flow MSE of the critic on detached generator samples at a shifted random t.

Non-goals: the optimiser schedule and the generator EMA (engine/train/trainer.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.model.hybrid_dit import SanaStreamingDiT
from engine.sampler import chunk_bounds
from engine.train.flow import STREAMING_STEPS, null_text


def rollout(
    gen: SanaStreamingDiT,
    source: Tensor,
    text: Tensor,
    mask: Tensor,
    *,
    exit_step: int,
    steps: tuple[int, ...] = STREAMING_STEPS,
    generator: torch.Generator | None = None,
    num_cached_blocks: int = 2,
    sink_token: bool = True,
) -> Tensor:
    """Edited latents (B, C, T, h, w) from a chunk-wise generator rollout; grad only through the exit forwards."""
    if not gen.cfg.streaming:
        raise ValueError("the rollout needs the streaming (AR) generator")
    if not 0 <= exit_step < len(steps):
        raise ValueError(f"exit_step {exit_step} outside [0, {len(steps)})")
    B, T = source.shape[0], source.shape[2]
    cache = gen.new_cache(num_cached_blocks, sink_token)
    bounds = chunk_bounds(T)
    outs = []
    for c, (a, b) in enumerate(bounds):
        src = source[:, :, a:b]
        x = torch.randn(src.shape, generator=generator).to(src)
        for i in range(exit_step + 1):
            sigma = steps[i] / 1000.0
            t = torch.full((B,), float(steps[i]), device=src.device)
            with torch.set_grad_enabled(torch.is_grad_enabled() and i == exit_step):
                x0 = x - sigma * gen(x, src, t, text, mask, cache=cache).float()
            if i < exit_step:
                nxt = steps[i + 1] / 1000.0
                x = ((1 - nxt) * x0 + nxt * torch.randn(src.shape, generator=generator).to(src)).detach()
        outs.append(x0)
        if c + 1 < len(bounds):
            with torch.no_grad():
                gen(x0.detach(), src, torch.zeros(B, device=src.device), text, mask, cache=cache, save_cache=True)
    return torch.cat(outs, dim=2)


def sample_dmd_sigma(batch: int, shift: float = 8.0, generator: torch.Generator | None = None) -> Tensor:
    """(batch,) sigmas: t ~ U{0..999}, t' = shift t / (1 + (shift - 1) t / 1000) clamped to [20, 980], / 1000.

    One t per sample, shared by all its frames."""
    t = torch.randint(0, 1000, (batch,), generator=generator).float()
    t = shift * t / (1 + (shift - 1) * t / 1000)
    return t.clamp(20, 980).floor() / 1000


def _x0(model: SanaStreamingDiT, x_t: Tensor, sigma: Tensor, source: Tensor, text: Tensor, mask: Tensor) -> Tensor:
    s = sigma.view(-1, 1, 1, 1, 1)
    return x_t - s * model(x_t, source, sigma * 1000, text, mask).float()


def dmd_loss(
    x_hat: Tensor,
    teacher: SanaStreamingDiT,
    critic: SanaStreamingDiT,
    source: Tensor,
    text: Tensor,
    mask: Tensor,
    *,
    guidance: float = 3.0,
    shift: float = 8.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Distribution-matching loss of generated latents `x_hat` (B, C, T, h, w) (grad flows into x_hat only)."""
    B = x_hat.shape[0]
    sigma = sample_dmd_sigma(B, shift, generator).to(x_hat.device)
    s = sigma.view(B, 1, 1, 1, 1)
    with torch.no_grad():
        x_t = (1 - s) * x_hat.detach() + s * torch.randn(x_hat.shape, generator=generator).to(x_hat)
        x0_fake = _x0(critic, x_t, sigma, source, text, mask)
        x0_real = _x0(teacher, x_t, sigma, source, text, mask)
        if guidance != 0:
            uncond = _x0(teacher, x_t, sigma, source, null_text(teacher, text), mask)
            x0_real = x0_real + guidance * (x0_real - uncond)
        norm = (x_hat.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * F.mse_loss(x_hat.float(), (x_hat - grad).detach().float())


def critic_loss(
    critic: SanaStreamingDiT,
    x_hat: Tensor,
    source: Tensor,
    text: Tensor,
    mask: Tensor,
    *,
    shift: float = 8.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Flow-matching loss of the critic (fake score) on detached generator samples."""
    x0 = x_hat.detach()
    B = x0.shape[0]
    sigma = sample_dmd_sigma(B, shift, generator).to(x0.device)
    s = sigma.view(B, 1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    v = critic((1 - s) * x0 + s * eps, source, sigma * 1000, text, mask).float()
    return F.mse_loss(v, eps - x0)
