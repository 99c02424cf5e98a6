"""The small block kernels (kernels/fused/triton_block.py) against their references, under Triton's interpreter,
and the references against the engine's own maths.

Outputs are poisoned with NaN (an unwritten element fails), shapes are small and odd (frames 1..5, token and
channel counts off the blocks, padded rows, batch 1..3, per-sample and broadcast gates). tconv_taps is a copy:
exact. gated_residual / gdn_gates compute in fp32 and round once like the references: fp32 within 1e-6, bf16 /
fp16 within one ulp of the output (exp, sigmoid and summation order may flip a rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.interpreter import fresh_process, in_process, poisoned, require_interpreter, run_in_fresh_process

require_interpreter()

from kernels.fused import naive  # noqa: E402
from kernels.fused import triton_block as tb  # noqa: E402
from kernels.fused import triton_fused as tf  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    with poisoned(monkeypatch, tb):
        yield


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{what}: shape / dtype"
    assert torch.isfinite(actual).all(), f"{what}: unwritten (NaN) elements"
    ulp = {FP32: 1e-6, BF16: 2**-8, FP16: 2**-11}[expected.dtype]
    a, e = actual.double(), expected.double()
    torch.testing.assert_close(a, e, atol=ulp, rtol=ulp, msg=lambda m: f"{what}: {m}")


def rows_padded(g: torch.Generator, dtype: torch.dtype, *shape: int, pad: int = 0) -> torch.Tensor:
    t = torch.randn(*shape[:-1], shape[-1] + pad, generator=g).to(dtype)
    return t[..., : shape[-1]]


@in_process
@pytest.mark.parametrize(
    "B, N, C, dtype, gate_batch, pad",
    [(1, 1, 3, FP32, 1, 0), (2, 13, 37, BF16, 2, 5), (3, 9, 600, FP16, 1, 0), (2, 7, 24, BF16, 2, 0)],
)
def test_gated_residual(B, N, C, dtype, gate_batch, pad):
    g = torch.Generator().manual_seed(B * 100 + C)
    x, d = rows_padded(g, dtype, B, N, C, pad=pad), rows_padded(g, FP32 if pad else dtype, B, N, C, pad=pad)
    gate = torch.randn(gate_batch, 1, C, generator=g).to(dtype)
    close(tb.gated_residual(x, gate, d), naive.gated_residual(x, gate, d), "gated_residual")


@in_process
@pytest.mark.parametrize(
    "B, N, heads, D, dtype, transposed",
    [(1, 1, 1, 3, FP32, False), (2, 13, 3, 12, BF16, True), (1, 9, 5, 8, FP16, True), (3, 5, 2, 40, BF16, False)],
)
def test_silu_gate(B, N, heads, D, dtype, transposed):
    g = torch.Generator().manual_seed(N * 10 + D)
    if transposed:  # SDPA's output as the engine hands it over: a (B, heads, N, D) tensor seen as (B, N, heads, D)
        out = torch.randn(B, heads, N, D, generator=g).to(dtype).transpose(1, 2)
    else:
        out = torch.randn(B, N, heads, D, generator=g).to(dtype)
    gate = rows_padded(g, dtype, B, N, heads * D, pad=4)  # a column block of a wider projection, like the engine's
    close(tb.silu_gate(out, gate), naive.silu_gate(out, gate), "silu_gate")


@in_process
@pytest.mark.parametrize(
    "B, T, S, C, dtype, ctx, pad",
    [(1, 1, 1, 3, FP32, False, 0), (2, 3, 33, 130, BF16, True, 3), (1, 5, 7, 9, FP16, True, 0),
     (3, 2, 40, 17, BF16, False, 0), (1, 4, 5, 8, FP32, True, 2)],
)  # fmt: skip
def test_tconv_taps(B, T, S, C, dtype, ctx, pad):
    g = torch.Generator().manual_seed(T * 1000 + S)
    y = rows_padded(g, dtype, B, T, S, C, pad=pad)
    context = None
    if ctx:  # the cache's layout (B, C, 1, S), in fp32 (a restored snapshot may differ from the activations)
        context = torch.randn(B, 1, S, C, generator=g).permute(0, 3, 1, 2)
    got, ref = tb.tconv_taps(y, context), naive.tconv_taps(y, context)
    assert torch.equal(got, ref) and got.is_contiguous()


@in_process
@pytest.mark.parametrize(
    "B, T, S, heads, col, dtype, extra",
    [(1, 1, 1, 1, 0, FP32, 0), (2, 3, 70, 5, 12, BF16, 3), (1, 5, 9, 3, 4, FP16, 0), (1, 2, 130, 20, 40, BF16, 1)],
)
def test_gdn_gates(B, T, S, heads, col, dtype, extra):
    g = torch.Generator().manual_seed(S * 10 + heads)
    p = (3 * torch.randn(B, T * S, col + 2 * heads + extra, generator=g)).to(dtype)
    a_log = torch.randn(heads, generator=g)
    dt_bias = torch.linspace(-25.0, 25.0, heads)  # softplus' linear and log1p branches, and the threshold
    beta, decay = tb.gdn_gates(p, heads, T, a_log, dt_bias, col)
    ref_beta, ref_decay = naive.gdn_gates(p, heads, T, a_log, dt_bias, col)
    close(beta, ref_beta, "beta")
    close(decay, ref_decay, "decay")


@in_process
@pytest.mark.parametrize(
    "B, M, N, heads, D, dtype", [(1, 0, 1, 1, 3, FP32), (2, 7, 13, 3, 12, BF16), (3, 5, 9, 2, 40, FP16)]
)
def test_kv_append(B, M, N, heads, D, dtype):
    g = torch.Generator().manual_seed(M * 10 + N)
    k_buf = torch.randn(B, M + N, heads, D, generator=g).to(dtype)
    v_buf = torch.randn(B, M + N, heads, D, generator=g).to(dtype)
    k = torch.randn(B, N, heads, D, generator=g).to(dtype)
    v = torch.randn(B, N, 4 * heads * D, generator=g).to(dtype)[..., heads * D : 2 * heads * D]  # a GEMM column block
    v = v.reshape(B, N, heads, D)
    want_k, want_v = k_buf.clone(), v_buf.clone()
    naive.kv_append(want_k, want_v, k, v)
    tb.kv_append(k_buf, v_buf, k, v)
    assert torch.equal(k_buf, want_k) and torch.equal(v_buf, want_v)
    assert torch.equal(k_buf[:, M:], k) and torch.equal(k_buf[:, :M], want_k[:, :M])


@in_process
def test_argument_errors():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="gate"):
        tb.gated_residual(x, torch.randn(1, 1, 7), x)
    with pytest.raises(ValueError, match="ctx"):
        tb.tconv_taps(torch.randn(1, 2, 3, 8), torch.randn(1, 8, 1, 4))
    with pytest.raises(ValueError, match="T = 3"):
        tb.gdn_gates(torch.randn(1, 10, 8), 2, 3, torch.zeros(2), torch.zeros(2), 0)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_references_are_the_engine_maths(dtype):
    """The references compute what the engine's fused-projection path computed before the kernels: the padded
    concatenations of GLUMBConvTemp, and GDNAttention's gates from the fused projection output."""
    from engine.model.gdn import GDNAttention

    torch.manual_seed(0)
    attn = GDNAttention(24, 6).to(dtype)
    attn.A_log.data.normal_()
    T, H, W = 3, 2, 4
    x = torch.randn(1, T * H * W, 24).to(dtype)
    with torch.no_grad():
        attn.fuse()
        *_, beta, decay = attn.projections(x, (T, H, W), kernels=False)
        p = F.linear(x, attn.fused_in_w, attn.fused_in_b)
        got_beta, got_decay = naive.gdn_gates(p, attn.heads, T, attn.A_log, attn.dt_bias, 4 * 24)
    torch.testing.assert_close(got_beta, beta, atol=0, rtol=0)
    torch.testing.assert_close(got_decay, decay, atol=0, rtol=0)

    y = torch.randn(2, T, H * W, 24).to(dtype)
    ctx = torch.randn(2, 24, 1, H * W)
    for c in (None, ctx):
        left = torch.zeros_like(y[:, :1]) if c is None else c.to(dtype).permute(0, 2, 3, 1)
        frames = torch.cat([left, y, torch.zeros_like(y[:, :1])], dim=1)
        want = torch.cat([frames[:, :-2], frames[:, 1:-1], frames[:, 2:]], dim=-1)
        assert torch.equal(naive.tconv_taps(y, c), want)


@fresh_process
def test_in_fresh_process():
    """Where triton was imported before the interpreter could be enabled, run this module in a new process."""
    run_in_fresh_process(__file__)


def test_triton_fused_shares_the_rounding_helpers():
    assert tb._out is tf._out  # one rounding implementation for every kernel
