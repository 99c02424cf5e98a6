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

Optimiser (7a): AdamW, eps 1e-10, no weight decay, linear warm-up then constant, gradient clipping. Batches are
drawn from a generator seeded by (seed, step), so a resumed run sees the batches the uninterrupted one would.

Non-goals: multi-GPU (FSDP), mixed precision, EMA, gradient checkpointing (the tiny preset needs none).
"""

from __future__ import annotations

import dataclasses
import json
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

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.critic_ratio < 1:
            raise ValueError("steps >= 0, batch_size >= 1 and critic_ratio >= 1 are required")
        if self.reverse_reg_weight < 0:
            raise ValueError(f"reverse_reg_weight must be >= 0, got {self.reverse_reg_weight}")


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


def _set_lr(opt: torch.optim.Optimizer, base: float, step: int, warmup: int) -> float:
    lr = base * min(1.0, (step + 1) / warmup) if warmup > 0 else base
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


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
    step = 0
    if (run_dir / "train_state.pt").exists():
        model.load_state_dict(load_state_dict_file(run_dir / "checkpoint.pt"))
        state = torch.load(run_dir / "train_state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    write = _RunLog(run_dir, log)
    model.train()
    t0, row, acc = time.perf_counter(), {}, []

    def save() -> None:
        save_checkpoint(model.state_dict(), run_dir / "checkpoint.pt", layout="state_dict")
        save_checkpoint(model.state_dict(), run_dir / "weights.safetensors")
        torch.save({"optimizer": opt.state_dict(), "step": step}, run_dir / "train_state.pt")

    while step < cfg.steps:
        if _out_of_time(t0, cfg):
            break
        lr = _set_lr(opt, cfg.lr, step, cfg.warmup)
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
        acc.append((loss.item(), rev.item(), gnorm.item()))
        if step % cfg.log_every == 0 or step == cfg.steps or _out_of_time(t0, cfg):
            m = torch.tensor(acc).mean(0).tolist()
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
    step = 0
    if (run_dir / "train_state.pt").exists():
        generator.load_state_dict(load_state_dict_file(run_dir / "checkpoint.pt"))
        critic.load_state_dict(load_state_dict_file(run_dir / "checkpoint.pt", select="critic"))
        state = torch.load(run_dir / "train_state.pt", weights_only=True)
        opt_g.load_state_dict(state["optimizer"])
        opt_c.load_state_dict(state["critic_optimizer"])
        step = int(state["step"])
    write = _RunLog(run_dir, log)
    generator.train()
    critic.train()
    t0, row, acc = time.perf_counter(), {}, []

    def save() -> None:
        obj = {"generator": _prefixed(generator), "critic": _prefixed(critic)}
        torch.save(obj, run_dir / "checkpoint.pt")
        save_checkpoint(generator.state_dict(), run_dir / "weights.safetensors")
        torch.save(
            {"optimizer": opt_g.state_dict(), "critic_optimizer": opt_c.state_dict(), "step": step},
            run_dir / "train_state.pt",
        )

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
        if gen_step:
            _set_lr(opt_g, cfg.lr, step // cfg.critic_ratio, cfg.warmup)
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
        _set_lr(opt_c, cfg.critic_lr, step, cfg.warmup)
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
            row = {"stage": "streaming", "step": step, "dmd": m[0], "reverse": m[1], "critic": m[2],
                   "mse_to_target": m[3], "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
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
) -> dict:
    """Train a `VideoVAE`'s diffusers model as a plain autoencoder (posterior mode, no sampling):
    L1 + MSE reconstruction + 1e-4 mean(z^2). `sample_clips(batch, generator)` -> (B, 3, 8k + 1, H, W) in
    [-1, 1] on the VAE's device. Afterwards the latent normalisation buffers (latents_mean / latents_std) are set
    from the per-channel statistics of `stats_clips` (or of fresh samples), so encoded latents are ~N(0, 1).
    Writes `vae.safetensors` (loadable with `VideoVAE(cfg, weights=path)`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = vae.model
    model.train().requires_grad_(True)
    opt = _adamw(model.parameters(), cfg.lr)
    sched_total = max(cfg.steps, 1)
    write = _RunLog(run_dir, log)
    t0, row, acc, step = time.perf_counter(), {}, [], 0
    while step < cfg.steps:
        if _out_of_time(t0, cfg):
            break
        base = cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(step / sched_total * torch.pi)).item())
        lr = _set_lr(opt, base, step, cfg.warmup) if step < cfg.warmup else base
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_clips(cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 7919 + step))
        z = model.encode(x, causal=True).latent_dist.mode()
        y = model.decoder(z, None, causal=False)
        rec = F.l1_loss(y, x) + F.mse_loss(y, x)
        loss = rec + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            psnr = -10 * torch.log10(F.mse_loss(y.clamp(-1, 1), x) / 4).item()
        acc.append((rec.item(), psnr))
        if step % cfg.log_every == 0 or step == cfg.steps or _out_of_time(t0, cfg):
            m = torch.tensor(acc).mean(0).tolist()
            row = {"stage": "vae", "step": step, "recon": m[0], "psnr": m[1], "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            write(row)
            acc = []
    model.eval().requires_grad_(False)
    with torch.no_grad():
        clips = stats_clips if stats_clips is not None else sample_clips(32, torch.Generator().manual_seed(1))
        zs = torch.cat([model.encode(c[None], causal=True).latent_dist.mode() for c in clips])  # (N, C, T, h, w)
        model.latents_mean.copy_(zs.mean(dim=(0, 2, 3, 4)))
        model.latents_std.copy_(zs.std(dim=(0, 2, 3, 4)).clamp_min(1e-4))
    save_checkpoint(model.state_dict(), run_dir / "vae.safetensors")
    return row
