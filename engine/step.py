"""The per-chunk DiT work of streaming sessions: batched across sessions, replayed from CUDA graphs.

One chunk of one session = `steps` denoising forwards that read the session's cache, then (unless it is the last
chunk) one t = 0 forward on the clean result that writes it (`efficient_cache`: the last denoising step writes
instead). That refresh computes only what the cache keeps (`forward_step(cache_only=True)`: no velocity, and the
last block's output for the last frame alone, whose FFN context is all the cache takes from there;
SANA_STREAM_PRUNED_REFRESH=0 runs it whole). `ChunkRunner.run(jobs)` does that for many sessions at once:

- **Batching.** Jobs whose forwards have the same shapes (chunk frames, latent grid, softmax window length,
  history present or not, CFG or not, schedule) share every forward: their latents, sources, texts, per-sample
  RoPE tables and cache reads are stacked along the batch, each keeps its own timestep, and the writes are split
  back to each session's cache. Sessions at different chunk indices batch as long as their windows have equal
  length (all sessions past chunk 1 do, with the default window).
- **Fused projections.** Where the fast path is on (`fused_enabled`: CUDA, unless SANA_STREAM_FUSED=0), the
  runner fuses the model's projections once (`SanaStreamingDiT.fuse_projections`).
- **Compiled blocks** with SANA_STREAM_COMPILE=1 (`compile_enabled`).
- **CUDA graphs.** On CUDA each distinct signature (and batch composition) is captured once into a graph over
  static buffers, replayed for every chunk of every session with that signature. By default the graph holds the
  whole chunk (`_ChunkGraph`: every denoising forward, the CFG combines, the Euler updates and the t = 0 refresh),
  so a chunk is one replay and the host launches nothing between its forwards; SANA_STREAM_CHUNK_GRAPHS=0 captures
  one forward per graph instead (`_Graph`; the Euler steps then run eagerly between replays).
  `DiTModel.forward_step` is pure (no cache bookkeeping, no host synchronisation). The per-chunk inputs are copied
  from where the sessions' caches hold them, each only if its buffer does not hold it already (`StaticInputs`).
  The first chunks of a stream have their own signatures (no history, then the sink-only window), so a stream uses
  three graphs; all graphs share one memory pool.

The batched and graphed paths compute the same function as `SanaStreamingDiT.forward` with the session's cache;
equality is tested on the CPU (batching) and measured on the GPU (graphs), see loadtest/results/.

Non-goals: deciding which sessions to batch together (the Generator deployment does), VAE work.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.model.cache import DiTCache, LayerRead, LayerSource, LayerWrite
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
    _sources: list[LayerSource] | None = field(default=None, init=False, repr=False)
    _reads: list[LayerRead] | None = field(default=None, init=False, repr=False)

    @property
    def branches(self) -> int:
        return self.text.shape[0]

    def sources(self, model: SanaStreamingDiT) -> list[LayerSource]:
        """Every block's cache entries for the chunk, as the cache holds them (no copy)."""
        if self._sources is None:
            self._sources = [self.cache.source(b.index) for b in model.blocks]
        return self._sources

    def reads(self, model: SanaStreamingDiT) -> list[LayerRead]:
        """Every block's read of this session's cache for the chunk (built once: it concatenates the window;
        only the eager path and graph captures need it)."""
        if self._reads is None:
            tokens = self.source.shape[2] * self.source.shape[3] * self.source.shape[4]
            self._reads = [src.read(tokens) for src in self.sources(model)]
        return self._reads

    def signature(self, model: SanaStreamingDiT) -> tuple:
        """Everything that fixes the shapes of this job's forwards (jobs with equal signatures batch together)."""
        sources = self.sources(model)
        window = next((s.window_tokens for s in sources if s.kv_parts), 0)
        history = any(s.gdn_state is not None or s.ffn_ctx is not None for s in sources)
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


class StaticInputs:
    """The static input buffers of one captured forward, and their loading.

    Inputs that stay fixed for a whole chunk (source, text, RoPE table, cache entries: hundreds of MB at 2B with
    the softmax window) are loaded once per chunk (`load_chunk`), straight from where each session's cache holds
    them (the window's chunks into their rows of the static window buffer, no concatenation first), and only
    where the buffer does not already hold that very tensor: a session's sink chunk and its prompt's text
    keys/values are copied once, not every chunk. Each forward copies only x and timestep (`load_forward`); a
    whole-chunk graph has no per-forward inputs (`per_forward=()`: its noise is a per-chunk input)."""

    PER_FORWARD = ("x", "timestep")

    def __init__(self, inputs: dict, per_forward: tuple[str, ...] = PER_FORWARD) -> None:
        self.per_forward = per_forward
        self.inputs = {k: _static(v) for k, v in inputs.items()}
        self.copies = 0
        """Tensors copied in so far (the ones found already held are not counted)."""
        self._held: dict[tuple, tuple[weakref.ref, int]] = {}
        """static slot -> (the tensor last copied there, its version then)."""
        self._layouts: dict[tuple[int, int], tuple[int, ...]] = {}
        """(block, first batch row) -> rows of each window part last loaded there."""
        self.chunk_token: object | None = None
        """The token of the chunk whose inputs the buffers hold (`_Graph`: one per group of forwards)."""

    def load_chunk(self, inputs: dict, sources: list[tuple[list[LayerSource], int, int]]) -> None:
        """inputs: everything but x, timestep and the cache reads; sources: (per-block cache entries, first
        batch row, rows) of each job, in batch order."""
        for k, v in self.inputs.items():
            if k not in self.per_forward and k != "reads":
                self._load((k,), v, inputs[k])
        for layer, read in enumerate(self.inputs["reads"]):
            for blocks, start, rows in sources:
                self._load_block(layer, read, blocks[layer], start, slice(start, start + rows))

    def load_forward(self, inputs: dict) -> None:
        for k in self.per_forward:
            self.inputs[k].copy_(inputs[k])

    def _put(self, slot: tuple, dst: Tensor, src: Tensor) -> None:
        """dst <- src unless dst already holds this tensor (same object, not modified since)."""
        held = self._held.get(slot)
        if held is not None and held[0]() is src and held[1] == src._version:
            return
        dst.copy_(src)
        self.copies += 1
        self._held[slot] = (weakref.ref(src), src._version)

    def _load(self, slot: tuple, dst, src) -> None:
        if isinstance(dst, Tensor):
            self._put(slot, dst, src)
        elif isinstance(dst, (list, tuple)):
            for i, (d, s) in enumerate(zip(dst, src)):
                self._load((*slot, i), d, s)

    def _load_block(self, layer: int, read: LayerRead, src: LayerSource, start: int, at: slice) -> None:
        if read.gdn_state is not None:
            self._put((layer, "M", start), read.gdn_state[0][at], src.gdn_state[0])
            self._put((layer, "z", start), read.gdn_state[1][at], src.gdn_state[1])
        if read.ffn_ctx is not None:
            self._put((layer, "ffn", start), read.ffn_ctx[at], src.ffn_ctx)
        if read.past_kv is None:
            return
        layout = tuple(k.shape[1] for k, _ in src.kv_parts)
        if self._layouts.get((layer, start)) != layout:  # other rows per part: none of them is held
            self._layouts[(layer, start)] = layout
            for key in [key for key in self._held if key[:3] in ((layer, "k", start), (layer, "v", start))]:
                del self._held[key]
        row = 0
        for i, (k, v) in enumerate(src.kv_parts):
            rows = slice(row, row + k.shape[1])
            self._put((layer, "k", start, i), read.past_kv[0][at, rows], k)
            self._put((layer, "v", start, i), read.past_kv[1][at, rows], v)
            row += k.shape[1]
        if row + read.kv_tail != read.past_kv[0].shape[1]:
            raise RuntimeError(
                f"block {layer}: a window of {row} rows for buffers of {read.past_kv[0].shape[1] - read.kv_tail}"
            )


def _capture_cuda(fn, pool) -> tuple:
    """Capture `fn()` (reading only static buffers) into a CUDA graph: (replay, fn's outputs as the graph's static
    output buffers). Two warm-up calls on a side stream first (autotuning, lazy initialisation, workspaces)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph.replay, outputs


_capture = _capture_cuda
"""How `_Graph` and `_ChunkGraph` capture; tests substitute an eager stand-in with the same contract (outputs
live in fixed buffers that each replay overwrites, inputs are read from the static buffers at replay)."""


class _Graph:
    """One captured `forward_step` over `StaticInputs`, which the refresh's graph (cache_only) shares with the
    denoising forwards' graph of the same signature: the chunk's inputs are loaded once for both."""

    def __init__(self, model: SanaStreamingDiT, static: StaticInputs, pool, cache_only: bool = False) -> None:
        self.static = static
        step = lambda: model.forward_step(**static.inputs, cache_only=cache_only)  # noqa: E731
        self.replay, (self.v, self.writes, _) = _capture(step, pool)

    @property
    def inputs(self) -> dict:
        return self.static.inputs

    def __call__(
        self, inputs: dict, chunk_token: object, sources: list[tuple[list[LayerSource], int, int]]
    ) -> tuple[Tensor, list[LayerWrite]]:
        """Replay on `inputs` and the jobs' cache entries (`StaticInputs.load_chunk`); the per-chunk inputs are
        loaded only when `chunk_token` differs from the last call's (the runner passes one fresh token per group
        of forwards that share them)."""
        if chunk_token is not self.static.chunk_token:
            self.static.load_chunk(inputs, sources)
            self.static.chunk_token = chunk_token
        self.static.load_forward(inputs)
        self.replay()
        return self.v, self.writes


class _ChunkGraph:
    """One whole chunk of a group of jobs captured as one graph: every denoising forward, the CFG combines, the
    Euler updates and the t = 0 refresh (`ChunkRunner._denoise` over `forward_step`), from the jobs' noise to their
    denoised latents and the cache writes. The host launches one replay per chunk; nothing runs eagerly between the
    forwards. Replayed for any jobs with the same signature, branches and CFG scales (the scales are constants of
    the captured combine)."""

    def __init__(
        self, runner: ChunkRunner, plans: list[_Plan], efficient: bool, is_last: bool, inputs: dict, pool
    ) -> None:
        self.static = StaticInputs(inputs, per_forward=())
        m, st = runner.model, self.static.inputs
        fixed = {k: st[k] for k in ("source", "text", "text_ctx", "text_mask", "rope", "reads")}

        def forward(x: Tensor, t: Tensor, cache_only: bool = False) -> tuple[Tensor | None, list[LayerWrite]]:
            v, writes, _ = m.forward_step(x=x, timestep=t, cache_only=cache_only, **fixed)
            return v, writes

        def chunk() -> tuple[list[Tensor], list[LayerWrite] | None]:
            return runner._denoise(plans, efficient, is_last, list(st["noise"]), forward)

        self.replay, (self.xs, self.writes) = _capture(chunk, pool)

    @property
    def inputs(self) -> dict:
        return self.static.inputs

    def __call__(
        self, inputs: dict, sources: list[tuple[list[LayerSource], int, int]]
    ) -> tuple[list[Tensor], list[LayerWrite] | None]:
        """Load the chunk's inputs (noise included) and the jobs' cache entries, replay; returns the graph's own
        output buffers (the next replay overwrites them)."""
        self.static.load_chunk(inputs, sources)
        self.replay()
        return self.xs, self.writes


def _per_branch(t: Tensor, branches: int) -> Tensor:
    """A job's (1, ...) tensor for each of its CFG branches."""
    return t.expand(branches, *t.shape[1:])


def _graph_pool():
    return torch.cuda.graph_pool_handle()


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


def pruned_refresh_enabled() -> bool:
    """The t = 0 refresh computes only what the cache keeps (`forward_step(cache_only=True)`: no velocity, the
    last block for the last frame alone) unless SANA_STREAM_PRUNED_REFRESH=0 (then it runs the full forward and
    drops the velocity, as the release does)."""
    return os.environ.get("SANA_STREAM_PRUNED_REFRESH", "1") != "0"


def chunk_graphs_enabled() -> bool:
    """Where graphs are on: one graph per whole chunk unless SANA_STREAM_CHUNK_GRAPHS=0 (then one per forward)."""
    return os.environ.get("SANA_STREAM_CHUNK_GRAPHS", "1") != "0"


@dataclass(frozen=True)
class _Plan:
    """What the denoising loop of one job depends on besides its tensors (a captured chunk keeps these, not the
    job: a graph must not hold a session's cache alive)."""

    branches: int
    schedule: StreamingSchedule
    cfg_scale: float


class ChunkRunner:
    """Runs chunk jobs of any number of sessions, batching compatible ones and replaying CUDA graphs."""

    def __init__(
        self,
        model: SanaStreamingDiT,
        cuda_graphs: bool | None = None,
        max_batch: int = 8,
        chunk_graphs: bool | None = None,
        pruned_refresh: bool | None = None,
    ) -> None:
        """cuda_graphs: None = on for CUDA (`cuda_graphs_enabled`); chunk_graphs: with graphs on, one graph per
        whole chunk (None = `chunk_graphs_enabled`) or one per forward; pruned_refresh: None =
        `pruned_refresh_enabled`."""
        self.model = model
        self.device = model.x_embedder.proj.weight.device
        self.cuda_graphs = cuda_graphs_enabled(self.device) if cuda_graphs is None else cuda_graphs
        self.chunk_graphs = self.cuda_graphs and (chunk_graphs_enabled() if chunk_graphs is None else chunk_graphs)
        self.max_batch = max_batch
        self.pruned_refresh = pruned_refresh_enabled() if pruned_refresh is None else pruned_refresh
        self._graphs: dict[tuple, _Graph] = {}
        self._statics: dict[tuple, StaticInputs] = {}
        """Static buffers of the per-forward graphs, per signature (the denoising and the refresh graph share them)."""
        self._chunk_graphs: dict[tuple, _ChunkGraph] = {}
        self._pool = _graph_pool() if self.cuda_graphs else None
        if fused_enabled(self.device) and not model.training and not model.projections_fused:
            model.fuse_projections()
        if compile_enabled(self.device) and not model.blocks_compiled:
            model.compile_blocks()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs) + len(self._chunk_graphs)

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

    def _forward(
        self,
        sig: tuple,
        inputs: dict,
        chunk_token: object,
        jobs: list[ChunkJob],
        starts: list[int],
        cache_only: bool = False,
    ) -> tuple[Tensor | None, list[LayerWrite]]:
        m = self.model
        if not self.cuda_graphs:  # the reads were built once for the chunk (`_run_group`)
            v, writes, _ = m.forward_step(**inputs, cache_only=cache_only)
            return v, writes
        key = (*sig, inputs["x"].shape[0], inputs["text_mask"] is None)
        graph = self._graphs.get((*key, cache_only))
        if graph is None:
            static = self._statics.get(key)
            if static is None:
                static = self._statics[key] = StaticInputs(dict(inputs, reads=_cat_reads([j.reads(m) for j in jobs])))
            graph = self._graphs[(*key, cache_only)] = _Graph(m, static, self._pool, cache_only)
        return graph(inputs, chunk_token, [(j.sources(m), s, j.branches) for j, s in zip(jobs, starts)])

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
        rope = torch.cat([_per_branch(m.rope.table(j.cache.next_frame, T, H, W, self.device)[None], j.branches)
                          for j in jobs])  # fmt: skip
        text_ctx, unpadded = self._text_context(jobs)
        inputs = {
            "source": torch.cat([_per_branch(j.source, j.branches) for j in jobs]),
            "text": None,
            "text_ctx": text_ctx,
            "text_mask": None if unpadded else torch.cat([j.mask for j in jobs]),
            "rope": rope,
            "reads": None,  # built from the jobs' cache entries where needed (eager path, captures)
        }
        xs = [_to_device(j.noise, self.device) for j in jobs]
        plans = [_Plan(j.branches, j.schedule, j.cfg_scale) for j in jobs]
        efficient, is_last = jobs[0].efficient_cache, jobs[0].is_last
        if self.chunk_graphs:
            key = (*sig, sum(bs), unpadded, tuple(p.cfg_scale if p.branches > 1 else 1.0 for p in plans))
            graph = self._chunk_graphs.get(key)
            if graph is None:
                reads = _cat_reads([j.reads(m) for j in jobs])
                graph = _ChunkGraph(self, plans, efficient, is_last, dict(inputs, reads=reads, noise=xs), self._pool)
                self._chunk_graphs[key] = graph
            outs, writes = graph(dict(inputs, noise=xs), [(j.sources(m), s, j.branches) for j, s in zip(jobs, starts)])
            xs = [x.clone() for x in outs]  # the next replay overwrites the graph's buffers
        else:
            if not self.cuda_graphs:
                inputs["reads"] = _cat_reads([j.reads(m) for j in jobs])
            chunk_token = object()  # every forward below shares the per-chunk inputs

            def forward(x: Tensor, t: Tensor, cache_only: bool = False) -> tuple[Tensor | None, list[LayerWrite]]:
                return self._forward(sig, dict(inputs, x=x, timestep=t), chunk_token, jobs, starts, cache_only)

            xs, writes = self._denoise(plans, efficient, is_last, xs, forward)
        if writes is not None:
            self._write(jobs, starts, writes, T)
        elif is_last:  # the last chunk's cache is never read: only advance the cursor
            for j in jobs:
                j.cache.chunk_frames.append(T)
        for j, x in zip(jobs, xs):
            j.result = x

    def _denoise(
        self, plans: list[_Plan], efficient: bool, is_last: bool, xs: list[Tensor], forward
    ) -> tuple[list[Tensor], list[LayerWrite] | None]:
        """The chunk's sampling loop on device tensors alone (no host synchronisation, so a graph can hold it):
        `steps` denoising forwards with CFG and Euler updates, then the t = 0 refresh unless the last step saves
        (efficient_cache) or nothing will read the cache (the last chunk).

        xs: each job's (1, C, T, h, w) fp32 noise; forward(x, timestep, cache_only=False) -> (velocity, writes)
        for the batch (cache_only: the writes alone, velocity None; the refresh's, unless `pruned_refresh_enabled`
        is off). Returns each job's fp32 latents and the writes to store (None: store nothing)."""
        dtype, device = self.model.dtype, self.device
        n = len(plans[0].schedule)

        def batch(latents: list[Tensor]) -> Tensor:
            return torch.cat([_per_branch(x.to(dtype), p.branches) for x, p in zip(latents, plans)])

        def velocities(latents: list[Tensor], t: list[Tensor]) -> tuple[list[Tensor], list[LayerWrite]]:
            v, writes = forward(batch(latents), torch.cat(t).float())
            vs, start = [], 0
            for p in plans:
                vj = v[start : start + p.branches]
                vs.append(cfg_combine(vj[:1], vj[1:], p.cfg_scale) if p.branches > 1 else vj)
                start += p.branches
            return vs, writes

        saved = None
        for i in range(n):
            vs, writes = velocities(xs, [p.schedule.timestep(i, p.branches, device) for p in plans])
            if i == n - 1 and efficient and not is_last:
                saved = writes
            xs = [p.schedule.step(v, i, x) for p, v, x in zip(plans, vs, xs)]
        if not efficient and not is_last:
            zeros = [torch.zeros(p.branches, device=device) for p in plans]
            if self.pruned_refresh:
                _, saved = forward(batch(xs), torch.cat(zeros), cache_only=True)
            else:
                _, saved = velocities(xs, zeros)
        return xs, saved

    @staticmethod
    def _write(jobs: list[ChunkJob], starts: list[int], writes: list[LayerWrite], T: int) -> None:
        for j, s in zip(jobs, starts):
            j.cache.write(_slice_writes(writes, s, s + j.branches), T)
