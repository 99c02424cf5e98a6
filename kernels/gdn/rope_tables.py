"""RoPE tables as the GDN kernels read them: full (N, D/2) cos / sin, or per-axis rows of a 3-D grid.

The engine keeps RoPE as a complex128 ([B,] N, D/2) table (`engine.model.layers.RoPE3D`). The kernels take
fp32 (or bf16) cos / sin with a batch stride that is a multiple of 16 elements (so their loads vectorise);
`rope_tables_cached` builds those once per table. `Rope3DTables` stores the same rotation per axis (frames,
grid rows, grid columns: T + GH + GW rows instead of N); it reads fewer bytes, but its three masked loads per
table measured slower on H100 (kernels/gdn/README.md), so the engine uses full tables.

Non-goals: building RoPE angles (the engine's `RoPE3D` does), other position layouts.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rope3DTables:
    """RoPE tables of a (frame, row, column) token grid, stored per axis (the engine's `RoPE3D` layout).

    Channel pair i of token (t, r, c) rotates by an angle of t alone for i < PT, of r alone for PT <= i < PTH
    and of c alone for i >= PTH. Instead of (N, D/2) rows, cos / sin hold (T + GH + GW, D/2) fp32 rows: the
    chunk's T frames, then the GH grid rows, then the GW grid columns (only each axis' own columns are read).

    Attributes:
        cos, sin: (T + GH + GW, D/2) fp32, contiguous, or (B, T + GH + GW, D/2) per sample.
        frames: T; grid: (GH, GW) with S = GH * GW; pairs: (PT, PTH).
    """

    cos: Tensor
    sin: Tensor
    frames: int
    grid: tuple[int, int]
    pairs: tuple[int, int]

    @staticmethod
    def from_full(cos: Tensor, sin: Tensor, frames: int, grid: tuple[int, int], pairs: tuple[int, int]) -> Rope3DTables:
        """Slice the per-axis rows out of full ([B,] N, D/2) tables laid out as described (frame-major)."""
        GH, GW = grid
        S = GH * GW
        if cos.shape[-2] != frames * S or sin.shape != cos.shape:
            raise ValueError(f"cos, sin ([B,] {frames * S}, D/2) expected, got {tuple(cos.shape)}, {tuple(sin.shape)}")

        def pack(x: Tensor) -> Tensor:
            parts = [x[..., ::S, :], x[..., :S:GW, :], x[..., :GW, :]]
            return aligned_batches(torch.cat(parts, dim=-2).to(torch.float32))

        return Rope3DTables(pack(cos), pack(sin), frames, (GH, GW), pairs)

    def full(self) -> tuple[Tensor, Tensor]:
        """The ([B,] N, D/2) cos, sin tables these stand for (tests and references)."""
        T, (GH, GW), (pt, pth) = self.frames, self.grid, self.pairs
        i = torch.arange(self.cos.shape[-1], device=self.cos.device)
        t = torch.arange(T, device=i.device)[:, None, None, None]
        r = torch.arange(GH, device=i.device)[None, :, None, None]
        c = torch.arange(GW, device=i.device)[None, None, :, None]
        row = torch.where(i < pt, t, torch.where(i < pth, T + r, T + GH + c))  # (T, GH, GW, D/2)
        row = row.reshape(-1, i.numel())
        if self.cos.dim() == 3:
            row = row.expand(self.cos.shape[0], -1, -1)
        return self.cos.gather(-2, row), self.sin.gather(-2, row)


_ROPE_CACHE: list = []  # [(weakref to the complex table, key, (cos, sin))]: one entry, shared by all layers


def rope_tables_cached(table: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) fp32 of a complex ([B,] N, D/2) RoPE table, laid out for the kernels, reused while the
    caller passes the same tensor (the DiT builds one table per forward and hands it to every GDN layer).

    Inside CUDA-graph capture nothing is cached or reused: the graph must compute its tables from its own
    (static, rewritten before each replay) input, and a cached entry would outlive the graph's memory."""
    if table.is_cuda and torch.cuda.is_current_stream_capturing():
        return aligned_batches(table.real.to(torch.float32)), aligned_batches(table.imag.to(torch.float32))
    key = (table.data_ptr(), tuple(table.shape), table.device)
    if _ROPE_CACHE and _ROPE_CACHE[0][0]() is table and _ROPE_CACHE[0][1] == key:
        return _ROPE_CACHE[0][2]
    tabs = (aligned_batches(table.real.to(torch.float32)), aligned_batches(table.imag.to(torch.float32)))
    _ROPE_CACHE[:] = [(weakref.ref(table), key, tabs)]
    return tabs


@dataclass(frozen=True)
class RopeArgs:
    """Kernel arguments of a rotation: mode 0 none, 1 full (N, D/2) tables, 2 per-axis tables."""

    mode: int
    cos: Tensor | None
    sin: Tensor | None
    grid_w: int = 1
    grid_h: int = 1
    pt: int = 0
    pth: int = 0

    def args(self, dummy: Tensor) -> tuple:
        """(cos, sin, GRID_W, GRID_H, PT, PTH, batch stride of the tables)."""
        cos = self.cos if self.cos is not None else dummy
        sin = self.sin if self.sin is not None else dummy
        csb = cos.stride(0) if cos.dim() == 3 else 0
        return cos, sin, self.grid_w, self.grid_h, self.pt, self.pth, csb


def aligned_batches(x: Tensor) -> Tensor:
    """x ([B,] R, C) contiguous rows, with a batch stride that is a multiple of 16 elements (a view into a
    row-padded buffer when needed), so that the kernels' table loads stay vectorised."""
    x = x.contiguous()
    if x.dim() == 2 or x.stride(0) % 16 == 0:
        return x
    B, R, C = x.shape
    rows = -(-R // 16) * 16
    buf = x.new_zeros(B, rows, C)
    buf[:, :R] = x
    return buf[:, :R]


def rope_args(
    cos: Tensor | None, sin: Tensor | None, rope3d: Rope3DTables | None, N: int, D: int, T: int, S: int
) -> RopeArgs:
    if rope3d is not None:
        if cos is not None or sin is not None:
            raise ValueError("pass either cos/sin or rope3d, not both")
        GH, GW = rope3d.grid
        rows = T + GH + GW
        if rope3d.frames != T or GH * GW != S or tuple(rope3d.cos.shape[-2:]) != (rows, D // 2):
            raise ValueError(
                f"rope3d for {T} frames of {S} tokens with ([B,] {rows}, {D // 2}) tables expected, got "
                f"{rope3d.frames} frames, grid {rope3d.grid}, tables {tuple(rope3d.cos.shape)}"
            )
        pt, pth = rope3d.pairs
        return RopeArgs(2, rope3d.cos, rope3d.sin, GW, GH, pt, pth)
    if cos is None or sin is None:
        if (cos is None) != (sin is None):
            raise ValueError("cos and sin come together (both None or both given)")
        return RopeArgs(0, None, None)
    if tuple(cos.shape[-2:]) != (N, D // 2) or sin.shape != cos.shape or cos.dim() not in (2, 3):
        raise ValueError(
            f"cos, sin ([B,] N, D/2) with (N, D/2)=({N},{D // 2}) expected, got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if cos.dtype not in (torch.float32, torch.bfloat16):
        cos, sin = cos.to(torch.float32), sin.to(torch.float32)
    return RopeArgs(1, aligned_batches(cos), aligned_batches(sin))
