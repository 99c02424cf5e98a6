"""The per-chunk DiT work of streaming sessions: batched across sessions, replayed from CUDA graphs.

One chunk of one session = `steps` denoising forwards that read the session's cache, then (unless it is the last
chunk) one t = 0 forward on the clean result that writes it (`efficient_cache`: the last denoising step writes
instead). `ChunkRunner.run(jobs)` does that for many sessions at once:

- **Batching.** Jobs whose forwards have the same shapes (chunk frames, latent grid, softmax window length,
  history present or not, CFG or not, schedule) share every forward: their latents, sources, texts, per-sample
  RoPE tables and cache reads are stacked along the batch, each keeps its own timestep, and the writes are split
  back to each session's cache. Sessions at different chunk indices batch as long as their windows have equal
  length (all sessions past chunk 1 do, with the default window).
- **Fused projections.** Where the fast path is on (`fused_enabled`: CUDA, unless SANA_STREAM_FUSED=0), the
  runner fuses the model's projections once (`SanaStreamingDiT.fuse_projections`).
- **Compiled blocks** with SANA_STREAM_COMPILE=1 (`compile_enabled`).
- **CUDA graphs.** On CUDA each distinct signature (and batch size) is captured once into a graph over static
  buffers (`DiTModel.forward_step` is pure: no cache bookkeeping, no host synchronisation); a forward is then a few
  buffer copies and one replay. The first chunks of a stream have their own signatures (no history, then the
  sink-only window), so a stream uses three graphs; all graphs share one memory pool.

The batched and graphed paths compute the same function as `SanaStreamingDiT.forward` with the session's cache;
equality is tested on the CPU (batching) and measured on the GPU (graphs), see loadtest/results/.

Non-goals: deciding which sessions to batch together (the Generator deployment does), VAE work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.model.cache import DiTCache, LayerRead, LayerWrite
from engine.model.fast_ops import fused_enabled
from engine.model.hybrid_dit import SanaStreamingDiT
from engine.sampler import StreamingSchedule, cfg_combine


@dataclass
class ChunkJob:
    """One session's next chunk."""

    cache: DiTCache
    source: Tensor
    """(1, C, T, h, w) source latents of the chunk, model dtype, on the model's device."""
    noise: Tensor
    """(1, C, T, h, w) fp32 initial noise."""
    text: Tensor
    """(b, L, caption_channels): b = 1, or 2 with CFG as [negative, prompt]."""
    mask: Tensor
    """(b, L) text mask."""
    schedule: StreamingSchedule
    cfg_scale: float = 1.0
    efficient_cache: bool = False
    is_last: bool = False
    text_cache: tuple[dict, object] | None = None
    """(a dict the session keeps across chunks, the object whose identity marks the current prompt): where the
    runner keeps the text's cross-attention keys/values instead of projecting the text again every chunk."""
    result: Tensor | None = field(default=None, init=False)
    """(1, C, T, h, w) fp32 denoised latents, set by `ChunkRunner.run`."""
    _reads: list[LayerRead] | None = field(default=None, init=False, repr=False)

    @property
    def branches(self) -> int:
        return self.text.shape[0]

    def reads(self, model: SanaStreamingDiT) -> list[LayerRead]:
        """Every block's read of this session's cache for the chunk (built once: it concatenates the window)."""
        if self._reads is None:
            tokens = self.source.shape[2] * self.source.shape[3] * self.source.shape[4]
            self._reads = [self.cache.read(b.index, tokens) for b in model.blocks]
        return self._reads

    def signature(self, model: SanaStreamingDiT) -> tuple:
        """Everything that fixes the shapes of this job's forwards (jobs with equal signatures batch together)."""
        reads = self.reads(model)
        window = next((r.past_kv[0].shape[1] for r in reads if r.past_kv is not None), 0)
        history = any(r.gdn_state is not None or r.ffn_ctx is not None for r in reads)
        return (
            tuple(self.source.shape),
            self.branches,
            window,
            history,
            tuple(self.schedule.timesteps.tolist()),
            self.efficient_cache,
            self.is_last,
        )


def _cat_reads(per_job: list[list[LayerRead]]) -> list[LayerRead]:
    """Stack the jobs' cache reads along the batch, block by block (a lone job's reads are used as they are)."""
    if len(per_job) == 1:
        return per_job[0]
    out = []
    for reads in zip(*per_job):
        r0 = reads[0]
        out.append(
            LayerRead(
                gdn_state=None
                if r0.gdn_state is None
                else (torch.cat([r.gdn_state[0] for r in reads]), torch.cat([r.gdn_state[1] for r in reads])),
                past_kv=None
                if r0.past_kv is None
                else (torch.cat([r.past_kv[0] for r in reads]), torch.cat([r.past_kv[1] for r in reads])),
                ffn_ctx=None if r0.ffn_ctx is None else torch.cat([r.ffn_ctx for r in reads]),
                kv_tail=r0.kv_tail,
            )
        )
    return out


def _slice_writes(writes: list[LayerWrite], start: int, stop: int) -> list[LayerWrite]:
    def s(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[start:stop]

    return [
        LayerWrite(
            gdn_state=None if w.gdn_state is None else (w.gdn_state[0][start:stop], w.gdn_state[1][start:stop]),
            kv=None if w.kv is None else (w.kv[0][start:stop], w.kv[1][start:stop]),
            ffn_last=s(w.ffn_last),
        )
        for w in writes
    ]


class _Graph:
    """One captured `forward_step` over static input/output buffers.

    Inputs that stay fixed for a whole chunk (source, text, RoPE table, cache reads: hundreds of MB at 2B with
    the softmax window) are copied in once per chunk (`load_chunk`); each forward copies only x and timestep."""

    PER_FORWARD = ("x", "timestep")

    def __init__(self, model: SanaStreamingDiT, inputs: dict, pool) -> None:
        self.inputs = {k: _static(v) for k, v in inputs.items()}
        self._chunk_token: object | None = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (autotuning, lazy init)
            for _ in range(2):
                model.forward_step(**self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.v, self.writes, _ = model.forward_step(**self.inputs)

    def __call__(self, inputs: dict, chunk_token: object) -> tuple[Tensor, list[LayerWrite]]:
        """Replay on `inputs`; the per-chunk inputs are copied only when `chunk_token` differs from the last call's
        (the runner passes one fresh token per group of forwards that share them)."""
        if chunk_token is not self._chunk_token:
            _copy_into({k: v for k, v in self.inputs.items() if k not in self.PER_FORWARD}, inputs)
            self._chunk_token = chunk_token
        _copy_into({k: self.inputs[k] for k in self.PER_FORWARD}, inputs)
        self.graph.replay()
        return self.v, self.writes


def _static(v):
    if isinstance(v, Tensor):
        return v.clone()
    if isinstance(v, list):
        return [_static(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_static(x) for x in v)
    if isinstance(v, LayerRead):
        return LayerRead(_static(v.gdn_state), _static(v.past_kv), _static(v.ffn_ctx), v.kv_tail)
    return v


def _copy_into(dst, src) -> None:
    if isinstance(dst, Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)
    elif isinstance(dst, LayerRead):
        _copy_into(dst.gdn_state, src.gdn_state)
        _copy_into(dst.past_kv, src.past_kv)
        _copy_into(dst.ffn_ctx, src.ffn_ctx)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without stalling the host: from pinned memory, asynchronously (a pageable copy waits for the
    device to reach it, i.e. for every queued forward)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def compile_enabled(device: torch.device) -> bool:
    """torch.compile the DiT blocks on CUDA when SANA_STREAM_COMPILE=1. Off by default: since the block kernels
    (kernels/fused/triton_block.py) it is slower than the default path at 2B (175 vs 192 DiT FPS: Inductor copies
    the projections' column views before the custom ops; loadtest/results/README.md), and each new shape (batch
    size, window length) costs ~11 s of compilation."""
    return device.type == "cuda" and os.environ.get("SANA_STREAM_COMPILE", "0") == "1"


def cuda_graphs_enabled(device: torch.device) -> bool:
    """Graphs on CUDA unless SANA_STREAM_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("SANA_STREAM_CUDA_GRAPHS", "1") != "0"


class ChunkRunner:
    """Runs chunk jobs of any number of sessions, batching compatible ones and replaying CUDA graphs."""

    def __init__(self, model: SanaStreamingDiT, cuda_graphs: bool | None = None, max_batch: int = 8) -> None:
        self.model = model
        self.device = model.x_embedder.proj.weight.device
        self.cuda_graphs = cuda_graphs_enabled(self.device) if cuda_graphs is None else cuda_graphs
        self.max_batch = max_batch
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        if fused_enabled(self.device) and not model.training and not model.projections_fused:
            model.fuse_projections()
        if compile_enabled(self.device) and not model.blocks_compiled:
            model.compile_blocks()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    @torch.no_grad()
    def run(self, jobs: list[ChunkJob]) -> list[Tensor]:
        """Denoise every job's chunk (and write its cache); returns each job's (1, C, T, h, w) fp32 latents."""
        groups: dict[tuple, list[ChunkJob]] = {}
        for job in jobs:
            groups.setdefault(job.signature(self.model), []).append(job)
        for sig, group in groups.items():
            for i in range(0, len(group), self.max_batch):
                self._run_group(sig, group[i : i + self.max_batch])
        return [job.result for job in jobs]  # type: ignore[misc]

    def _forward(self, sig: tuple, inputs: dict, chunk_token: object) -> tuple[Tensor, list[LayerWrite]]:
        if not self.cuda_graphs:
            v, writes, _ = self.model.forward_step(**inputs)
            return v, writes
        key = (*sig, inputs["x"].shape[0], inputs["text_mask"] is None)
        if key not in self._graphs:
            self._graphs[key] = _Graph(self.model, inputs, self._pool)
        return self._graphs[key](inputs, chunk_token)

    def _text_context(self, jobs: list[ChunkJob]) -> tuple[list[tuple[Tensor, Tensor]], bool]:
        """Every block's text keys/values for the jobs, stacked along the batch, and whether no text has padding
        (then the cross-attention needs no mask). Computed once per prompt and session (kept in the job's
        text_cache; the padding check reads the mask once), not per chunk: 20 small eager projections the host
        would otherwise launch while the device waits."""
        per_job, full = [], True
        for j in jobs:
            hit = j.text_cache[0].get("dit_text_ctx") if j.text_cache is not None else None
            if hit is None or hit[0] is not j.text_cache[1] or hit[1] is not self.model:
                owner = None if j.text_cache is None else j.text_cache[1]
                # Unpadded text runs without a mask; checking reads the mask on the host: only when cached.
                unpadded = owner is not None and bool(j.mask.bool().all())
                hit = (owner, self.model, self.model.text_context(j.text), unpadded)
                if j.text_cache is not None:
                    j.text_cache[0]["dit_text_ctx"] = hit
            per_job.append(hit[2])
            full = full and hit[3]
        if len(per_job) == 1:
            return per_job[0], full
        layers = range(len(per_job[0]))
        return [(torch.cat([c[i][0] for c in per_job]), torch.cat([c[i][1] for c in per_job])) for i in layers], full

    def _run_group(self, sig: tuple, jobs: list[ChunkJob]) -> None:
        m = self.model
        T, H, W = jobs[0].source.shape[2:]
        bs = [j.branches for j in jobs]
        starts = [sum(bs[:i]) for i in range(len(jobs))]

        def per_branch(t: Tensor, job: ChunkJob) -> Tensor:
            return t.expand(job.branches, *t.shape[1:])

        rope = torch.cat([per_branch(m.rope.table(j.cache.next_frame, T, H, W, self.device)[None], j) for j in jobs])
        text_ctx, unpadded = self._text_context(jobs)
        inputs = {
            "source": torch.cat([per_branch(j.source, j) for j in jobs]),
            "text": None,
            "text_ctx": text_ctx,
            "text_mask": None if unpadded else torch.cat([j.mask for j in jobs]),
            "rope": rope,
            "reads": _cat_reads([j.reads(m) for j in jobs]),
        }
        xs = [_to_device(j.noise, self.device) for j in jobs]
        chunk_token = object()  # every forward below shares the per-chunk inputs
        sched = jobs[0].schedule
        n = len(sched)

        def forward(latents: list[Tensor], t: list[Tensor]) -> tuple[list[Tensor], list[LayerWrite]]:
            inputs["x"] = torch.cat([per_branch(x.to(m.dtype), j) for x, j in zip(latents, jobs)])
            inputs["timestep"] = torch.cat(t).float()
            v, writes = self._forward(sig, inputs, chunk_token)
            vs = []
            for j, s in zip(jobs, starts):
                vj = v[s : s + j.branches]
                vs.append(cfg_combine(vj[:1], vj[1:], j.cfg_scale) if j.branches > 1 else vj)
            return vs, writes

        for i in range(n):
            vs, writes = forward(xs, [j.schedule.timestep(i, j.branches, self.device) for j in jobs])
            if i == n - 1 and jobs[0].efficient_cache and not jobs[0].is_last:
                self._write(jobs, starts, writes, T)
            xs = [j.schedule.step(v, i, x) for j, v, x in zip(jobs, vs, xs)]
        if not jobs[0].efficient_cache and not jobs[0].is_last:
            _, writes = forward(xs, [torch.zeros(j.branches, device=self.device) for j in jobs])
            self._write(jobs, starts, writes, T)
        elif jobs[0].is_last:  # the last chunk's cache is never read: only advance the cursor
            for j in jobs:
                j.cache.chunk_frames.append(T)
        for j, x in zip(jobs, xs):
            j.result = x

    @staticmethod
    def _write(jobs: list[ChunkJob], starts: list[int], writes: list[LayerWrite], T: int) -> None:
        for j, s in zip(jobs, starts):
            j.cache.write(_slice_writes(writes, s, s + j.branches), T)
