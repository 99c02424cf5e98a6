"""Per-session streaming cache of the DiT: what each layer carries from one chunk to the next.

| layer kind | carried |
| --- | --- |
| GDN | forward-scan state M (B,H,D,D) and z (B,H,D,1), fp32, cumulative over all past chunks |
| softmax | per cached chunk: post-RoPE keys and raw values (B, tokens, H, D) + its FFN context frame |
| every block | FFN temporal-conv context: the last spatial-output frame (B, C, 1, S) of the previous chunk |

Window rule of the softmax layers for chunk i (the released `SANAStreamingSampler`, cache strategy fixed_rope):
    n = num_cached_blocks; n <= 0 means the whole history.
    window = range(max(i - n, 0), i); if sink_token and n > 0 and i - n + 1 > 0: window = [0] + range(i - n + 1, i).
The softmax layers' FFN context is the last frame of the last chunk *in the window* (normally chunk i - 1; with
n = 1 and the sink it is the sink chunk's), the GDN layers' always chunk i - 1's.

Writes happen only in calls with save=True (the t = 0 refresh, or the last denoising step with efficient_cache);
chunks no future window can reach are dropped at write time, so memory stays bounded.

Non-goals: serialisation format and config checks (engine/session.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def softmax_window(chunk: int, num_cached_blocks: int, sink_token: bool) -> list[int]:
    """Indices of the past chunks whose keys/values the softmax layers see while processing `chunk`."""
    n = num_cached_blocks
    if chunk <= 0:
        return []
    if n <= 0:
        return list(range(chunk))
    window = list(range(max(chunk - n, 0), chunk))
    if sink_token and chunk - n + 1 > 0:
        window = [0, *range(chunk - n + 1, chunk)]
    return window


def _own(t: Tensor) -> Tensor:
    """A contiguous tensor that owns its memory (detached)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _own_frame(t: Tensor) -> Tensor:
    """An FFN context frame (B, C, 1, S) that owns its memory, laid out token-major (channels innermost), as the
    FFN produces it: copying it there or back moves whole rows instead of transposing (a channel-first copy of the
    2B model's 20 frames took ~0.5 ms per chunk). Same values, same shape; snapshots store it contiguous."""
    B, C, _, S = t.shape
    return t.new_empty((B, 1, S, C)).permute(0, 3, 1, 2).copy_(t.detach())


def _window_buffer(parts: list[Tensor], tail: int) -> Tensor:
    """The parts (B, n_i, heads, D) one after another along dim 1, plus `tail` rows left uninitialised."""
    if not tail:
        return torch.cat(parts, dim=1)
    first = parts[0]
    out = first.new_empty((first.shape[0], sum(p.shape[1] for p in parts) + tail, *first.shape[2:]))
    torch.cat(parts, dim=1, out=out[:, :-tail])
    return out


@dataclass
class LayerSource:
    """What one block reads for the next chunk, as the cache holds it (nothing copied): the GDN state, the softmax
    window's chunks in order as (k, v) pairs, the FFN context frame. `read` lays the window out in one buffer; the
    CUDA-graph runner copies the parts straight into its static buffers instead (and skips the ones it already
    holds, such as the sink chunk)."""

    gdn_state: tuple[Tensor, Tensor] | None = None
    kv_parts: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    ffn_ctx: Tensor | None = None

    @property
    def window_tokens(self) -> int:
        return sum(k.shape[1] for k, _ in self.kv_parts)

    def read(self, tail_tokens: int = 0) -> LayerRead:
        if not self.kv_parts:
            return LayerRead(gdn_state=self.gdn_state, ffn_ctx=self.ffn_ctx)
        k = _window_buffer([k for k, _ in self.kv_parts], tail_tokens)
        v = _window_buffer([v for _, v in self.kv_parts], tail_tokens)
        return LayerRead(past_kv=(k, v), ffn_ctx=self.ffn_ctx, kv_tail=tail_tokens)


@dataclass
class LayerRead:
    """What one block reads from the cache for the current chunk."""

    gdn_state: tuple[Tensor, Tensor] | None = None
    past_kv: tuple[Tensor, Tensor] | None = None
    ffn_ctx: Tensor | None = None
    kv_tail: int = 0
    """Rows at the end of past_kv's buffers that are not history but room for the current chunk's keys/values
    (`DiTCache.read(tail_tokens=...)`): the attention layer writes them there and attends over the whole buffer,
    instead of concatenating window and chunk in every forward."""


@dataclass
class LayerWrite:
    """What one block produced that the cache may keep (only stored when the call saves)."""

    gdn_state: tuple[Tensor, Tensor] | None = None
    kv: tuple[Tensor, Tensor] | None = None
    ffn_last: Tensor | None = None


@dataclass
class DiTCache:
    """Streaming cache of one session (batch dimension = the session's CFG branches, usually 1)."""

    softmax_layers: tuple[int, ...]
    num_cached_blocks: int = 2
    sink_token: bool = True
    chunk_frames: list[int] = field(default_factory=list)
    """Frame counts of the chunks written so far; the next chunk's index is len(chunk_frames)."""
    gdn: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    ffn: dict[int, Tensor] = field(default_factory=dict)
    """GDN blocks: FFN context of the last written chunk."""
    kv: dict[int, dict[int, dict[str, Tensor]]] = field(default_factory=dict)
    """Softmax blocks: layer -> chunk -> {"k", "v", "ffn"}."""

    @property
    def chunk_index(self) -> int:
        return len(self.chunk_frames)

    @property
    def next_frame(self) -> int:
        return sum(self.chunk_frames)

    def window(self, chunk: int | None = None) -> list[int]:
        return softmax_window(self.chunk_index if chunk is None else chunk, self.num_cached_blocks, self.sink_token)

    def source(self, layer: int) -> LayerSource:
        """What `layer` reads for the next chunk, as held (no copy)."""
        if layer not in self.softmax_layers:
            return LayerSource(gdn_state=self.gdn.get(layer), ffn_ctx=self.ffn.get(layer))
        chunks = self.kv.get(layer, {})
        window = [c for c in self.window() if c in chunks]
        if not window:
            return LayerSource()
        parts = [(chunks[c]["k"], chunks[c]["v"]) for c in window]
        return LayerSource(kv_parts=parts, ffn_ctx=chunks[window[-1]]["ffn"])

    def read(self, layer: int, tail_tokens: int = 0) -> LayerRead:
        """What `layer` reads for the next chunk. tail_tokens > 0 (inference): the softmax window's key/value
        buffers get that many more rows at the end, for the chunk's own keys/values (`LayerRead.kv_tail`)."""
        return self.source(layer).read(tail_tokens)

    def write(self, writes: list[LayerWrite], frames: int) -> None:
        """Store the current chunk's outputs of every block, then drop what no later window can use.

        Stored tensors are compact copies: never views that would pin a whole activation in memory, and always
        the same memory layout (contiguous; FFN frames token-major), so a restored snapshot computes exactly what
        the live session would."""
        chunk = self.chunk_index
        for layer, w in enumerate(writes):
            assert w.ffn_last is not None
            ffn = _own_frame(w.ffn_last)
            if layer in self.softmax_layers:
                assert w.kv is not None
                self.kv.setdefault(layer, {})[chunk] = {"k": _own(w.kv[0]), "v": _own(w.kv[1]), "ffn": ffn}
            else:
                assert w.gdn_state is not None
                self.gdn[layer] = (_own(w.gdn_state[0]), _own(w.gdn_state[1]))
                self.ffn[layer] = ffn
        self.chunk_frames.append(frames)
        self._prune()

    def _prune(self) -> None:
        n = self.num_cached_blocks
        if n <= 0:
            return
        # The next window starts at (index - n + 1) with the sink, (index - n) without; later ones start later.
        first = self.chunk_index - n + (1 if self.sink_token else 0)
        for chunks in self.kv.values():
            for c in [c for c in chunks if c < first and not (self.sink_token and c == 0)]:
                del chunks[c]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # --- flat view for snapshots -------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor under a stable name (`gdn.{layer}.state_kv`, `softmax.{layer}.{chunk}.k`, ...)."""
        out: dict[str, Tensor] = {}
        for layer, (m, z) in self.gdn.items():
            out[f"gdn.{layer}.state_kv"] = m
            out[f"gdn.{layer}.state_z"] = z
        for layer, t in self.ffn.items():
            out[f"ffn.{layer}"] = t
        for layer, chunks in self.kv.items():
            for c, parts in chunks.items():
                for name, t in parts.items():
                    out[f"softmax.{layer}.{c}.{name}"] = t
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.gdn.clear()
        self.ffn.clear()
        self.kv.clear()
        pending: dict[int, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            kind, layer, *rest = key.split(".")
            if kind == "gdn":
                pending.setdefault(int(layer), {})[rest[0]] = t
            elif kind == "ffn":
                self.ffn[int(layer)] = _own_frame(t)
            elif kind == "softmax":
                self.kv.setdefault(int(layer), {}).setdefault(int(rest[0]), {})[rest[1]] = (
                    _own_frame(t) if rest[1] == "ffn" else t
                )
            else:
                raise ValueError(f"unknown DiT cache entry {key!r}")
        for layer, parts in pending.items():
            self.gdn[layer] = (parts["state_kv"], parts["state_z"])
