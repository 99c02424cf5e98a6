"""The DiT block's fused memory-bound ops (`kernels.fused`), dispatched: Triton kernels on the fast path, the
plain-PyTorch references elsewhere.

`ops(device)` returns an object with `dwconv_glu`, `ln_modulate`, `residual_ln_modulate`, `rms_norm`,
`gated_residual`, `kv_append`, `silu_gate`, `tconv_taps` and `gdn_gates` (the signatures of
`kernels.fused.naive`), or None where the block should run its own op-by-op code (the reference path: CPUs, or
SANA_STREAM_FUSED=0, see `fused_enabled`). `gdn_mixer()` is the fused GDN layer. The Triton
launchers are registered as torch custom ops (`sana::...`) with shape-only fake implementations, so
`torch.compile`d blocks keep them as single opaque calls instead of tracing into the launchers' Python.

Non-goals: the kernels themselves (kernels/fused, kernels/gdn).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch
from torch import Tensor


def fused_enabled(device: torch.device) -> bool:
    """Whether the fused fast path (concatenated projections, fused elementwise kernels) runs on `device`, from
    env SANA_STREAM_FUSED=auto|0|1: auto = on CUDA; 1 = everywhere the kernels run (the projections fuse
    anywhere; the Triton kernels need CUDA or TRITON_INTERPRET=1); 0 = the reference path."""
    mode = os.environ.get("SANA_STREAM_FUSED", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"SANA_STREAM_FUSED must be auto, 0 or 1, got {mode!r}")
    return device.type == "cuda" if mode == "auto" else mode == "1"


_MEMO: dict[str, object] = {}
"""Built once per process (plain dict, not functools.cache: torch.compile traces through cache wrappers, and
tracing an op's registration breaks the graph; `warm` fills it before any compiled call)."""


def _memo(name: str, build):
    if name not in _MEMO:
        _MEMO[name] = build()
    return _MEMO[name]


def warm(device: torch.device) -> None:
    """Register the custom ops and resolve the dispatch for `device` now (before torch.compile traces a block)."""
    from engine.model.gdn import gdn_backend

    ops(device)
    gdn_mixer()
    gdn_backend(device)


def _registered() -> SimpleNamespace | None:
    return _memo("ops", _register)  # type: ignore[return-value]


def _register() -> SimpleNamespace | None:
    """Register the custom ops once; None where triton (or the kernels module) does not import."""
    from kernels.fused import triton_ops

    k = triton_ops()
    if k is None:
        return None

    @torch.library.custom_op("sana::dwconv_glu", mutates_args=())
    def dwconv_glu(u: Tensor, weight: Tensor, bias: Tensor | None, frames: int, height: int, width: int) -> Tensor:
        return k.dwconv_glu(u, weight, bias, frames, height, width)

    @dwconv_glu.register_fake
    def _(u, weight, bias, frames, height, width):
        B, N, C2 = u.shape
        return u.new_empty((B, N, C2 // 2))

    @torch.library.custom_op("sana::ln_modulate", mutates_args=())
    def ln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
        return k.ln_modulate(x, shift, scale, eps)

    @ln_modulate.register_fake
    def _(x, shift, scale, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.custom_op("sana::residual_ln_modulate", mutates_args=())
    def residual_ln_modulate(
        x: Tensor, delta: Tensor, gate: Tensor | None, shift: Tensor, scale: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        return k.residual_ln_modulate(x, delta, gate, shift, scale, eps)

    @residual_ln_modulate.register_fake
    def _(x, delta, gate, shift, scale, eps):
        like = functools.partial(torch.empty_like, x, memory_format=torch.contiguous_format)
        return like(), like()

    from kernels.fused import triton_norm

    @torch.library.custom_op("sana::rms_norm", mutates_args=())
    def rms_norm(
        x: Tensor, weight: Tensor, eps: float, cos: Tensor | None = None, sin: Tensor | None = None, head_dim: int = 0
    ) -> Tensor:
        return triton_norm.rms_norm(x, weight, eps, cos, sin, head_dim)

    @rms_norm.register_fake
    def _(x, weight, eps, cos=None, sin=None, head_dim=0):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    from kernels.fused import triton_block

    @torch.library.custom_op("sana::gated_residual", mutates_args=())
    def gated_residual(x: Tensor, gate: Tensor, delta: Tensor) -> Tensor:
        return triton_block.gated_residual(x, gate, delta)

    @gated_residual.register_fake
    def _(x, gate, delta):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.custom_op("sana::silu_gate", mutates_args=())
    def silu_gate(out: Tensor, gate: Tensor) -> Tensor:
        return triton_block.silu_gate(out, gate)

    @silu_gate.register_fake
    def _(out, gate):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.custom_op("sana::kv_append", mutates_args=("k_buf", "v_buf"))
    def kv_append(k_buf: Tensor, v_buf: Tensor, k: Tensor, v: Tensor) -> None:
        triton_block.kv_append(k_buf, v_buf, k, v)

    @kv_append.register_fake
    def _(k_buf, v_buf, k, v):
        return None

    @torch.library.custom_op("sana::tconv_taps", mutates_args=())
    def tconv_taps(y: Tensor, ctx: Tensor | None) -> Tensor:
        return triton_block.tconv_taps(y, ctx)

    @tconv_taps.register_fake
    def _(y, ctx):
        B, T, S, C = y.shape
        return y.new_empty((B, T, S, 3 * C))

    @torch.library.custom_op("sana::gdn_gates", mutates_args=())
    def gdn_gates(p: Tensor, heads: int, frames: int, a_log: Tensor, dt_bias: Tensor, col: int) -> list[Tensor]:
        beta, decay = triton_block.gdn_gates(p, heads, frames, a_log, dt_bias, col)
        return [beta.permute(0, 2, 3, 1), decay]  # beta as its (B, T, S, heads) storage: no output aliasing

    @gdn_gates.register_fake
    def _(p, heads, frames, a_log, dt_bias, col):
        B, N, _ = p.shape
        return [p.new_empty((B, frames, N // frames, heads)), p.new_empty((B, heads, frames))]

    def gates(p: Tensor, heads: int, frames: int, a_log: Tensor, dt_bias: Tensor, col: int) -> tuple[Tensor, Tensor]:
        beta, decay = gdn_gates(p, heads, frames, a_log, dt_bias, col)
        return beta.permute(0, 3, 1, 2), decay

    return SimpleNamespace(
        dwconv_glu=dwconv_glu, ln_modulate=ln_modulate, residual_ln_modulate=residual_ln_modulate, rms_norm=rms_norm,
        gated_residual=gated_residual, kv_append=kv_append, silu_gate=silu_gate, tconv_taps=tconv_taps, gdn_gates=gates,
    )  # fmt: skip


def gdn_mixer():
    """`kernels.gdn.triton_gdn.fused_gdn_layer` as the custom op `sana::gdn_mixer` (None without triton), so
    compiled blocks call it without a graph break."""
    return _memo("gdn_mixer", _register_gdn_mixer)


def _register_gdn_mixer():
    from kernels.gdn import triton_ops

    g = triton_ops()
    if g is None:
        return None

    @torch.library.custom_op("sana::gdn_mixer", mutates_args=())
    def mixer(
        q_raw: Tensor, k_raw: Tensor, v: Tensor, beta: Tensor, decay: Tensor, gate: Tensor, q_weight: Tensor,
        k_weight: Tensor, cos: Tensor | None, sin: Tensor | None, heads: int, frames: int,
        state_kv: Tensor | None, state_z: Tensor | None, norm_eps: float, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        return g.fused_gdn_layer(
            q_raw, k_raw, v, beta, decay, gate, q_weight, k_weight, cos, sin, heads, frames, state_kv, state_z,
            norm_eps=norm_eps, eps=eps,
        )  # fmt: skip

    @mixer.register_fake
    def _(q_raw, k_raw, v, beta, decay, gate, q_weight, k_weight, cos, sin, heads, frames, state_kv, state_z,
          norm_eps, eps):  # fmt: skip
        B, N, C = q_raw.shape
        D = C // heads
        out = torch.empty((B, N, C), dtype=gate.dtype, device=gate.device)
        return (
            out,
            q_raw.new_empty((B, heads, D, D), dtype=torch.float32),
            q_raw.new_empty((B, heads, D, 1), dtype=torch.float32),
        )

    return mixer


def rope_cos_sin(rope: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """fp32 (cos, sin) of a complex ([B,] N, D/2) RoPE table, laid out for the kernels: built once per forward
    and shared by every layer."""
    if rope is None:
        return None
    from kernels.gdn.rope_tables import aligned_batches

    return aligned_batches(rope.real.to(torch.float32)), aligned_batches(rope.imag.to(torch.float32))


def ops(device: torch.device) -> SimpleNamespace | None:
    """The fused ops for tensors on `device`, or None: run the reference code.

    On: the fused path is enabled for the device (CUDA by default) and triton imports; on a CPU only when forced
    (SANA_STREAM_FUSED=1) and Triton's interpreter is active (tests)."""
    if not fused_enabled(device):
        return None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    return _registered()
