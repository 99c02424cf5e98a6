"""The recipe that trains the shipped tiny editor (engine/assets/tiny/) on one GPU in two runs of under 10 minutes.

The tiny models are far too small to fill a GPU (their steps are bound by kernel launches), so independent
trainings run side by side as separate processes on the same GPU; the parent renders data on the CPU cores
meanwhile. Every phase writes its weights to `out_dir` as soon as it ends, so a run cut short still returns them.

Stage 1 (`--stage 1`):
    0. render the procedural train split (`engine.data.procedural`, 49-frame clips) into a uint8 memmap in
       worker processes: the first `vae_pairs` pairs first, the rest while the VAE trains; and 12 held-out
       test pairs (73 frames) for the VAE's held-out PSNR
    1. VAE: the candidate configs of `VAE_CANDIDATES` (default: the shipped one; the LTX-2 class and stage
       layout, 32x / 8x compression) as autoencoders on random 25-frame windows, bf16 autocast, cosine lr; in
       parallel if several; the best held-out PSNR wins
    2. encode every pair with it; text with the shipped tiny Gemma-2 (frozen, random-init)
    3. bidirectional DiT (the teacher and the critic's init) and streaming DiT (the generator's init) by V2V
       flow matching (streaming: teacher-forced chunk-wise), in parallel, EMA of the weights
Stage 2 (`--stage 2`, from stage 1's outputs; re-renders and re-encodes unless the machine still holds them):
    1'. the VAE's decoder fine-tuned (encoder and latent normalisation frozen, so the latents the DiTs learn on
       keep their meaning), beside everything below; kept if its held-out PSNR is higher
    3'. both flow-matching runs continue with a cosine lr decay (EMA again)
    4. streaming stage (7b), in parallel from the same generator init, teacher and critic: DMD + 0.5 x CRR with
       the recipe's guidance 3 and critic ratio 4 (the shipped generator), DMD alone (the CRR ablation), and
       DMD + CRR with guidance 0 (does the teacher's CFG help at this scale?); generator EMA 0.99
    5. a quick held-out eval (`engine.train.evaluate`) of every DiT on the GPU, in parallel
`--stage all` runs both back to back.
Stage 3 (`--stage 3`; the shipped editor's last two runs, loadtest/results/train_tiny.md), with a fixed VAE:
    0. render `num_train` train pairs from index `--first-pair` on (`--recolor-share`: global edits beyond
       that share are skipped, `train_indices`) and encode them
    1. the tiny text encoder (Gemma-2, from `--text-init`, default the shipped one) trained jointly with the
       bidirectional and the streaming DiT by flow matching in one process (`trainer.train_flow_text`): with a
       frozen random encoder the DiT cannot tell "make the red circle blue" from "make the blue circle red"
    2. the streaming stage with the trained encoder frozen: DMD + 0.5 CRR (guidance 3), DMD alone, and DMD +
       CRR with guidance 0, in parallel
    3. held-out eval and the demo check (`evaluate.demo_check`) of every DiT; the shipped streaming DiT is
       DMD + CRR if it passes `passes_demo`, else the best passing variant
    Outputs: text_encoder.safetensors, dit_bidirectional, dit_streaming_{fm,crr,nocrr,crr_g0}.safetensors,
    summary_s3.json, train_log_s3.jsonl.

Outputs in `out_dir` (at most 8 files a stage; DiT and VAE weights in float16): stage 1: vae.safetensors,
dit_bidirectional_s1.safetensors, dit_streaming_fm_s1.safetensors (raw weights, the stage-2 inits) and their
_ema twins, summary_s1.json, train_log_s1.jsonl. Stage 2: vae.safetensors, dit_bidirectional.safetensors,
dit_streaming_fm.safetensors, dit_streaming_crr.safetensors, dit_streaming_nocrr.safetensors,
dit_streaming_crr_g0.safetensors (DiTs: EMA), summary_s2.json (with the eval), train_log_s2.jsonl. Run folders
(checkpoints, logs, the rendered clips, the latents) go to `work_dir`.

Non-goals: hyper-parameter search beyond the VAE candidates; the 2B models (same code, other presets).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import traceback
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from engine.config import PRESETS, TINY_VAE_KWARGS, PresetConfig

TEXT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "tiny" / "text"

VAE_CANDIDATES: dict[str, dict] = {
    # the shipped config (engine.config.TINY_VAE_KWARGS): decoder stages 128 (mid) / 64 / 32 / 16 (full
    # resolution, no resnet there)
    "wide": dict(TINY_VAE_KWARGS),
    # an alternative of similar CPU cost: decoder stages 96 / 48 / 24 / 12 with a resnet at full resolution
    "deep": dict(TINY_VAE_KWARGS, decoder_block_out_channels=(24, 48, 96), decoder_layers_per_block=(1, 1, 1, 1)),
}
"""VAE configs stage 1 can train side by side (AutoencoderKLLTX2Video kwargs); the best held-out PSNR wins."""
DEFAULT_CANDIDATES = ["wide"]
"""Trained by default: on one GPU two VAE trainings share its compute, so each gets half the steps."""

DIT_OVERRIDES: dict = {}
"""DiTConfig fields that differ from the tiny preset's (in/source channels always follow the VAE)."""

BUDGETS = {
    "vae": 300.0,
    "flow_s1": 150.0,
    "vae_decoder": 400.0,
    "flow_s2": 110.0,
    "streaming": 150.0,
    "joint": 300.0,
    "streaming3": 90.0,
}
"""Seconds of training per phase on one H100 (every phase's jobs run in parallel; rendering, encoding, process
start-up and evaluation come on top)."""

DEMO_BLUE_MARGIN = 60.0
"""Demo check: blue minus max(red, green) of the mean output colour inside the red circle (0..255 units)."""
DEMO_OTHERS_RATIO = 0.8
"""Demo check: the largest `others_ratio` (distance of a shape's mean colour to its own / to the blue)."""
DEMO_KEEP_DB = 17.0
"""Demo check: PSNR of the output vs the source outside the edit region."""

NUM_TRAIN = 3200
VAE_PAIRS = 1000
HELDOUT_PAIRS = 12
FRAMES = 49


def tiny_preset(vae_kwargs: dict) -> PresetConfig:
    """The tiny preset with the given VAE config (and the DiT's latent channels to match)."""
    base = PRESETS["tiny"]
    lat = int(vae_kwargs["latent_channels"])
    dit = dataclasses.replace(base.dit, in_channels=lat, source_channels=lat, **DIT_OVERRIDES)
    vae = dataclasses.replace(base.vae, diffusers_kwargs=dict(vae_kwargs), latent_channels=lat)
    return dataclasses.replace(base, dit=dit, vae=vae)


# --- small helpers --------------------------------------------------------------------------------------


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _cuda_setup(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def save_half(src: str | Path, dst: str | Path) -> Path:
    """Copy a flat safetensors file with floating tensors stored as float16 (the shipped format; loaders cast)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(dst), metadata={"format": "pt"})
    return Path(dst)


def _run_parallel(jobs: list[tuple], log: _Log) -> dict[str, dict]:
    """Run `(name, fn, kwargs)` jobs as spawned processes at once; each fn returns a JSON-able dict.
    Returns name -> result ({"error": ...} for a job that failed)."""
    return _wait(_start(jobs, log), log)


def _start(jobs: list[tuple], log: _Log) -> list[tuple]:
    ctx = get_context("spawn")
    procs = []
    for name, fn, kwargs in jobs:
        kwargs = {**kwargs, "log_path": str(log.path)}
        res = Path(kwargs["run_dir"]) / "result.json"
        res.parent.mkdir(parents=True, exist_ok=True)
        res.unlink(missing_ok=True)
        p = ctx.Process(target=_job_main, args=(fn, kwargs, str(res)), name=name)
        p.start()
        procs.append((name, p, res))
    return procs


def _wait(procs: list[tuple], log: _Log) -> dict[str, dict]:
    out = {}
    for name, p, res in procs:
        p.join()
        out[name] = json.loads(res.read_text()) if res.exists() else {"error": f"exit code {p.exitcode}"}
        if "error" in out[name]:
            log({"phase": name, "error": out[name]["error"]})
    return out


def _job_main(fn, kwargs: dict, result_path: str) -> None:
    try:
        result = fn(**kwargs)
    except Exception:  # noqa: BLE001 - reported to the parent, which carries on with the other jobs
        result = {"error": traceback.format_exc()}
    Path(result_path).write_text(json.dumps(result))


# --- data -----------------------------------------------------------------------------------------------


def _render_range(args: tuple) -> int:
    from engine.data.procedural import render_pair, sample_spec

    path, split, lo, hi, frames, *rest = args
    index = rest[0] if rest else list(range(hi))  # memmap position -> example index of the split
    mm = np.load(path, mmap_mode="r+")
    for i in range(lo, hi):
        spec = dataclasses.replace(sample_spec(split, index[i]), num_frames=frames)
        src, tgt = render_pair(spec)
        mm[2 * i], mm[2 * i + 1] = src, tgt
    mm.flush()
    return hi - lo


def _new_memmap(path: Path, pairs: int, frames: int, height: int = 128, width: int = 192) -> Path:
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(2 * pairs, frames, height, width, 3)).flush()
    return path


def _ranges(path: Path, split: str, lo: int, hi: int, frames: int, chunk: int = 16,
            index: list[int] | None = None) -> list[tuple]:  # fmt: skip
    extra = (index,) if index is not None else ()
    return [(str(path), split, a, min(a + chunk, hi), frames, *extra) for a in range(lo, hi, chunk)]


def train_indices(first: int, count: int, recolor_share: float) -> list[int]:
    """`count` train-split example indices from `first` on, in order, keeping every recolor and skipping global
    edits (checkerboard, grayscale) once they would exceed 1 - `recolor_share` of the total (the natural mix,
    `engine.data.procedural.EDIT_WEIGHTS`, has 70% recolors)."""
    from engine.data.procedural import sample_spec

    out, glob, i = [], 0, first
    while len(out) < count:
        if sample_spec("train", i).edit == "recolor":
            out.append(i)
        elif glob < (1 - recolor_share) * count:
            out.append(i)
            glob += 1
        i += 1
    return out


# --- jobs (run in spawned processes) --------------------------------------------------------------------


def vae_job(*, run_dir: str, vae_kwargs: dict, clips_path: str, clip_count: int, heldout_path: str,
            budget: float, steps: int, device: str, log_path: str, seed: int = 0, init: str | None = None,
            decoder_only: bool = False, lr: float = 1.5e-3) -> dict:  # fmt: skip
    """Train one VAE candidate (or, `decoder_only`, fine-tune the decoder of `init`) on the first `clip_count`
    clips; held-out PSNR on the test clips (before and after, for a fine-tune)."""
    from engine.train.trainer import TrainConfig, train_vae, vae_psnr
    from engine.vae import VideoVAE

    dev = torch.device(device)
    _cuda_setup(dev)
    preset = tiny_preset(vae_kwargs)
    clips = torch.from_numpy(np.ascontiguousarray(np.load(clips_path, mmap_mode="c")[:clip_count])).to(dev)
    win = 25

    def sample_clips(batch: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(clips.shape[0], (batch,), generator=g)
        start = torch.randint(clips.shape[1] - win + 1, (batch,), generator=g)
        t = start[:, None] + torch.arange(win)[None]
        x = clips[idx.to(dev)[:, None], t.to(dev)]  # (B, win, H, W, 3)
        return x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0

    held = [np.asarray(c) for c in np.load(heldout_path, mmap_mode="r")]
    vae = VideoVAE(preset.vae, init, device=dev, dtype=torch.float32, seed=seed)
    before = vae_psnr(vae, held) if init else None
    params = sum(p.numel() for p in vae.model.parameters())
    cfg = TrainConfig(steps=steps, batch_size=16, lr=lr, warmup=200, time_budget_s=budget, log_every=200,
                      bf16=dev.type == "cuda", seed=seed)  # fmt: skip
    stats = clips[:: max(1, clips.shape[0] // 64)].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    name = Path(run_dir).name
    log = _Log(Path(log_path))
    row = train_vae(vae, sample_clips, cfg, run_dir, log=lambda r: log({"job": name, **r}), stats_clips=stats,
                    decoder_only=decoder_only)  # fmt: skip
    clips = stats = None  # free the GPU copy before the held-out pass
    vae = VideoVAE(preset.vae, str(Path(run_dir) / "vae.safetensors"), device=dev, dtype=torch.float32)
    ev = vae_psnr(vae, held)
    return {**row, "params": params, "heldout": ev, "heldout_before": before,
            "weights": str(Path(run_dir) / "vae.safetensors")}  # fmt: skip


def flow_job(*, run_dir: str, vae_kwargs: dict, latents: str, streaming: bool, init: str | None, budget: float,
             steps: int, lr_schedule: str, device: str, seed: int, log_path: str, batch_size: int = 192,
             lr: float = 1e-3) -> dict:  # fmt: skip
    """V2V flow matching of one DiT variant (see the module docstring)."""
    from engine.model.hybrid_dit import SanaStreamingDiT
    from engine.train.trainer import LatentData, TrainConfig, train_flow, training_init
    from engine.weights import load_state_dict_file

    dev = torch.device(device)
    _cuda_setup(dev)
    cfg = dataclasses.replace(tiny_preset(vae_kwargs).dit, streaming=streaming)
    model = training_init(SanaStreamingDiT(cfg), seed=seed)
    if init:
        model.load_state_dict(load_state_dict_file(init))
    model = model.to(dev)
    data = LatentData.load(latents).to(dev)
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=50 if init else 150, grad_clip=1.0,
                     log_every=100, save_every=10**9, time_budget_s=budget, lr_schedule=lr_schedule,
                     lr_min_ratio=0.05, ema_decay=0.995, ema_start=50 if init else 150, seed=seed)  # fmt: skip
    name = Path(run_dir).name
    log = _Log(Path(log_path))
    row = train_flow(model, data, tc, run_dir, log=lambda r: log({"job": name, **r}))
    return {**row, "params": sum(p.numel() for p in model.parameters())}


def streaming_job(*, run_dir: str, vae_kwargs: dict, latents: str, generator_init: str, teacher: str,
                  reverse_reg_weight: float, guidance: float, critic_ratio: int, budget: float, steps: int,
                  device: str, seed: int, log_path: str, batch_size: int = 64) -> dict:  # fmt: skip
    """The streaming stage (DMD [+ CRR]) from a flow-matched generator, teacher and critic = `teacher`."""
    from engine.model.hybrid_dit import SanaStreamingDiT
    from engine.train.trainer import LatentData, TrainConfig, train_streaming
    from engine.weights import load_state_dict_file

    dev = torch.device(device)
    _cuda_setup(dev)
    cfg = tiny_preset(vae_kwargs).dit
    bidi = dataclasses.replace(cfg, streaming=False)
    gen = SanaStreamingDiT(cfg)
    gen.load_state_dict(load_state_dict_file(generator_init))
    t_sd = load_state_dict_file(teacher)
    teacher_m, critic = SanaStreamingDiT(bidi), SanaStreamingDiT(bidi)
    teacher_m.load_state_dict(t_sd)
    critic.load_state_dict(t_sd)
    gen, teacher_m, critic = gen.to(dev), teacher_m.to(dev), critic.to(dev)
    data = LatentData.load(latents).to(dev)
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=5e-5, critic_lr=1e-4, warmup=10, grad_clip=1.0,
                     reverse_reg_weight=reverse_reg_weight, guidance=guidance, critic_ratio=critic_ratio,
                     log_every=40, save_every=10**9, time_budget_s=budget, ema_decay=0.99, ema_start=20,
                     seed=seed)  # fmt: skip
    name = Path(run_dir).name
    log = _Log(Path(log_path))
    return train_streaming(gen, teacher_m, critic, data, tc, run_dir, log=lambda r: log({"job": name, **r}))


def joint_flow_job(*, run_dir: str, vae_kwargs: dict, latents: str, teacher_init: str | None,
                   gen_init: str | None, text_init: str, budget: float, steps: int, device: str, seed: int,
                   log_path: str, batch_size: int = 192, lr: float = 1e-3) -> dict:  # fmt: skip
    """Stage 3: the bidirectional and the streaming DiT and the tiny text encoder by flow matching, jointly
    (`engine.train.trainer.train_flow_text`), cosine lr, EMA 0.995."""
    from engine.model.hybrid_dit import SanaStreamingDiT
    from engine.text import TextEncoder
    from engine.train.trainer import LatentData, TrainConfig, train_flow_text, training_init
    from engine.weights import load_state_dict_file

    dev = torch.device(device)
    _cuda_setup(dev)
    preset = tiny_preset(vae_kwargs)
    models = {}
    for name, streaming, init, s in (("bidirectional", False, teacher_init, seed),
                                     ("streaming_fm", True, gen_init, seed + 1)):  # fmt: skip
        m = training_init(SanaStreamingDiT(dataclasses.replace(preset.dit, streaming=streaming)), seed=s)
        if init:
            m.load_state_dict(load_state_dict_file(init))
        models[name] = m.to(dev)
    text = TextEncoder(preset.text, text_init, device=dev)
    data = LatentData.load(latents).to(dev)
    warm = 50 if teacher_init else 150
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warm, grad_clip=1.0, log_every=100,
                     time_budget_s=budget, lr_schedule="cosine", lr_min_ratio=0.05, ema_decay=0.995,
                     ema_start=warm, seed=seed)  # fmt: skip
    name = Path(run_dir).name
    log = _Log(Path(log_path))
    row = train_flow_text(models, text, data, tc, run_dir, log=lambda r: log({"job": name, **r}))
    return {**row, "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
            "text_params": sum(p.numel() for p in text.model.parameters())}  # fmt: skip


def eval_job(*, run_dir: str, vae_kwargs: dict, mode: str, dit: str, vae: str, indices: list[int],
             device: str, log_path: str, text: str | None = None) -> dict:  # fmt: skip
    """Held-out metrics of one model (no strips), and the demo check (`evaluate.demo_check`)."""
    from engine.train.evaluate import DEMO_PROMPT, demo_check, demo_clip, edit_clip, evaluate, load_engine

    _cuda_setup(torch.device(device))
    preset = tiny_preset(vae_kwargs)
    res = evaluate({"m": (mode, dit)}, vae=vae, text=text, indices=indices, device=device, preset=preset)["m"]
    src, truth, masks = demo_clip()
    out = edit_clip(load_engine(mode, dit, vae, text, device, preset), src, DEMO_PROMPT, mode)
    res["demo"] = demo_check(out, src, truth, masks)
    return res


def passes_demo(d: dict) -> bool:
    """The shipped streaming model's bar on the demo edit (`evaluate.demo_check`; the CI test
    tests/train/test_shipped_editor.py checks the same): the red circle blue-dominant, every other shape's
    colour nearer its own than the blue, the rest of the frame close to the source."""
    return (d["blue_margin"] >= DEMO_BLUE_MARGIN and max(d["others_ratio"]) <= DEMO_OTHERS_RATIO
            and d["psnr_keep"] >= DEMO_KEEP_DB)  # fmt: skip


# --- the stages -----------------------------------------------------------------------------------------


def _render_test_pair(index: int) -> tuple[np.ndarray, np.ndarray]:
    from engine.data.procedural import render_pair, sample_spec

    return render_pair(sample_spec("test", index))


def _render_all(work: Path, num_train: int, first: int, pool, log: _Log) -> tuple:
    """Create the train memmap and render pairs [0, first) into it now; returns (path, async result of the rest)."""
    path = _new_memmap(work / "train_clips.npy", num_train, FRAMES)
    t = time.perf_counter()
    pool.map(_render_range, _ranges(path, "train", 0, first, FRAMES), chunksize=1)
    log({"phase": "render", "pairs": first, "seconds": round(time.perf_counter() - t, 1)})
    rest = pool.map_async(_render_range, _ranges(path, "train", first, num_train, FRAMES), chunksize=1)
    return path, rest


@torch.no_grad()
def encode_all(vae_kwargs: dict, vae_weights: str, clips_path: Path, num_train: int, out: Path,
               device: torch.device, indices: list[int] | None = None) -> dict:  # fmt: skip
    """Latents of every train pair (GPU-side uint8 -> float) and the prompt embeddings -> `out` (LatentData)."""
    from engine.data.manifest import procedural_examples
    from engine.text import TextEncoder
    from engine.train.trainer import LatentData
    from engine.vae import VideoVAE

    t = time.perf_counter()
    preset = tiny_preset(vae_kwargs)
    vae = VideoVAE(preset.vae, vae_weights, device=device, dtype=torch.float32)
    text = TextEncoder(preset.text, str(TEXT_WEIGHTS), device=device)
    if indices is None:
        examples = procedural_examples("train", num_train)
    else:
        examples = [e for i in indices for e in procedural_examples("train", 1, start=i)]
    clips = np.load(clips_path, mmap_mode="c")
    lat = []
    for i in range(0, 2 * num_train, 64):
        x = torch.from_numpy(np.ascontiguousarray(clips[i : i + 64])).to(device)
        lat.append(vae.encode(x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0).float().cpu())
    lat = torch.cat(lat)
    prompts = sorted({p for e in examples for p in (e.prompt, e.reverse_prompt or e.prompt)})
    pid = {p: i for i, p in enumerate(prompts)}
    emb, mask = text.encode(prompts)
    data = LatentData(
        source=lat[0::2].contiguous(),
        target=lat[1::2].contiguous(),
        text=emb.float().cpu(),
        mask=mask.cpu(),
        prompt_id=torch.tensor([pid[e.prompt] for e in examples]),
        reverse_id=torch.tensor([pid[e.reverse_prompt or e.prompt] for e in examples]),
        prompts=prompts,
    )
    data.save(out)
    return {"seconds": round(time.perf_counter() - t, 1), "pairs": num_train, "latent_std": data.source.std().item(),
            "prompts": len(prompts)}  # fmt: skip


STREAMING_VARIANTS = {"crr": (0.5, 3.0), "nocrr": (0.0, 3.0), "crr_g0": (0.5, 0.0)}
"""The streaming stage's runs, in parallel: name -> (reverse_reg_weight, guidance). "crr" is the shipped recipe,
the other two its ablations (no Cycle-Reverse Regularization; no teacher guidance)."""


def _streaming_variants(work: Path, out_dir: Path, common: dict, log, summary: dict) -> None:
    """Run the streaming-stage variants in parallel from the same init; keep each one that finished (float16)."""
    results = _run_parallel([
        (name, streaming_job, dict(run_dir=str(work / name), reverse_reg_weight=w, guidance=g, **common))
        for name, (w, g) in STREAMING_VARIANTS.items()
    ], log)  # fmt: skip
    summary["phases"].update(results)
    for name in STREAMING_VARIANTS:
        if "error" not in results[name]:
            save_half(work / name / "weights_ema.safetensors", out_dir / f"dit_streaming_{name}.safetensors")


def _eval_models(work: Path, out_dir: Path, log, **job) -> dict:
    """GPU eval, in parallel, of every DiT the run wrote to out_dir (bidirectional, flow matching, the streaming
    variants); job: eval_job's other arguments (vae_kwargs, vae, indices, device, optionally text)."""
    models = {"bidirectional": ("bidirectional_short", out_dir / "dit_bidirectional.safetensors"),
              "fm": ("long_streaming", out_dir / "dit_streaming_fm.safetensors")}  # fmt: skip
    models.update({n: ("long_streaming", out_dir / f"dit_streaming_{n}.safetensors") for n in STREAMING_VARIANTS})
    return _run_parallel([
        (f"eval_{n}", eval_job, dict(run_dir=str(work / f"eval_{n}"), mode=m, dit=str(p), **job))
        for n, (m, p) in models.items() if p.exists()
    ], log)  # fmt: skip


def _budget(want: float, t_all: float, deadline: float | None, reserve: float) -> float:
    """A phase's seconds: `want`, shrunk so the run ends `reserve` seconds before the deadline."""
    if deadline is None:
        return want
    return max(5.0, min(want, deadline - (time.perf_counter() - t_all) - reserve))


def run_stage1(out_dir: Path, work: Path, *, num_train: int, vae_pairs: int, device: str, workers: int,
               budgets: dict, steps_scale: float, deadline: float | None, candidates: dict,
               heldout_pairs: int = HELDOUT_PAIRS) -> dict:  # fmt: skip
    t_all = time.perf_counter()
    log = _Log(out_dir / "train_log_s1.jsonl")
    summary: dict = {"stage": 1, "device": _device_name(device), "phases": {}}
    pool = get_context("fork").Pool(workers)
    # held-out clips for the VAE (test split, 73 frames)
    held = np.stack([c for pair in pool.map(_render_test_pair, range(heldout_pairs)) for c in pair])
    np.save(work / "heldout_clips.npy", held)
    del held
    clips_path, rest = _render_all(work, num_train, min(vae_pairs, num_train), pool, log)
    vcommon = dict(clips_path=str(clips_path), clip_count=2 * min(vae_pairs, num_train),
                   heldout_path=str(work / "heldout_clips.npy"), budget=_budget(budgets["vae"], t_all, deadline, 220),
                   steps=max(1, int(40000 * steps_scale)), device=device)  # fmt: skip
    jobs = [
        (f"vae_{name}", vae_job, dict(run_dir=str(work / f"vae_{name}"), vae_kwargs=kw, **vcommon))
        for name, kw in candidates.items()
    ]
    vres = _run_parallel(jobs, log)
    t = time.perf_counter()
    rest.wait()
    pool.close()
    pool.join()
    summary["phases"]["render"] = {"pairs": num_train, "waited_after_vae_s": round(time.perf_counter() - t, 1)}
    ok = {k: v for k, v in vres.items() if "error" not in v}
    if not ok:
        raise RuntimeError(f"every VAE candidate failed: {vres}")
    best = max(ok, key=lambda k: ok[k]["heldout"]["psnr"])
    summary["phases"]["vae"] = {"candidates": vres, "chosen": best}
    log({"phase": "vae", "chosen": best, **{k: v.get("heldout") for k, v in vres.items()}})
    vae_kwargs = candidates[best.removeprefix("vae_")]
    summary["vae_kwargs"] = vae_kwargs
    save_half(work / best / "vae.safetensors", out_dir / "vae.safetensors")
    shutil.copy(work / best / "vae.safetensors", work / "vae.safetensors")

    dev = torch.device(device)
    _cuda_setup(dev)
    summary["phases"]["encode"] = encode_all(vae_kwargs, str(work / "vae.safetensors"), clips_path, num_train,
                                             work / "latents.pt", dev)  # fmt: skip
    log({"phase": "encode", **summary["phases"]["encode"]})
    (work / "latents.vae").write_text(_file_key(work / "vae.safetensors"))

    b = _budget(budgets["flow_s1"], t_all, deadline, 25)
    common = dict(vae_kwargs=vae_kwargs, latents=str(work / "latents.pt"), init=None, budget=b,
                  steps=max(1, int(100000 * steps_scale)), lr_schedule="constant", device=device)  # fmt: skip
    fres = _run_parallel([
        ("bidirectional_s1", flow_job, dict(run_dir=str(work / "bidirectional_s1"), streaming=False, seed=1, **common)),
        ("streaming_fm_s1", flow_job, dict(run_dir=str(work / "streaming_fm_s1"), streaming=True, seed=2, **common)),
    ], log)  # fmt: skip
    summary["phases"].update(fres)
    for name, dst in (("bidirectional_s1", "dit_bidirectional_s1"), ("streaming_fm_s1", "dit_streaming_fm_s1")):
        if "error" not in fres[name]:
            save_half(work / name / "weights.safetensors", out_dir / f"{dst}.safetensors")
            save_half(work / name / "weights_ema.safetensors", out_dir / f"{dst}_ema.safetensors")
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    (out_dir / "summary_s1.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_stage2(out_dir: Path, work: Path, *, num_train: int, vae_pairs: int, device: str, workers: int,
               budgets: dict, steps_scale: float, deadline: float | None, vae_kwargs: dict, vae: str,
               teacher_init: str, gen_init: str, eval_indices: list[int],
               heldout_pairs: int = HELDOUT_PAIRS) -> dict:  # fmt: skip
    t_all = time.perf_counter()
    log = _Log(out_dir / "train_log_s2.jsonl")
    summary: dict = {"stage": 2, "device": _device_name(device), "phases": {}, "vae_kwargs": vae_kwargs}
    latents, key = work / "latents.pt", work / "latents.vae"
    clips_path, held_path = work / "train_clips.npy", work / "heldout_clips.npy"
    reuse = latents.exists() and key.exists() and key.read_text() == _file_key(vae) and held_path.exists()
    rest = pool = None
    if reuse:
        summary["phases"]["render"] = {"reused": str(clips_path)}
    else:
        pool = get_context("fork").Pool(workers)
        np.save(held_path, np.stack([c for pair in pool.map(_render_test_pair, range(heldout_pairs)) for c in pair]))
        clips_path, rest = _render_all(work, num_train, min(vae_pairs, num_train), pool, log)
    # the VAE decoder fine-tune runs beside everything else (the encoder, hence the latents, stay as they are)
    vae_ft = _start([("vae_decoder", vae_job, dict(
        run_dir=str(work / "vae_decoder"), vae_kwargs=vae_kwargs, clips_path=str(clips_path),
        clip_count=2 * min(vae_pairs, num_train), heldout_path=str(held_path),
        budget=_budget(budgets["vae_decoder"], t_all, deadline, 110), steps=max(1, int(40000 * steps_scale)),
        device=device, init=vae, decoder_only=True, lr=5e-4))], log)  # fmt: skip
    if reuse:
        summary["phases"]["encode"] = {"reused": str(latents)}
    else:
        rest.wait()
        pool.close()
        pool.join()
        dev = torch.device(device)
        _cuda_setup(dev)
        summary["phases"]["encode"] = encode_all(vae_kwargs, vae, clips_path, num_train, latents, dev)
        key.write_text(_file_key(vae))
    log({"phase": "encode", **summary["phases"]["encode"]})

    b = _budget(budgets["flow_s2"], t_all, deadline, 30 + budgets["streaming"] + 90)
    common = dict(vae_kwargs=vae_kwargs, latents=str(latents), budget=b, steps=max(1, int(100000 * steps_scale)),
                  lr_schedule="cosine", device=device)  # fmt: skip
    fres = _run_parallel([
        ("bidirectional", flow_job, dict(run_dir=str(work / "bidirectional"), streaming=False, init=teacher_init,
                                         seed=11, **common)),
        ("streaming_fm", flow_job, dict(run_dir=str(work / "streaming_fm"), streaming=True, init=gen_init, seed=12,
                                        **common)),
    ], log)  # fmt: skip
    summary["phases"].update(fres)
    teacher = work / "bidirectional" / "weights_ema.safetensors"
    gen = work / "streaming_fm" / "weights_ema.safetensors"
    if "error" in fres["bidirectional"]:
        teacher = Path(teacher_init)
    if "error" in fres["streaming_fm"]:
        gen = Path(gen_init)
    save_half(teacher, out_dir / "dit_bidirectional.safetensors")
    save_half(gen, out_dir / "dit_streaming_fm.safetensors")

    b = _budget(budgets["streaming"], t_all, deadline, 30 + 90)
    common = dict(vae_kwargs=vae_kwargs, latents=str(latents), generator_init=str(gen), teacher=str(teacher),
                  critic_ratio=4, budget=b, steps=max(1, int(100000 * steps_scale)), device=device,
                  seed=21)  # fmt: skip
    _streaming_variants(work, out_dir, common, log, summary)

    vres = _wait(vae_ft, log)["vae_decoder"]
    summary["phases"]["vae_decoder"] = vres
    better = "error" not in vres and vres["heldout"]["psnr"] > vres["heldout_before"]["psnr"]
    final_vae = work / "vae_decoder" / "vae.safetensors" if better else Path(vae)
    save_half(final_vae, out_dir / "vae.safetensors")
    summary["vae_used"] = "decoder fine-tune" if better else "stage 1"
    log({"phase": "vae_decoder", "used": summary["vae_used"], "heldout": vres.get("heldout"),
         "before": vres.get("heldout_before")})  # fmt: skip

    if eval_indices:
        eres = _eval_models(work, out_dir, log, vae_kwargs=vae_kwargs, vae=str(out_dir / "vae.safetensors"),
                            indices=eval_indices, device=device)  # fmt: skip
        summary["eval"] = eres
        summary["eval_mean"] = {k: v.get("mean", v.get("error")) for k, v in eres.items()}
        log({"phase": "eval", **summary["eval_mean"]})
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    (out_dir / "summary_s2.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_stage3(out_dir: Path, work: Path, *, num_train: int, device: str, workers: int, budgets: dict,
               steps_scale: float, deadline: float | None, vae_kwargs: dict, vae: str, teacher_init: str | None,
               gen_init: str | None, text_init: str, eval_indices: list[int], first_pair: int = 0,
               recolor_share: float = 0.7) -> dict:  # fmt: skip
    """Stage 3 (the shipped editor's last run): with a fixed VAE, the text encoder and both DiTs by joint flow
    matching, then the streaming stage (DMD + CRR, and DMD alone) with the trained encoder frozen, then the
    held-out eval and the demo check of every DiT; the shipped streaming DiT is DMD + CRR if it passes the demo
    check (`passes_demo`), else the best passing variant by held-out PSNR."""
    from engine.text import TextEncoder
    from engine.train.trainer import LatentData

    t_all = time.perf_counter()
    log = _Log(out_dir / "train_log_s3.jsonl")
    summary: dict = {"stage": 3, "device": _device_name(device), "phases": {}, "vae_kwargs": vae_kwargs}
    latents = work / "latents.pt"
    index = train_indices(first_pair, num_train, recolor_share)
    pool = get_context("fork").Pool(workers)
    clips_path = _new_memmap(work / "train_clips.npy", num_train, FRAMES)
    t = time.perf_counter()
    pool.map(_render_range, _ranges(clips_path, "train", 0, num_train, FRAMES, index=index), chunksize=1)
    pool.close()
    pool.join()
    summary["phases"]["render"] = {
        "pairs": num_train,
        "first_index": index[0],
        "last_index": index[-1],
        "recolor_share": recolor_share,
        "seconds": round(time.perf_counter() - t, 1),
    }
    log({"phase": "render", **summary["phases"]["render"]})
    dev = torch.device(device)
    _cuda_setup(dev)
    summary["phases"]["encode"] = encode_all(vae_kwargs, vae, clips_path, num_train, latents, dev, indices=index)
    log({"phase": "encode", **summary["phases"]["encode"]})

    b = _budget(budgets["joint"], t_all, deadline, 30 + budgets["streaming3"] + 60)
    jres = _run_parallel([("joint", joint_flow_job, dict(
        run_dir=str(work / "joint"), vae_kwargs=vae_kwargs, latents=str(latents), teacher_init=teacher_init,
        gen_init=gen_init, text_init=text_init, budget=b, steps=max(1, int(100000 * steps_scale)), device=device,
        seed=31))], log)  # fmt: skip
    summary["phases"].update(jres)
    if "error" in jres["joint"]:
        raise RuntimeError(jres["joint"]["error"])
    text_w = work / "joint" / "text_encoder_ema.safetensors"
    teacher = work / "joint" / "bidirectional" / "weights_ema.safetensors"
    gen = work / "joint" / "streaming_fm" / "weights_ema.safetensors"
    save_half(text_w, out_dir / "text_encoder.safetensors")
    save_half(teacher, out_dir / "dit_bidirectional.safetensors")
    save_half(gen, out_dir / "dit_streaming_fm.safetensors")
    # the captions of the streaming stage: the trained encoder's (frozen from here on)
    data = LatentData.load(latents)
    enc = TextEncoder(tiny_preset(vae_kwargs).text, str(text_w), device=dev)
    emb, mask = enc.encode(list(data.prompts))
    data.text, data.mask = emb.float().cpu(), mask.cpu()
    latents3 = work / "latents_text3.pt"
    data.save(latents3)
    del data, enc

    b = _budget(budgets["streaming3"], t_all, deadline, 60)
    common = dict(vae_kwargs=vae_kwargs, latents=str(latents3), generator_init=str(gen), teacher=str(teacher),
                  critic_ratio=4, budget=b, steps=max(1, int(100000 * steps_scale)), device=device,
                  seed=41)  # fmt: skip
    _streaming_variants(work, out_dir, common, log, summary)

    text = str(out_dir / "text_encoder.safetensors")
    eres = _eval_models(work, out_dir, log, vae_kwargs=vae_kwargs, vae=vae, text=text, indices=eval_indices,
                        device=device)  # fmt: skip
    summary["eval"] = eres
    summary["eval_mean"] = {k: v.get("mean", v.get("error")) for k, v in eres.items()}
    summary["demo"] = {k: v.get("demo") for k, v in eres.items()}
    ok = [n for n in ("crr", "nocrr", "crr_g0", "fm") if "demo" in eres.get(f"eval_{n}", {})
          and passes_demo(eres[f"eval_{n}"]["demo"])]  # fmt: skip
    if "crr" in ok:
        chosen = "crr"
    elif ok:
        chosen = max(ok, key=lambda n: eres[f"eval_{n}"]["mean"]["psnr"])
    else:
        chosen = "crr"
    summary["shipped_streaming"] = chosen
    log({"phase": "eval", **summary["eval_mean"], "demo": summary["demo"], "shipped_streaming": chosen})
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    (out_dir / "summary_s3.json").write_text(json.dumps(summary, indent=1))
    return summary


def _file_key(path: str | Path) -> str:
    """Identity of a VAE file's weights (float16-rounded, so a shipped copy matches its source)."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    total = sum(float(v.half().double().abs().sum()) for v in sd.values() if v.is_floating_point())
    return f"{len(sd)}:{total:.6e}"


def _device_name(device: str) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _training_env() -> None:
    """The reference (autograd-capable) DiT paths for training: op-by-op GDN and no fused Triton kernels."""
    os.environ.setdefault("SANA_STREAM_GDN", "naive")
    os.environ.setdefault("SANA_STREAM_FUSED", "0")


def run_tiny_recipe(
    out_dir: str | Path,
    work_dir: str | Path,
    *,
    stage: str = "all",
    num_train: int = NUM_TRAIN,
    vae_pairs: int = VAE_PAIRS,
    device: str = "cuda",
    budgets: dict[str, float] | None = None,
    steps_scale: float = 1.0,
    workers: int | None = None,
    deadline: float | None = None,
    candidates: list[str] | None = None,
    vae: str | None = None,
    teacher_init: str | None = None,
    gen_init: str | None = None,
    eval_indices: list[int] | None = None,
    heldout_pairs: int = HELDOUT_PAIRS,
    text_init: str | None = None,
    first_pair: int = 0,
    recolor_share: float = 0.7,
) -> dict:
    """Run stage "1", "2", "3" or "all" (1 then 2; see the module docstring). Stage 2 alone needs `vae`,
    `teacher_init` and `gen_init` (stage 1's vae.safetensors and *_s1.safetensors raw weights); stage 3 needs
    `vae` and takes optional DiT inits and the text encoder to start from (default: the shipped one)."""
    _training_env()
    out_dir, work = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    budgets = {**BUDGETS, **(budgets or {})}
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    cands = {k: VAE_CANDIDATES[k] for k in (candidates or DEFAULT_CANDIDATES)}
    eval_indices = list(range(8)) if eval_indices is None else eval_indices
    result = {}
    if stage in ("1", "all"):
        result["stage1"] = s1 = run_stage1(out_dir, work, num_train=num_train, vae_pairs=vae_pairs, device=device,
                                           workers=workers, budgets=budgets, steps_scale=steps_scale,
                                           deadline=deadline, candidates=cands,
                                           heldout_pairs=heldout_pairs)  # fmt: skip
        vae = str(out_dir / "vae.safetensors")
        teacher_init = str(out_dir / "dit_bidirectional_s1.safetensors")
        gen_init = str(out_dir / "dit_streaming_fm_s1.safetensors")
        vae_kwargs = s1["vae_kwargs"]
        deadline = None if deadline is None else deadline + s1["seconds"]
    if stage == "3":
        if not vae:
            raise ValueError("stage 3 needs vae")
        result["stage3"] = run_stage3(out_dir, work, num_train=num_train, device=device, workers=workers,
                                      budgets=budgets, steps_scale=steps_scale, deadline=deadline,
                                      vae_kwargs=_vae_kwargs_of(vae, cands), vae=vae, teacher_init=teacher_init,
                                      gen_init=gen_init, text_init=text_init or str(TEXT_WEIGHTS),
                                      eval_indices=eval_indices, first_pair=first_pair,
                                      recolor_share=recolor_share)  # fmt: skip
        return result
    if stage in ("2", "all"):
        if not (vae and teacher_init and gen_init):
            raise ValueError("stage 2 needs vae, teacher_init and gen_init")
        if stage == "2":
            vae_kwargs = _vae_kwargs_of(vae, cands)
        result["stage2"] = run_stage2(out_dir, work, num_train=num_train, vae_pairs=vae_pairs, device=device,
                                      workers=workers, heldout_pairs=heldout_pairs,
                                      budgets=budgets, steps_scale=steps_scale, deadline=deadline,
                                      vae_kwargs=vae_kwargs, vae=vae, teacher_init=teacher_init, gen_init=gen_init,
                                      eval_indices=eval_indices)  # fmt: skip
    return result


def _vae_kwargs_of(path: str, candidates: dict) -> dict:
    """The candidate config whose state-dict shapes match a VAE file."""
    from diffusers import AutoencoderKLLTX2Video
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    for kw in candidates.values():
        with torch.device("meta"):
            ref = {k: tuple(v.shape) for k, v in AutoencoderKLLTX2Video(**kw).state_dict().items()}
        if ref == shapes:
            return kw
    raise ValueError(f"{path} matches none of the VAE candidates {list(candidates)}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m engine.train.recipe", description=run_tiny_recipe.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/sana_tiny_runs")
    p.add_argument("--stage", choices=("1", "2", "3", "all"), default="all")
    p.add_argument("--num-train", type=int, default=NUM_TRAIN)
    p.add_argument("--vae-pairs", type=int, default=VAE_PAIRS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every phase's seconds")
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--deadline", type=float, default=None, help="seconds: shrink the last phases to end by then")
    p.add_argument("--candidates", nargs="*", default=None,
                   help=f"VAE candidates of {list(VAE_CANDIDATES)} (default: {DEFAULT_CANDIDATES})")  # fmt: skip
    p.add_argument("--vae", default=None, help="stage 2: the stage-1 VAE")
    p.add_argument("--teacher-init", default=None, help="stage 2: the stage-1 bidirectional DiT")
    p.add_argument("--gen-init", default=None, help="stage 2: the stage-1 streaming DiT")
    p.add_argument("--text-init", default=None, help="stage 3: text encoder to start from (default: shipped)")
    p.add_argument("--first-pair", type=int, default=0, help="stage 3: first train-split example index")
    p.add_argument("--recolor-share", type=float, default=0.7, help="stage 3: share of recolor examples")
    p.add_argument("--eval-indices", type=int, nargs="*", default=None, help="stage 2's quick eval (default 0..7)")
    p.add_argument("--heldout-pairs", type=int, default=HELDOUT_PAIRS, help="test pairs for the VAE's held-out PSNR")
    a = p.parse_args(argv)
    budgets = {k: v * a.budget_scale for k, v in BUDGETS.items()}
    run_tiny_recipe(a.out, a.work, stage=a.stage, num_train=a.num_train, vae_pairs=a.vae_pairs, device=a.device,
                    budgets=budgets, steps_scale=a.steps_scale, workers=a.workers, deadline=a.deadline,
                    candidates=a.candidates, vae=a.vae, teacher_init=a.teacher_init, gen_init=a.gen_init,
                    eval_indices=a.eval_indices, heldout_pairs=a.heldout_pairs,
                    text_init=a.text_init, first_pair=a.first_pair, recolor_share=a.recolor_share)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
