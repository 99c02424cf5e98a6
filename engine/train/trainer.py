"""Training loops: VAE autoencoder warm-up, V2V flow matching (optionally + Cycle-Reverse Regularization), and
the streaming DMD stage (+ CRR). CPU for tests, one GPU for real runs.

Data: `LatentData` holds VAE latents of every example (sources, targets when present) and the text encoder's
embeddings of every distinct prompt, computed once with the frozen VAE and text encoder (`encode_examples`).

Run folder (resumable: a rerun with the same folder continues from the last save):
    checkpoint.pt      the model(s) in a layout `engine.weights.load_model` reads:
                       flow stage {"state_dict": sd};  streaming stage {"generator": {"model." + k},
                       "critic": {"model." + k}} (the release's long trainer layout)
    train_state.pt     optimiser state(s) and the step
    weights.safetensors  the trained DiT (generator) as a flat safetensors file, ready for inference
    log.jsonl          one JSON object per logged step (step, losses, lr, seconds)

Optimiser (7a): AdamW, eps 1e-10, no weight decay, linear warm-up then constant (or, `lr_schedule="cosine"`, a
cosine decay over whichever of `steps` and `time_budget_s` runs out first), gradient clipping. Batches are drawn
from a generator seeded by (seed, step), so a resumed run sees the batches the uninterrupted one would.

EMA (7b: "generator EMA 0.99 from step 200"): with `ema_decay` > 0 an exponential moving average of the trained
DiT's weights starts at optimiser step `ema_start` (generator steps in the streaming stage) and is written next
to the raw weights as `weights_ema.safetensors` (and kept in train_state.pt for resumption).

Non-goals: multi-GPU (FSDP), mixed precision for the DiT, gradient checkpointing (the tiny preset needs none).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.model.hybrid_dit import SanaStreamingDiT
from engine.train.dmd import critic_loss, dmd_loss, rollout
from engine.train.flow import STREAMING_STEPS, flow_matching_loss, reverse_reg_loss
from engine.weights import load_state_dict_file, save_checkpoint

Log = Callable[[dict], None]


# --- data -----------------------------------------------------------------------------------------------


@dataclass
class LatentData:
    """Encoded examples. source/target (N, C, T, h, w); text (P, L, D) and mask (P, L) per distinct prompt;
    prompt_id / reverse_id (N,) index into them; target None when no example has one."""

    source: Tensor
    target: Tensor | None
    text: Tensor
    mask: Tensor
    prompt_id: Tensor
    reverse_id: Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return self.source.shape[0]

    def to(self, device: torch.device | str) -> LatentData:
        """The same data with every tensor on `device` (batches then need no host-to-device copy)."""
        return dataclasses.replace(
            self, **{k: v.to(device) for k, v in dataclasses.asdict(self).items() if isinstance(v, Tensor)}
        )

    def batch(self, idx: Tensor, device: torch.device) -> dict[str, Tensor]:
        out = {
            "source": self.source[idx].to(device),
            "text": self.text[self.prompt_id[idx]].to(device),
            "mask": self.mask[self.prompt_id[idx]].to(device),
            "reverse_text": self.text[self.reverse_id[idx]].to(device),
            "reverse_mask": self.mask[self.reverse_id[idx]].to(device),
        }
        if self.target is not None:
            out["target"] = self.target[idx].to(device)
        return out

    def save(self, path: str | Path) -> None:
        torch.save({k: v for k, v in dataclasses.asdict(self).items()}, path)

    @classmethod
    def load(cls, path: str | Path) -> LatentData:
        return cls(**torch.load(path, weights_only=True))


@torch.no_grad()
def encode_examples(
    examples, vae, text_encoder, height: int, width: int, num_frames: int, batch: int = 8, frames: Tensor | None = None
) -> LatentData:
    """Render/read each example, encode sources and targets with `vae` (whole-clip, causal) and prompts with
    `text_encoder`. `num_frames` must be 8k + 1 (clips are cut to it). `frames`: already rendered pairs,
    uint8 (2N, F, H, W, 3) with source i at 2i and its target at 2i + 1 (skips reading/rendering)."""
    from engine.data.manifest import load_pair
    from engine.video_io import frames_to_tensor

    prompts = sorted({p for e in examples for p in (e.prompt, e.reverse_prompt or e.prompt)})
    pid = {p: i for i, p in enumerate(prompts)}
    text, mask = text_encoder.encode(prompts)
    srcs, tgts = [], []
    has_target = all(e.target is not None or e.spec is not None for e in examples)
    for i in range(0, len(examples), batch):
        if frames is not None:
            chunk = frames[2 * i : 2 * (i + batch), :num_frames].numpy()
            pairs = [(chunk[j], chunk[j + 1]) for j in range(0, chunk.shape[0], 2)]
        else:
            pairs = [load_pair(e, height, width, num_frames) for e in examples[i : i + batch]]
        src = torch.stack([frames_to_tensor(s) for s, _ in pairs])
        srcs.append(vae.encode(src.to(vae.device, vae.dtype)).float().cpu())
        if has_target:
            tgt = torch.stack([frames_to_tensor(t) for _, t in pairs])
            tgts.append(vae.encode(tgt.to(vae.device, vae.dtype)).float().cpu())
    return LatentData(
        source=torch.cat(srcs),
        target=torch.cat(tgts) if has_target else None,
        text=text.float().cpu(),
        mask=mask.cpu(),
        prompt_id=torch.tensor([pid[e.prompt] for e in examples]),
        reverse_id=torch.tensor([pid[e.reverse_prompt or e.prompt] for e in examples]),
        prompts=prompts,
    )


# --- configs --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters of one stage (defaults: the release's where they apply, scaled for small models)."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 5e-5
    """Generator / model learning rate (release: 5e-5 flow stage, 1e-5 streaming stage)."""
    critic_lr: float = 2e-6
    warmup: int = 500
    grad_clip: float = 0.1
    shift: float = 3.0
    """Flow stage timestep shift (7a)."""
    text_drop: float = 0.1
    reverse_reg_weight: float = 0.0
    """Cycle-Reverse Regularization weight (release 0.5 in the streaming stage; 0 disables it)."""
    guidance: float = 3.0
    """DMD teacher CFG scale g in x0_real = c + g (c - u); 0 = no unconditional forward."""
    critic_ratio: int = 4
    """Streaming stage: one generator update every `critic_ratio` critic updates (release: 4)."""
    num_cached_blocks: int = 2
    sink_token: bool = True
    seed: int = 0
    log_every: int = 25
    save_every: int = 500
    time_budget_s: float | None = None
    """Stop (and save) after this many seconds of this call, whatever `steps` says."""
    lr_schedule: str = "constant"
    """"constant" after warm-up, or "cosine": decay to `lr_min_ratio` x lr over the run (steps or time budget,
    whichever ends first; progress is measured from the start of this call)."""
    lr_min_ratio: float = 0.05
    ema_decay: float = 0.0
    """EMA of the trained weights (0 = off; release streaming stage: 0.99)."""
    ema_start: int = 200
    """Optimiser step (generator step in the streaming stage) at which the EMA starts as a copy of the weights."""
    bf16: bool = False
    """VAE stage only: bf16 autocast for forward and backward (weights and optimiser stay fp32)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.critic_ratio < 1:
            raise ValueError("steps >= 0, batch_size >= 1 and critic_ratio >= 1 are required")
        if self.reverse_reg_weight < 0:
            raise ValueError(f"reverse_reg_weight must be >= 0, got {self.reverse_reg_weight}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def training_init(model: SanaStreamingDiT, seed: int = 0) -> SanaStreamingDiT:
    """Module-default init (PyTorch defaults + the GDN's release gates), final projection zeroed (v = 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(model.cfg)
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.zero_()
    return model


def _adamw(params, lr: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-10, weight_decay=0.0)


def _set_lr(opt: torch.optim.Optimizer, base: float, step: int, warmup: int, scale: float = 1.0) -> float:
    lr = base * scale * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def _lr_scale(cfg: TrainConfig, step: int, first_step: int, steps: int, t0: float) -> float:
    """Multiplier of the base lr: 1 (constant) or the cosine decay at this call's progress."""
    if cfg.lr_schedule == "constant":
        return 1.0
    done = (step - first_step) / max(steps - first_step, 1)
    if cfg.time_budget_s:
        done = max(done, (time.perf_counter() - t0) / cfg.time_budget_s)
    done = min(max(done, 0.0), 1.0)
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * done))


class Ema:
    """Exponential moving average of a module's floating-point parameters and buffers (fp32 copies)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)

    def state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """A full state dict of `model` with the averaged tensors in its dtypes."""
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in model.state_dict().items()}


def _ema_step(ema: Ema | None, model: torch.nn.Module, cfg: TrainConfig, step: int) -> Ema | None:
    """After optimiser step `step` (1-based): start the EMA at `ema_start`, then update it."""
    if cfg.ema_decay <= 0 or step < cfg.ema_start:
        return ema
    if ema is None:
        return Ema(model, cfg.ema_decay)
    ema.update(model)
    return ema


def _load_ema(state: dict, model: torch.nn.Module, cfg: TrainConfig) -> Ema | None:
    if cfg.ema_decay <= 0 or state.get("ema") is None:
        return None
    ema = Ema(model, cfg.ema_decay)
    ema.shadow = {k: v.float() for k, v in state["ema"].items()}
    return ema


def _save_ema(ema: Ema | None, model: torch.nn.Module, run_dir: Path) -> None:
    """weights_ema.safetensors: the EMA, or the raw weights while the EMA has not started."""
    sd = ema.state_dict(model) if ema is not None else model.state_dict()
    save_checkpoint(sd, run_dir / "weights_ema.safetensors")


def _batch_index(n: int, size: int, seed: int, step: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (size,), generator=g)


class _RunLog:
    def __init__(self, run_dir: Path, echo: Log | None) -> None:
        self.path = run_dir / "log.jsonl"
        self.echo = echo

    def __call__(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.echo:
            self.echo(row)


def _out_of_time(t0: float, cfg: TrainConfig) -> bool:
    return cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prefixed(model: torch.nn.Module) -> dict[str, Tensor]:
    return {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}


# --- flow matching ----------------------------------------------------------------------------------------


def train_flow(
    model: SanaStreamingDiT, data: LatentData, cfg: TrainConfig, run_dir: str | Path, log: Log | None = print
) -> dict:
    """V2V flow matching (either DiT variant), plus `reverse_reg_weight` x CRR on the model's own detached x0
    estimate (the ablation "CRR with plain flow matching"). Needs targets. Returns the last logged row."""
    if data.target is None:
        raise ValueError("flow matching needs target latents (manifest rows with a target video or a spec)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = _device_of(model)
    opt = _adamw(model.parameters(), cfg.lr)
    step, ema = 0, None
    if (run_dir / "train_state.pt").exists():
        model.load_state_dict(load_state_dict_file(run_dir / "checkpoint.pt"))
        state = torch.load(run_dir / "train_state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        ema = _load_ema(state, model, cfg)
    write = _RunLog(run_dir, log)
    model.train()
    t0, row, acc, first = time.perf_counter(), {}, [], step

    def save() -> None:
        save_checkpoint(model.state_dict(), run_dir / "checkpoint.pt", layout="state_dict")
        save_checkpoint(model.state_dict(), run_dir / "weights.safetensors")
        if cfg.ema_decay > 0:
            _save_ema(ema, model, run_dir)
        torch.save(
            {"optimizer": opt.state_dict(), "step": step, "ema": None if ema is None else ema.shadow},
            run_dir / "train_state.pt",
        )

    while step < cfg.steps:
        if _out_of_time(t0, cfg):
            break
        lr = _set_lr(opt, cfg.lr, step, cfg.warmup, _lr_scale(cfg, step, first, cfg.steps, t0))
        b = data.batch(_batch_index(len(data), cfg.batch_size, cfg.seed, step), device)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        loss, x0 = flow_matching_loss(
            model, b["target"], b["source"], b["text"], b["mask"], shift=cfg.shift, text_drop=cfg.text_drop,
            generator=gen, num_cached_blocks=cfg.num_cached_blocks, sink_token=cfg.sink_token,
        )  # fmt: skip
        total, rev = loss, torch.zeros(())
        if cfg.reverse_reg_weight > 0:
            rev = reverse_reg_loss(model, x0, b["source"], b["reverse_text"], b["reverse_mask"], generator=gen)
            total = loss + cfg.reverse_reg_weight * rev
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        ema = _ema_step(ema, model, cfg, step)
        acc.append(torch.stack([loss.detach(), rev.detach().to(loss.device), gnorm.detach().to(loss.device)]))
        if step % cfg.log_every == 0 or step == cfg.steps or _out_of_time(t0, cfg):
            m = torch.stack(acc).mean(0).tolist()
            row = {"stage": "flow", "step": step, "loss": m[0], "reverse": m[1], "grad_norm": m[2], "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            write(row)
            acc = []
        if step % cfg.save_every == 0:
            save()
    save()
    model.eval()
    return row


# --- streaming DMD + CRR ----------------------------------------------------------------------------------


def train_streaming(
    generator: SanaStreamingDiT,
    teacher: SanaStreamingDiT,
    critic: SanaStreamingDiT,
    data: LatentData,
    cfg: TrainConfig,
    run_dir: str | Path,
    log: Log | None = print,
) -> dict:
    """Self-forcing DMD against the frozen bidirectional `teacher` with a trainable `critic` (bidirectional),
    plus `reverse_reg_weight` x Cycle-Reverse Regularization. Targets are not used. Returns the last logged row."""
    if not generator.cfg.streaming or teacher.cfg.streaming or critic.cfg.streaming:
        raise ValueError("expected a streaming generator and bidirectional teacher and critic")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = _device_of(generator)
    teacher.eval().requires_grad_(False)
    opt_g = _adamw(generator.parameters(), cfg.lr, betas=(0.0, 0.999))
    opt_c = _adamw(critic.parameters(), cfg.critic_lr, betas=(0.0, 0.999))
    step, ema = 0, None
    if (run_dir / "train_state.pt").exists():
        generator.load_state_dict(load_state_dict_file(run_dir / "checkpoint.pt"))
        critic.load_state_dict(load_state_dict_file(run_dir / "checkpoint.pt", select="critic"))
        state = torch.load(run_dir / "train_state.pt", weights_only=True)
        opt_g.load_state_dict(state["optimizer"])
        opt_c.load_state_dict(state["critic_optimizer"])
        step = int(state["step"])
        ema = _load_ema(state, generator, cfg)
    write = _RunLog(run_dir, log)
    generator.train()
    critic.train()
    t0, row, acc, first = time.perf_counter(), {}, [], step

    def save() -> None:
        obj = {"generator": _prefixed(generator), "critic": _prefixed(critic)}
        torch.save(obj, run_dir / "checkpoint.pt")
        save_checkpoint(generator.state_dict(), run_dir / "weights.safetensors")
        if cfg.ema_decay > 0:
            _save_ema(ema, generator, run_dir)
        torch.save(
            {"optimizer": opt_g.state_dict(), "critic_optimizer": opt_c.state_dict(), "step": step,
             "ema": None if ema is None else ema.shadow},
            run_dir / "train_state.pt",
        )  # fmt: skip

    while step < cfg.steps:
        if _out_of_time(t0, cfg):
            break
        b = data.batch(_batch_index(len(data), cfg.batch_size, cfg.seed, step), device)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        gen_step = step % cfg.critic_ratio == 0
        exit_step = int(torch.randint(len(STREAMING_STEPS), (1,), generator=gen))
        with torch.set_grad_enabled(gen_step):
            x_hat = rollout(
                generator, b["source"], b["text"], b["mask"], exit_step=exit_step, generator=gen,
                num_cached_blocks=cfg.num_cached_blocks, sink_token=cfg.sink_token,
            )  # fmt: skip
        l_dmd = l_rev = torch.zeros(())
        scale = _lr_scale(cfg, step, first, cfg.steps, t0)
        if gen_step:
            _set_lr(opt_g, cfg.lr, step // cfg.critic_ratio, cfg.warmup, scale)
            l_dmd = dmd_loss(x_hat, teacher, critic, b["source"], b["text"], b["mask"], guidance=cfg.guidance,
                             generator=gen)  # fmt: skip
            total = l_dmd
            if cfg.reverse_reg_weight > 0:
                l_rev = reverse_reg_loss(
                    generator, x_hat, b["source"], b["reverse_text"], b["reverse_mask"], generator=gen,
                    num_cached_blocks=cfg.num_cached_blocks, sink_token=cfg.sink_token,
                )  # fmt: skip
                total = total + cfg.reverse_reg_weight * l_rev
            opt_g.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip)
            opt_g.step()
            ema = _ema_step(ema, generator, cfg, step // cfg.critic_ratio + 1)
        _set_lr(opt_c, cfg.critic_lr, step, cfg.warmup, scale)
        l_crit = critic_loss(critic, x_hat.detach(), b["source"], b["text"], b["mask"], generator=gen)
        opt_c.zero_grad(set_to_none=True)
        l_crit.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
        opt_c.step()
        step += 1
        with torch.no_grad():
            paired = F.mse_loss(x_hat, b["target"]).item() if "target" in b else float("nan")
        acc.append((l_dmd.item() if gen_step else float("nan"), l_rev.item() if gen_step else float("nan"),
                    l_crit.item(), paired))  # fmt: skip
        if step % cfg.log_every == 0 or step == cfg.steps or _out_of_time(t0, cfg):
            m = torch.tensor(acc).nanmean(0).tolist()
            row = {"stage": "streaming", "step": step, "generator_steps": (step - 1) // cfg.critic_ratio + 1,
                   "dmd": m[0], "reverse": m[1], "critic": m[2], "mse_to_target": m[3],
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            write(row)
            acc = []
        if step % cfg.save_every == 0:
            save()
    save()
    generator.eval()
    critic.eval()
    return row


# --- VAE warm-up ------------------------------------------------------------------------------------------


def train_vae(
    vae,
    sample_clips: Callable[[int, torch.Generator], Tensor],
    cfg: TrainConfig,
    run_dir: str | Path,
    log: Log | None = print,
    stats_clips: Tensor | None = None,
    decoder_only: bool = False,
) -> dict:
    """Train a `VideoVAE`'s diffusers model as a plain autoencoder (posterior mode, no sampling):
    L1 + MSE reconstruction + 1e-4 mean(z^2), cosine lr over the run (steps or time budget; warm-up first),
    optional bf16 autocast (`cfg.bf16`). `sample_clips(batch, generator)` -> (B, 3, 8k + 1, H, W) in [-1, 1]
    on the VAE's device. Afterwards the latent normalisation buffers (latents_mean / latents_std) are set from
    the per-channel statistics of `stats_clips` (or of fresh samples), so encoded latents are ~N(0, 1).
    `decoder_only`: the encoder and the normalisation stay frozen, so latents (and DiTs trained on them) keep
    their meaning while the decoder improves. Writes `vae.safetensors` (loadable with `VideoVAE(cfg, path)`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = vae.model
    model.train().requires_grad_(True)
    if decoder_only:
        model.encoder.eval().requires_grad_(False)
    opt = _adamw([p for p in model.parameters() if p.requires_grad], cfg.lr)
    sched = dataclasses.replace(cfg, lr_schedule="cosine")
    write = _RunLog(run_dir, log)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    t0, row, acc, step = time.perf_counter(), {}, [], 0
    while step < cfg.steps:
        if _out_of_time(t0, cfg):
            break
        lr = _set_lr(opt, cfg.lr, step, cfg.warmup, _lr_scale(sched, step, 0, cfg.steps, t0))
        x = sample_clips(cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 7919 + step))
        with autocast:
            with torch.set_grad_enabled(not decoder_only):
                z = model.encode(x, causal=True).latent_dist.mode()
            y = model.decoder(z, None, causal=False)
        y = y.float()
        mse = F.mse_loss(y, x)
        rec = F.l1_loss(y, x) + mse
        loss = rec + 1e-4 * z.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            psnr = -10 * torch.log10(F.mse_loss(y.clamp(-1, 1), x) / 4)
        acc.append(torch.stack([rec.detach(), psnr]))
        if step % cfg.log_every == 0 or step == cfg.steps or _out_of_time(t0, cfg):
            m = torch.stack(acc).mean(0).tolist()
            row = {"stage": "vae", "step": step, "recon": m[0], "psnr": m[1], "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            write(row)
            acc = []
    model.eval().requires_grad_(False)
    with torch.no_grad():
        if decoder_only:
            save_checkpoint(model.state_dict(), run_dir / "vae.safetensors")
            return row
        clips = stats_clips if stats_clips is not None else sample_clips(32, torch.Generator().manual_seed(1))
        zs = torch.cat([model.encode(c[None], causal=True).latent_dist.mode() for c in clips])  # (N, C, T, h, w)
        model.latents_mean.copy_(zs.mean(dim=(0, 2, 3, 4)))
        model.latents_std.copy_(zs.std(dim=(0, 2, 3, 4)).clamp_min(1e-4))
    save_checkpoint(model.state_dict(), run_dir / "vae.safetensors")
    return row


@torch.no_grad()
def vae_psnr(vae, clips) -> dict:
    """Reconstruction PSNR (dB, uint8 frames like `sana-stream eval`) of whole clips through the inference path:
    causal whole-clip `encode`, then the tiled `decode`. clips: uint8 (n, F, H, W, 3) arrays, F = 8k + 1.
    Returns {"psnr": mean over clips of the per-clip PSNR, "psnr_pooled": PSNR of the pooled MSE, "clips": n}."""
    from engine.video_io import frames_to_tensor, frames_to_uint8

    per, sq = [], []
    for c in clips:
        x = frames_to_tensor(c)[None].to(vae.device, vae.dtype)
        y = frames_to_uint8(vae.decode(vae.encode(x))[0].float().cpu())
        mse = float(((y.astype("float64") - c.astype("float64")) ** 2).mean())
        sq.append(mse)
        per.append(10 * math.log10(255.0**2 / max(mse, 1e-10)))
    pooled = 10 * math.log10(255.0**2 / max(sum(sq) / len(sq), 1e-10))
    return {"psnr": sum(per) / len(per), "psnr_pooled": pooled, "clips": len(per)}


# --- flow matching with the text encoder trained jointly -------------------------------------------------


def text_forward(text_encoder, ids: Tensor, mask: Tensor) -> Tensor:
    """`TextEncoder.encode`'s embeddings with gradients: (P, max_length) token ids / mask -> (P, L, hidden) fp32.
    Same maths as `TextEncoder._forward` (chi prefix: BOS + the last L - 1 positions of the window)."""
    hidden = text_encoder.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    if text_encoder.cfg.use_chi_prompt:
        hidden = hidden.index_select(1, text_encoder.keep_index.to(hidden.device))
    return hidden.float()


def train_flow_text(
    models: dict[str, SanaStreamingDiT],
    text_encoder,
    data: LatentData,
    cfg: TrainConfig,
    run_dir: str | Path,
    log: Log | None = print,
    text_lr: float | None = None,
) -> dict:
    """V2V flow matching of several DiTs (e.g. the bidirectional teacher and the streaming generator) and the
    tiny text encoder, jointly: loss = sum over models of each one's flow-matching loss, with every model's
    caption computed by the shared `text_encoder` (a `engine.text.TextEncoder`) from `data.prompts` in the
    step, so its gradients reach the encoder. All of `data.prompts` are encoded once per step (a tiny encoder
    and ~100 prompts); each model draws its own batch. One AdamW over everything (the encoder's lr:
    `text_lr`, default `cfg.lr`), one clip of the joint gradient norm, an EMA of every module.

    Writes `<run_dir>/<name>/weights(_ema).safetensors` per model and `<run_dir>/text_encoder(_ema).safetensors`
    (the Gemma-2 state dict; `TextEncoder(cfg, weights=file)` loads it). Not resumable (a rerun starts over).
    Returns the last logged row."""
    if data.target is None:
        raise ValueError("flow matching needs target latents")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = list(models)
    device = _device_of(models[names[0]])
    te = text_encoder.model
    te.train().requires_grad_(True)
    ids, id_mask = text_encoder.tokenize(list(data.prompts))
    ids, id_mask = ids.to(device), id_mask.to(device)
    prompt_mask = data.mask.to(device)
    groups = [{"params": [p for m in models.values() for p in m.parameters()], "lr": cfg.lr},
              {"params": list(te.parameters()), "lr": text_lr or cfg.lr}]  # fmt: skip
    opt = _adamw(groups, cfg.lr)
    base = [g["lr"] for g in opt.param_groups]
    emas: dict[str, Ema | None] = {n: None for n in [*names, "text_encoder"]}
    modules: dict[str, torch.nn.Module] = {**models, "text_encoder": te}
    write = _RunLog(run_dir, log)
    for m in models.values():
        m.train()
    t0, row, acc, step = time.perf_counter(), {}, [], 0

    def save() -> None:
        for n, m in models.items():
            (run_dir / n).mkdir(exist_ok=True)
            save_checkpoint(m.state_dict(), run_dir / n / "weights.safetensors")
            _save_ema(emas[n], m, run_dir / n)
        save_checkpoint(te.state_dict(), run_dir / "text_encoder.safetensors")
        sd = emas["text_encoder"].state_dict(te) if emas["text_encoder"] is not None else te.state_dict()
        save_checkpoint(sd, run_dir / "text_encoder_ema.safetensors")

    while step < cfg.steps:
        if _out_of_time(t0, cfg):
            break
        scale = _lr_scale(cfg, step, 0, cfg.steps, t0)
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
        for g, b0 in zip(opt.param_groups, base, strict=True):
            g["lr"] = b0 * scale * warm
        emb = text_forward(text_encoder, ids, id_mask)  # (P, L, D), with grad
        losses = []
        for k, m in enumerate(models.values()):
            idx = _batch_index(len(data), cfg.batch_size, cfg.seed + 101 * k, step).to(device)
            pid = data.prompt_id.to(device)[idx]
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + 131 * k + step)
            loss, _ = flow_matching_loss(
                m, data.target[idx].to(device), data.source[idx].to(device), emb[pid], prompt_mask[pid],
                shift=cfg.shift, text_drop=cfg.text_drop, generator=gen, num_cached_blocks=cfg.num_cached_blocks,
                sink_token=cfg.sink_token,
            )  # fmt: skip
            losses.append(loss)
        total = torch.stack(losses).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        step += 1
        for n, m in modules.items():
            emas[n] = _ema_step(emas[n], m, cfg, step)
        acc.append(torch.stack([*[x.detach() for x in losses], gnorm.detach().to(total.device)]))
        if step % cfg.log_every == 0 or step == cfg.steps or _out_of_time(t0, cfg):
            mean = torch.stack(acc).mean(0).tolist()
            row = {"stage": "flow_text", "step": step, **{f"loss_{n}": mean[i] for i, n in enumerate(names)},
                   "grad_norm": mean[-1], "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            write(row)
            acc = []
    save()
    for m in models.values():
        m.eval()
    te.eval().requires_grad_(False)
    return row
