"""Flow-matching losses (SANA_STREAMING.md 7a) and Cycle-Reverse Regularization (7b), for both DiT variants.

    sigma = shift * s / (1 + (shift - 1) * s),  s = floor(1000 * sigmoid(N(0, 1))) / 1000   (logit-normal, shift 3)
    x_t = (1 - sigma) x0 + sigma * eps;  the model gets trunc(1000 * sigma);  loss = mean((v - (eps - x0))^2)

Text dropout for CFG replaces a sample's caption by the DiT's null caption `y_embedding` (mask unchanged, as
the release's `token_drop`); the source latents are never dropped.

Streaming (AR) variant: the clip is cut into the release's chunks (3 + T mod 3, then 3s); each chunk's loss
uses the cache of the previous chunks, written by a t = 0 forward on the *clean target* chunk (teacher forcing;
the DMD stage in `engine.train.dmd` removes the train/test mismatch by rolling out the generator itself).
Cache tensors are detached copies, so gradients never cross chunk boundaries.

Cycle-Reverse Regularization (`reverse_reg_loss`): the same generator, with its own fresh cache, denoises the
*source* from the DETACHED edited latents under the reverse prompt, one forward per chunk at an exit timestep
drawn once from the 4-step list; its cache is refreshed at t = 0 on its own detached x0 prediction.

Non-goals: optimisers and loops (engine/train/trainer.py), the DMD terms (engine/train/dmd.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.model.hybrid_dit import SanaStreamingDiT
from engine.sampler import RELEASED_TIMESTEPS, chunk_bounds

STREAMING_STEPS: tuple[int, ...] = RELEASED_TIMESTEPS[4]
"""(1000, 961, 893, 743): the generator's denoising list; sigma = t / 1000."""


def sample_sigmas(batch: int, shift: float = 3.0, generator: torch.Generator | None = None) -> Tensor:
    """(batch,) fp32 shifted logit-normal sigmas, quantised like the release (t = floor(1000 u))."""
    u = torch.sigmoid(torch.randn(batch, generator=generator))
    s = torch.floor(1000 * u).clamp(max=999) / 1000
    return shift * s / (1 + (shift - 1) * s)


def drop_text(model: SanaStreamingDiT, text: Tensor, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each sample's caption by the null caption with probability `prob` (classifier-free dropout)."""
    if prob <= 0:
        return text
    drop = torch.rand(text.shape[0], generator=generator) < prob
    null = model.y_embedder.y_embedding.to(text)[None]
    return torch.where(drop.to(text.device)[:, None, None], null, text)


def null_text(model: SanaStreamingDiT, text: Tensor) -> Tensor:
    """The null caption, shaped like `text` (B, L, D)."""
    return model.y_embedder.y_embedding.to(text)[None].expand_as(text)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator).to(x)


def flow_matching_loss(
    model: SanaStreamingDiT,
    target: Tensor,
    source: Tensor,
    text: Tensor,
    mask: Tensor,
    *,
    shift: float = 3.0,
    text_drop: float = 0.1,
    generator: torch.Generator | None = None,
    num_cached_blocks: int = 2,
    sink_token: bool = True,
) -> tuple[Tensor, Tensor]:
    """V2V flow-matching loss -> (loss, detached x0 prediction (B, C, T, h, w) for the reverse term).

    target, source: (B, C, T, h, w) normalised latents; text (B, L, D), mask (B, L)."""
    B, T = target.shape[0], target.shape[2]
    text = drop_text(model, text, text_drop, generator)
    if not model.cfg.streaming:
        sigma = sample_sigmas(B, shift, generator).to(target.device)
        eps = _randn_like(target, generator)
        s = sigma.view(B, 1, 1, 1, 1)
        x_t = (1 - s) * target + s * eps
        v = model(x_t, source, (sigma * 1000).floor(), text, mask).float()
        return F.mse_loss(v, eps - target), (x_t - s * v).detach()
    cache = model.new_cache(num_cached_blocks, sink_token)
    bounds = chunk_bounds(T)
    total, preds = target.new_zeros(()), []
    for i, (a, b) in enumerate(bounds):
        x0, src = target[:, :, a:b], source[:, :, a:b]
        sigma = sample_sigmas(B, shift, generator).to(target.device)
        eps = _randn_like(x0, generator)
        s = sigma.view(B, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        v = model(x_t, src, (sigma * 1000).floor(), text, mask, cache=cache).float()
        total = total + F.mse_loss(v, eps - x0) * (b - a) / T
        preds.append((x_t - s * v).detach())
        if i + 1 < len(bounds):
            with torch.no_grad():  # teacher-forced cache: the clean target chunk at t = 0
                model(x0, src, torch.zeros(B, device=x0.device), text, mask, cache=cache, save_cache=True)
    return total, torch.cat(preds, dim=2)


def reverse_reg_loss(
    model: SanaStreamingDiT,
    edited: Tensor,
    source: Tensor,
    reverse_text: Tensor,
    reverse_mask: Tensor,
    *,
    steps: tuple[int, ...] = STREAMING_STEPS,
    generator: torch.Generator | None = None,
    num_cached_blocks: int = 2,
    sink_token: bool = True,
) -> Tensor:
    """Cycle-Reverse Regularization: flow loss of predicting `source` back from the detached `edited` latents.

    edited, source: (B, C, T, h, w). The edited latents are detached here, so the only gradient path to the
    generator is this reverse forward. One exit timestep (from `steps`) is shared by all chunks."""
    edited = edited.detach()
    B, T = source.shape[0], source.shape[2]
    k = int(torch.randint(len(steps), (1,), generator=generator))
    sigma = steps[k] / 1000.0
    t = torch.full((B,), float(steps[k]), device=source.device)
    if not model.cfg.streaming:
        eps = _randn_like(source, generator)
        v = model((1 - sigma) * source + sigma * eps, edited, t, reverse_text, reverse_mask).float()
        return F.mse_loss(v, eps - source)
    cache = model.new_cache(num_cached_blocks, sink_token)  # its own cache, never the forward pass's
    bounds = chunk_bounds(T)
    total = source.new_zeros(())
    for i, (a, b) in enumerate(bounds):
        s0, cond = source[:, :, a:b], edited[:, :, a:b]
        eps = _randn_like(s0, generator)
        s_t = (1 - sigma) * s0 + sigma * eps
        v = model(s_t, cond, t, reverse_text, reverse_mask, cache=cache).float()
        total = total + F.mse_loss(v, eps - s0) * (b - a) / T
        if i + 1 < len(bounds):
            with torch.no_grad():  # refresh on G's own prediction, never on the clean source
                x0 = (s_t - sigma * v).detach()
                model(
                    x0, cond, torch.zeros(B, device=s0.device), reverse_text, reverse_mask, cache=cache, save_cache=True
                )
    return total
