"""The fused DiT-block kernels (kernels/fused/triton_fused.py) against their plain-PyTorch references, run by
Triton's interpreter on CPU tensors.

Every buffer the launchers allocate is poisoned with NaN first, so an element a kernel fails to write shows up
as a NaN. Shapes are small and odd: 1..5 frames, height and width 1..7 (1: every pixel is on a border), channel
counts that are not multiples of the channel block, strips and row chunks that do not divide the image, batch
1..2, inputs with padded rows (non-contiguous), per-sample and broadcast (batch 1) modulation.

Tolerances:
- fp32: the kernels differ from the reference only by summation order (conv taps, LayerNorm statistics) and
  exp / division rounding: max |diff| <= 1e-5 + 1e-5 |ref| (observed <= 1e-6 on values of order 1).
- bf16 / fp16: the kernels round where the reference rounds (SiLU(u), the conv output, SiLU(g), the GLU
  product; the LayerNorm output, 1 + scale, the product, the sum; gate * delta, the residual), so they differ
  only where an fp32 difference of summation order flips a rounding. Bound: ||diff|| / ||ref|| <= 2e-3 and
  max |diff| <= 2^-7 max |ref| (two bf16 ulps at the largest magnitude). Observed here: bit-exact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.kernels.interpreter import fresh_process, in_process, poisoned, require_interpreter, run_in_fresh_process

require_interpreter()

from kernels.fused import naive  # noqa: E402
from kernels.fused import triton_fused as tf  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    with poisoned(monkeypatch, tf):
        yield


def check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{what}: shape / dtype"
    assert torch.isfinite(actual).all(), f"{what}: unwritten (NaN) or non-finite elements"
    a, e = actual.double(), expected.double()
    if expected.dtype == FP32:
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
        return
    rel = float((a - e).norm() / e.norm().clamp_min(1e-30))
    mx, bound = float((a - e).abs().max()), 2**-7 * float(e.abs().max())
    assert rel <= 2e-3 and mx <= bound, f"{what}: ||diff||/||ref|| = {rel:.2e}, max |diff| = {mx:.2e} ({bound:.2e})"


def padded(g: torch.Generator, dtype: torch.dtype, *shape: int, pad: int = 0, scale: float = 1.0,
           offset: float = 0.0) -> torch.Tensor:  # fmt: skip
    """randn of shape in dtype, a view with `pad` extra channels per row when pad > 0 (non-contiguous rows)."""
    t = (torch.randn(*shape[:-1], shape[-1] + pad, generator=g) * scale + offset).to(dtype)
    return t[..., pad // 2 : pad // 2 + shape[-1]]


DW = tf.DWConvTiling
DW_CASES = [  # B, T, H, W, F, dtype, bias, row padding of u, tiling
    (1, 1, 1, 1, 5, FP32, True, 0, DW("load", 4, 16, 1, 4)),  # one pixel: every tap is padding
    (2, 3, 4, 7, 24, BF16, True, 6, DW("dot", 16, 16, 3, 4)),  # two row chunks, the second partial
    (1, 5, 7, 3, 19, FP32, False, 2, DW("load", 2, 32, 7, 4)),  # two 2-column strips, fp32 without bias
    (1, 2, 6, 1, 33, BF16, True, 0, DW("load", 8, 16, 4, 4)),  # one column, three channel blocks
    (2, 1, 3, 5, 10, BF16, True, 4, tf.DEFAULT_DWCONV),
    (1, 1, 2, 17, 12, FP16, True, 0, DW("dot", 16, 16, 8, 4)),  # two 14-column strips
]


@in_process
@pytest.mark.parametrize("B,T,H,W,F,dtype,bias,pad,tiling", DW_CASES)
def test_dwconv_glu(B, T, H, W, F, dtype, bias, pad, tiling):
    g = torch.Generator().manual_seed(B + 10 * T + 100 * H + 1000 * W + F)
    u = padded(g, dtype, B, T * H * W, 2 * F, pad=pad, scale=1.5)
    assert (u.stride(1) == 2 * F) == (pad == 0)
    w = (torch.randn(2 * F, 1, 3, 3, generator=g) / 3).to(dtype)
    b = (0.3 * torch.randn(2 * F, generator=g)).to(dtype) if bias else None
    out = tf.dwconv_glu(u, w, b, T, H, W, tiling=tiling)
    check(out, naive.dwconv_glu(u, w, b, T, H, W), f"dwconv_glu {tiling.shift}")


LN_CASES = [  # B, N, C, x dtype, shift/scale dtype, (B, 1, C) or (B, C), row padding of x, tiling
    (1, 1, 5, FP32, FP32, True, 0, tf.DEFAULT_LN),
    (2, 13, 37, BF16, BF16, True, 3, tf.LNTiling(rows=4, num_warps=4)),  # rows straddle the two samples
    (2, 6, 70, BF16, FP32, False, 0, tf.LNTiling(rows=1, num_warps=2, split=False)),  # one padded block
    (1, 9, 33, FP32, BF16, False, 5, tf.DEFAULT_LN),
    (2, 5, 21, FP16, FP16, True, 0, tf.LNTiling(rows=8, num_warps=4)),
]


def ln_inputs(B, N, C, dt, sdt, per3, pad, seed):
    g = torch.Generator().manual_seed(seed)
    x = padded(g, dt, B, N, C, pad=pad, scale=2.0, offset=0.7)
    assert x.is_contiguous() == (pad == 0)
    shp = (B, 1, C) if per3 else (B, C)
    shift = (0.5 * torch.randn(*shp, generator=g)).to(sdt)
    scale = (0.5 * torch.randn(*shp, generator=g)).to(sdt)
    return g, x, shift, scale


@in_process
@pytest.mark.parametrize("B,N,C,dt,sdt,per3,pad,tiling", LN_CASES)
def test_ln_modulate(B, N, C, dt, sdt, per3, pad, tiling):
    _, x, shift, scale = ln_inputs(B, N, C, dt, sdt, per3, pad, seed=B * N + C)
    h = tf.ln_modulate(x, shift, scale, 1e-6, tiling=tiling)
    check(h, naive.ln_modulate(x, shift, scale, 1e-6), "ln_modulate")


@in_process
@pytest.mark.parametrize("B,N,C,dt,sdt,per3,pad,tiling", LN_CASES)
@pytest.mark.parametrize("gate", ["gate", "none", "broadcast"])
def test_residual_ln_modulate(B, N, C, dt, sdt, per3, pad, tiling, gate):
    g, x, shift, scale = ln_inputs(B, N, C, dt, sdt, per3, pad, seed=7 + B * N + C)
    delta = padded(g, dt, B, N, C, pad=2 * pad)
    gt = None if gate == "none" else (0.5 * torch.randn(1 if gate == "broadcast" else B, 1, C, generator=g)).to(sdt)
    if gate == "broadcast":  # one set of modulation vectors for every sample
        shift, scale = shift[:1], scale[:1]
    x_new, h = tf.residual_ln_modulate(x, delta, gt, shift, scale, 1e-6, tiling=tiling)
    r_x, r_h = naive.residual_ln_modulate(x, delta, gt, shift, scale, 1e-6)
    check(x_new, r_x, "x_new")
    check(h, r_h, "h")


@in_process
def test_argument_errors():
    x = torch.randn(1, 6, 8)
    with pytest.raises(ValueError, match="shift"):
        tf.ln_modulate(x, torch.randn(1, 2, 8), torch.randn(1, 8), 1e-6)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        tf.ln_modulate(x.double(), torch.randn(1, 8), torch.randn(1, 8), 1e-6)
    with pytest.raises(ValueError, match="tokens"):
        tf.dwconv_glu(torch.randn(1, 6, 8), torch.randn(8, 1, 3, 3), None, 1, 2, 2)
    with pytest.raises(ValueError, match="weight"):
        tf.dwconv_glu(torch.randn(1, 6, 8), torch.randn(8, 1, 1, 3), None, 1, 2, 3)
    with pytest.raises(ValueError, match="block_w"):
        tf.DWConvTiling(shift="dot", block_w=8)
    with pytest.raises(ValueError, match="shift"):
        tf.DWConvTiling(shift="roll")
    with pytest.raises(ValueError, match="rows"):
        tf.LNTiling(rows=3)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_references_are_the_engine_maths(dtype):
    """naive.* compose back into what engine/model computes: GLUMBConvTemp.spatial and the blocks' norms."""
    from engine.model.layers import GLUMBConvTemp, layer_norm, modulate

    torch.manual_seed(0)
    C, Fh, T, H, W = 12, 10, 2, 3, 4
    m = GLUMBConvTemp(C, Fh).to(dtype)
    x = torch.randn(2, T * H * W, C).to(dtype)
    inv = m.inverted_conv.conv
    with torch.no_grad():
        u = torch.nn.functional.linear(x, inv.weight.flatten(1), inv.bias)
        mid = naive.dwconv_glu(u, m.depth_conv.conv.weight, m.depth_conv.conv.bias, T, H, W)
        got = torch.nn.functional.linear(mid, m.point_conv.conv.weight.flatten(1)).reshape(2, T, H * W, C)
        torch.testing.assert_close(got, m.spatial(x, (T, H, W)), atol=0, rtol=0)
    shift, scale, gate = (0.3 * torch.randn(3, 2, 1, C)).to(dtype)
    torch.testing.assert_close(naive.ln_modulate(x, shift, scale, 1e-6), modulate(layer_norm(x, 1e-6), shift, scale))
    d = torch.randn_like(x)
    x_new = x + gate * d
    r_x, r_h = naive.residual_ln_modulate(x, d, gate, shift[:, 0], scale[:, 0], 1e-6)
    torch.testing.assert_close(r_x, x_new, atol=0, rtol=0)
    torch.testing.assert_close(r_h, modulate(layer_norm(x_new, 1e-6), shift, scale), atol=0, rtol=0)


@in_process
def test_reference_imports_without_triton():
    """kernels.fused (the references) must import where triton is missing; triton_ops() then says None."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kernels.fused as f\n"
        "assert f.triton_ops() is None and callable(f.dwconv_glu) and callable(f.residual_ln_modulate)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)


@fresh_process
def test_in_fresh_process():
    """All of the above, in a fresh interpreter where TRITON_INTERPRET is set before triton loads."""
    run_in_fresh_process(__file__)


RMS_CASES = [  # B, N, heads, D, dtype, row padding, rope: None / shared (N, D/2) / per-sample (B, N, D/2)
    (1, 7, 3, 8, FP32, 0, None),
    (2, 13, 2, 12, BF16, 4, "shared"),
    (2, 5, 1, 6, FP32, 2, "per_sample"),
    (1, 33, 3, 10, BF16, 0, "per_sample"),
]


@in_process
@pytest.mark.parametrize("B,N,heads,D,dtype,pad,rope", RMS_CASES)
def test_rms_norm(monkeypatch, B, N, heads, D, dtype, pad, rope):
    from kernels.fused import triton_norm as tn

    monkeypatch.setattr(tn, "_empty", tf._empty)  # the poisoned allocator
    g = torch.Generator().manual_seed(N)
    C = heads * D
    x = padded(g, dtype, B, N, C, pad=pad, scale=2.0, offset=0.3)
    w = (1 + 0.2 * torch.randn(C, generator=g)).to(dtype)
    cos = sin = None
    if rope is not None:
        ang = 6.3 * torch.rand((B if rope == "per_sample" else 1), N, D // 2, generator=g)
        cos, sin = ang.cos(), ang.sin()
        if rope == "shared":
            cos, sin = cos[0], sin[0]
    check(tn.rms_norm(x, w, 1e-5, cos, sin, D), naive.rms_norm(x, w, 1e-5, cos, sin, D), f"rms_norm {rope}")


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_rms_norm_reference_is_the_engine_maths(monkeypatch, dtype):
    """naive.rms_norm = RMSNorm, and with tables RMSNorm followed by apply_rope (fast mode) per head."""
    from engine.model.layers import RMSNorm, RoPE3D, apply_rope

    monkeypatch.setenv("SANA_STREAM_ROPE", "fast")
    torch.manual_seed(0)
    heads, D, N = 2, 12, 3 * 2 * 4
    norm = RMSNorm(heads * D, 1e-5).to(dtype)
    norm.weight.data.add_(0.1 * torch.randn(heads * D).to(dtype))
    x = torch.randn(2, N, heads * D).to(dtype)
    table = RoPE3D(D).table(5, 3, 2, 4, torch.device("cpu"))
    ref = apply_rope(norm(x).reshape(2, N, heads, D), table).reshape(2, N, heads * D)
    with torch.no_grad():
        torch.testing.assert_close(naive.rms_norm(x, norm.weight, 1e-5), norm(x), atol=0, rtol=0)
        got = naive.rms_norm(x, norm.weight, 1e-5, table.real.float(), table.imag.float(), D)
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
