"""The Triton GDN kernels against their plain-PyTorch references, run by Triton's interpreter on CPU tensors.

Every buffer the launchers allocate (outputs, carried state, intermediates) is poisoned with NaN first, so an
element a kernel fails to write shows up as a NaN. Shapes are small and odd: 1..5 frames, tokens per frame not
a multiple of the token block, 1..3 heads, head dims 8..40 including non-powers of two, batch 1..2.

Tolerances:
- fp32 inputs: the interpreter runs fp32 products, so the kernels differ from the fp32 reference only by
  summation order: max |diff| <= 1e-5 + 1e-5 |ref| on values of order 1 (observed ~1e-7; the golden README
  sees 3e-6 between independent fp32 implementations).
- bf16 inputs: products take bf16 operands (beta k, the state in the read-out), each rounding costs up to 2^-8
  relative, and the interpreter truncates where the GPU rounds to nearest. Bound ||diff|| / ||ref|| by 3e-2
  for outputs and 1e-2 for the fp32 states (observed <= 1.2e-2 and 4e-3 here; about 2e-3 on the GPU against
  float64, kernels/gdn/README.md).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.interpreter import fresh_process, in_process, require_interpreter, run_in_fresh_process

require_interpreter()

from kernels.gdn import naive, naive_fused  # noqa: E402
from kernels.gdn import triton_gdn as tg  # noqa: E402
from tests.conftest import GOLDEN, ROOT  # noqa: E402

# Small token blocks, so frames span several blocks and phase A splits each frame in two; and the defaults.
SMALL = tg.GDNTiling(block_a=16, block_c=16, tokens_c=32, split_a=2, merge_a=False, block_v=16)
DEFAULT = tg.DEFAULT_TILING
# Phase A with one program per (D/2)^2 block of each frame matrix (merged P / P_z, and separate under SMALL).
SPLIT_D = dataclasses.replace(DEFAULT, split_d_a=True)
SPLIT_D_SMALL = dataclasses.replace(SMALL, split_d_a=True)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every launcher allocation starts as NaN."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tg, "_empty", nan_empty)


def check(actual: torch.Tensor, expected: torch.Tensor, bf16: bool, what: str, state: bool = False) -> None:
    assert torch.isfinite(actual).all(), f"{what}: unwritten (NaN) or non-finite elements"
    a, e = actual.double(), expected.double()
    if bf16:
        rel = float((a - e).norm() / e.norm().clamp_min(1e-30))
        bound = 1e-2 if state else 3e-2
        assert rel <= bound, f"{what}: ||diff||/||ref|| = {rel:.2e} > {bound:.0e}"
    else:
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def frame_inputs(B: int, H: int, T: int, S: int, D: int, dtype: torch.dtype, seed: int, state: bool) -> dict:
    """Features as the layer makes them (ReLU'd, key-scaled, pair-rotated), gates, optional carried state."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    q = F.relu(rn(B, H, T, S, D))
    k = F.relu(rn(B, H, T, S, D)) * (D**-0.5 * S**-0.5)
    ang = 6.3 * torch.rand(B, H, T, S, D // 2, generator=g)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * ang.cos() - x1 * ang.sin(), x0 * ang.sin() + x1 * ang.cos()], -1).flatten(-2)

    a = dict(q=q, k=k, v=rn(B, H, T, S, D), q_rot=rot(q), k_rot=rot(k))
    a = {n: t.to(dtype) for n, t in a.items()}
    a["beta"] = torch.sigmoid(rn(B, T, S, H)).to(dtype).permute(0, 3, 1, 2)  # strided, as the engine's view
    a["decay"] = torch.exp(-F.softplus(rn(B, H, T))).to(dtype)
    a["state_kv"] = 0.3 * rn(B, H, D, D) if state else None
    a["state_z"] = 0.5 * rn(B, H, D, 1).abs() if state else None
    return a


def upcast(a: dict) -> dict:
    return {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in a.items()}


CASES = [  # B, H, T, S, D, dtype, state, tiling
    (1, 1, 1, 7, 8, torch.float32, False, DEFAULT),
    (1, 3, 3, 19, 24, torch.float32, True, SMALL),
    (1, 2, 5, 23, 20, torch.bfloat16, True, SMALL),
    (2, 1, 2, 33, 12, torch.bfloat16, False, DEFAULT),
    (1, 3, 3, 19, 24, torch.float32, True, SPLIT_D_SMALL),
    (1, 2, 5, 23, 20, torch.bfloat16, True, SPLIT_D),
    (1, 2, 2, 21, 40, torch.bfloat16, False, SPLIT_D_SMALL),
]


@in_process
@pytest.mark.parametrize("B,H,T,S,D,dtype,state,tiling", CASES)
def test_bidirectional_gdn(B, H, T, S, D, dtype, state, tiling):
    a = frame_inputs(B, H, T, S, D, dtype, seed=B * 100 + T * 10 + D, state=state)
    out, fkv, fz = tg.bidirectional_gdn(**a, tiling=tiling)
    r_out, r_kv, r_z = naive.bidirectional_gdn(**upcast(a))
    bf16 = dtype == torch.bfloat16
    assert out.dtype == dtype and fkv.dtype == fz.dtype == torch.float32
    check(out, r_out, bf16, "out")
    check(fkv, r_kv, bf16, "state_kv", state=True)
    check(fz, r_z, bf16, "state_z", state=True)


@in_process
@pytest.mark.parametrize(
    "B,H,T,S,D,dtype,state,tiling",
    [(2, 2, 3, 19, 24, torch.float32, True, DEFAULT), (1, 2, 4, 23, 20, torch.bfloat16, True, SMALL)],
)
def test_gdn_scan(B, H, T, S, D, dtype, state, tiling):
    a = frame_inputs(B, H, T, S, D, dtype, seed=7 + T, state=state)
    num, den, fkv, fz = tg.gdn_scan(**a, tiling=tiling)
    r = naive.gdn_scan(**upcast(a))
    bf16 = dtype == torch.bfloat16
    for name, x, ref in zip(("num", "den", "state_kv", "state_z"), (num, den, fkv, fz), r):
        check(x, ref, bf16, name, state=name != "num")


@in_process
def test_strided_views_of_token_layout():
    """(B, H, T, S, D) views of (B, N, C) tensors, as the engine lays them out, need no copies to be right."""
    B, H, T, S, D = 1, 2, 3, 11, 16
    g = torch.Generator().manual_seed(3)
    qkv = [torch.randn(B, T * S, H * D, generator=g) for _ in range(5)]
    views = [t.view(B, T, S, H, D).permute(0, 3, 1, 2, 4) for t in qkv]
    views[0], views[1], views[4] = F.relu(views[0]), F.relu(views[1]) * 0.07, views[4] * 0.07
    beta = torch.sigmoid(torch.randn(B, H, T, S, generator=g))
    decay = torch.rand(B, H, T, generator=g) * 0.5 + 0.5
    out, fkv, fz = tg.bidirectional_gdn(*views, beta, decay, tiling=SMALL)
    r_out, r_kv, r_z = naive.bidirectional_gdn(*(v.contiguous() for v in views), beta, decay)
    check(out, r_out, False, "out")
    check(fkv, r_kv, False, "state_kv")


def layer_inputs(B: int, H: int, T: int, GH: int, GW: int, D: int, dtype: torch.dtype, seed: int) -> dict:
    """Projections (B, N, C), gates, norm weights, engine RoPE tables (per sample if B > 1), carried state."""
    from engine.model.layers import RoPE3D

    g = torch.Generator().manual_seed(seed)
    S, C = GH * GW, H * D
    N = T * S

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    rope = RoPE3D(D)
    table = torch.stack([rope.table(3 + 4 * b, T, GH, GW, torch.device("cpu")) for b in range(B)])
    table = table[0] if B == 1 else table
    a = dict(q_raw=rn(B, N, C), k_raw=rn(B, N, C), v=rn(B, N, C), gate=rn(B, N, C))
    a = {n: t.to(dtype) for n, t in a.items()}
    a.update(
        beta=torch.sigmoid(rn(B, T, S, H)).to(dtype).permute(0, 3, 1, 2),
        decay=torch.exp(-F.softplus(rn(B, H, T))).to(dtype),
        q_weight=1 + 0.2 * rn(C), k_weight=1 + 0.2 * rn(C), cos=table.real, sin=table.imag, heads=H, frames=T,
        state_kv=0.3 * rn(B, H, D, D), state_z=0.5 * rn(B, H, D, 1).abs(),
    )  # fmt: skip
    a["_pairs"] = (rope.dims[0] // 2, (rope.dims[0] + rope.dims[1]) // 2)
    a["_grid"] = (GH, GW)
    return a


LAYER_CASES = [  # B, H, T, GH, GW, D, dtype, tiling, rope mode
    (1, 2, 3, 3, 5, 24, torch.float32, SMALL, "full"),
    (2, 3, 2, 2, 7, 12, torch.bfloat16, DEFAULT, "full"),
    (1, 1, 4, 3, 3, 18, torch.bfloat16, SMALL, "axes"),
    (2, 2, 1, 3, 4, 20, torch.float32, DEFAULT, "none"),
    (1, 2, 3, 3, 5, 24, torch.bfloat16, SPLIT_D, "full"),
    (1, 1, 4, 3, 3, 18, torch.float32, SPLIT_D_SMALL, "axes"),
]


@in_process
@pytest.mark.parametrize("B,H,T,GH,GW,D,dtype,tiling,rope", LAYER_CASES)
def test_fused_gdn_layer(B, H, T, GH, GW, D, dtype, tiling, rope):
    """Prologue (RMSNorm, ReLU, key scale, RoPE) + scan + gated merge against the engine's maths."""
    a = layer_inputs(B, H, T, GH, GW, D, dtype, seed=B + 10 * T + D)
    pairs, grid = a.pop("_pairs"), a.pop("_grid")
    if rope == "none":
        a["cos"] = a["sin"] = None
    ref = naive_fused.gdn_layer(**a)
    if rope == "axes":
        r3 = tg.Rope3DTables.from_full(a["cos"], a["sin"], T, grid, pairs)
        cos, sin = r3.full()
        torch.testing.assert_close(cos.double(), a["cos"].double(), atol=1e-7, rtol=0)
        torch.testing.assert_close(sin.double(), a["sin"].double(), atol=1e-7, rtol=0)
        a = {**a, "cos": None, "sin": None, "rope3d": r3}
    out, fkv, fz = tg.fused_gdn_layer(**a, tiling=tiling)
    bf16 = dtype == torch.bfloat16
    assert out.shape == a["q_raw"].shape and out.dtype == dtype
    check(out, ref[0], bf16, "out")
    check(fkv, ref[1], bf16, "state_kv", state=True)
    check(fz, ref[2], bf16, "state_z", state=True)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_rstd_and_qk_prologue(dtype):
    B, H, T, GH, GW, D = 2, 3, 2, 3, 5, 14
    a = layer_inputs(B, H, T, GH, GW, D, dtype, seed=11)
    x, w = a["k_raw"], a["k_weight"]
    check(tg.rms_rstd(x, 1e-5), naive_fused.rms_rstd(x, 1e-5), False, "rstd")
    scale = D**-0.5 * (GH * GW) ** -0.5
    y, yr = tg.qk_prologue(x, w, 1e-5, scale, a["cos"], a["sin"], H)
    ry, ryr = naive_fused.qk_prologue(x, w, 1e-5, scale, a["cos"], a["sin"], H)
    if dtype == torch.bfloat16:  # the reference rounds after norm, scale and rotation, the kernel once: 2 ulps
        torch.testing.assert_close(y.float(), ry.float(), atol=0, rtol=2**-6)
        torch.testing.assert_close(yr.float(), ryr.float(), atol=2**-7 * float(ryr.abs().max()), rtol=2**-6)
    else:
        check(y, ry, False, "features")
        check(yr, ryr, False, "rotated")


@in_process
@pytest.mark.parametrize("init", ["zero_init", "with_init"])
def test_golden_gdn_op(init):
    """The release's frame recurrence (tests/golden/gdn_op.safetensors, float64) through the fp32 kernels."""
    from safetensors.torch import load_file

    f = load_file(GOLDEN / "gdn_op.safetensors")
    B, H, D, N = f["in.q"].shape
    T = f["in.decay"].shape[-1]

    def frames(x: torch.Tensor) -> torch.Tensor:  # (B, H, D', T*S) -> (B, H, T, S, D')
        return x.reshape(B, H, x.shape[2], T, N // T).permute(0, 1, 3, 4, 2).float()

    args = [frames(f[f"in.{n}"]) for n in ("q", "k", "v", "q_rot", "k_rot")]
    args += [f["in.beta"].permute(0, 3, 1, 2).float(), f["in.decay"].float()]
    state = (f["in.state_kv_init"].float(), f["in.state_z_init"].float()) if init == "with_init" else (None, None)
    num, den, m, z = tg.gdn_scan(*args, *state)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(num.double(), frames(f[f"{init}.num"]).double(), **tol)
    torch.testing.assert_close(den.double(), frames(f[f"{init}.den"])[..., 0].double(), **tol)
    torch.testing.assert_close(m.double(), f[f"{init}.final_state_kv"], **tol)
    torch.testing.assert_close(z.double(), f[f"{init}.final_state_z"], **tol)
    out, _, _ = tg.bidirectional_gdn(*[x[:, :, :1] for x in args], *state)  # one frame: the scan's num/den
    expected = frames(f[f"{init}.out"])[:, :, :1].double()
    if init == "zero_init":
        torch.testing.assert_close(out.double(), expected, **tol)
    if init == "with_init":
        two = [x[:, :, :2] for x in args]
        _, _, m2, z2 = tg.gdn_scan(*two, *state)
        torch.testing.assert_close(m2.double(), f["with_init.state_kv_after_frame1"], **tol)
        torch.testing.assert_close(z2.double(), f["with_init.state_z_after_frame1"], **tol)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_dispatch(monkeypatch, dtype):
    """GDNAttention with SANA_STREAM_GDN=triton against =naive; per-sample RoPE; carried state in and out."""
    from engine.model.gdn import GDNAttention, gdn_backend
    from engine.model.layers import RoPE3D

    torch.manual_seed(0)
    m = GDNAttention(48, 24).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        m.q_norm.weight.add_(1)
        m.k_norm.weight.add_(1)
    m = m.to(dtype)
    T, GH, GW = 2, 3, 4
    x = torch.randn(2, T * GH * GW, 48).to(dtype)
    rope = torch.stack([RoPE3D(24).table(s, T, GH, GW, x.device) for s in (2, 9)])
    state = (0.3 * torch.randn(2, 2, 24, 24), 0.5 * torch.randn(2, 2, 24, 1).abs())
    with torch.no_grad():
        monkeypatch.setenv("SANA_STREAM_GDN", "naive")
        ref, (rkv, rz) = m(x, (T, GH, GW), rope, state)
        monkeypatch.setenv("SANA_STREAM_GDN", "triton")
        assert gdn_backend(x.device) == "triton"
        out, (fkv, fz) = m(x, (T, GH, GW), rope, state)
    bf16 = dtype == torch.bfloat16
    check(out, ref, bf16, "out")
    check(fkv, rkv, bf16, "state_kv", state=True)
    check(fz, rz, bf16, "state_z", state=True)


def test_backend_selection(monkeypatch):
    from engine.model.gdn import gdn_backend

    monkeypatch.setenv("SANA_STREAM_GDN", "auto")
    assert gdn_backend(torch.device("cpu")) == "naive"
    monkeypatch.setenv("SANA_STREAM_GDN", "naive")
    assert gdn_backend(torch.device("cuda")) == "naive"
    monkeypatch.setenv("SANA_STREAM_GDN", "fast")
    with pytest.raises(ValueError, match="SANA_STREAM_GDN"):
        gdn_backend(torch.device("cpu"))


@in_process
def test_reference_imports_without_triton():
    """kernels.gdn (the references) must import where triton is missing; triton_ops() then says None."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kernels.gdn as g, kernels.gdn.naive_fused\n"
        "assert g.triton_ops() is None and callable(g.bidirectional_gdn)\n"
        "from engine.model.gdn import gdn_backend; import torch\n"
        "assert gdn_backend(torch.device('cuda')) == 'naive'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SANA_STREAM_GDN": "auto"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)


@fresh_process
def test_in_fresh_process():
    """All of the above, in a fresh interpreter where TRITON_INTERPRET is set before triton loads."""
    run_in_fresh_process(__file__)
