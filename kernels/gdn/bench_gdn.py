"""GPU check and benchmark of the Triton GDN kernels at SANA-Streaming's real shapes; prints JSON.

    python -m kernels.gdn.bench_gdn [--out FILE] [--sweep] [--quick]

Shapes: H = 20 heads, D = 112, S = 880 tokens per frame (1280x704), chunks of T = 3 and 5 frames, B = 1, 2, 4;
bf16 activations, fp32 state. For each it checks, against a float64 evaluation of the same maths
(`naive_fused.gdn_layer` / `naive.bidirectional_gdn` on upcast inputs):

- `fused_gdn_layer` (the engine's fast path) in bf16 and fp32, next to the naive bf16 engine path's own error;
- `bidirectional_gdn` and `gdn_scan` on ready-made features, bf16 and fp32;
- `GDNAttention` (engine/model/gdn.py) with SANA_STREAM_GDN=triton against =naive.

Then it times, per layer, with CUDA graphs over three rotating input sets (so the inputs do not sit in L2):
the fused layer, the plain scan, the naive engine path and the naive scan, the whole `GDNAttention` module
both ways, a per-kernel breakdown (torch.profiler), and the memory floor from a measured device-to-device
copy.
`--sweep` first times a list of `GDNTiling` variants at B=1, T=3 and uses the fastest for the rest.

Imports only torch, triton, kernels/ and engine/model/ (no diffusers, no av). Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from kernels.gdn import naive, naive_fused
from kernels.gdn import triton_gdn as tg
from kernels.timing import copy_bandwidth, eager_us, graph_us, profile_kernels

DEV = "cuda"
H, D, GRID_H, GRID_W = 20, 112, 22, 40
S = GRID_H * GRID_W  # 880 tokens per latent frame at 1280x704
C = H * D


def layer_inputs(B: int, T: int, dtype: torch.dtype, seed: int) -> dict:
    """Random projections at the real shapes, the engine's RoPE tables, a carried state from a prior chunk."""
    from engine.model.layers import RoPE3D

    dev = torch.device(DEV)
    g = torch.Generator(device=dev).manual_seed(seed)
    N = T * S

    def rn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, device=dev)

    table = RoPE3D(D).table(T, T, GRID_H, GRID_W, dev)  # frames [T, 2T): the second chunk of a session
    a = dict(
        q_raw=rn(B, N, C), k_raw=rn(B, N, C), v=rn(B, N, C),
        beta=torch.sigmoid(rn(B, T, S, H)).permute(0, 3, 1, 2),  # the engine's (B, T, S, H) view
        decay=torch.exp(-F.softplus(rn(B, H, T))), gate=rn(B, N, C),
        q_weight=1 + 0.1 * rn(C), k_weight=1 + 0.1 * rn(C), cos=table.real.float(), sin=table.imag.float(),
        heads=H, frames=T,
    )  # fmt: skip
    a = {k: (v.to(dtype) if isinstance(v, Tensor) and k not in ("cos", "sin") else v) for k, v in a.items()}
    prev = {k: (v.float() if isinstance(v, Tensor) else v) for k, v in a.items()}
    prev["q_raw"], prev["k_raw"], prev["v"] = rn(B, N, C), rn(B, N, C), rn(B, N, C)
    _, a["state_kv"], a["state_z"] = naive_fused.gdn_layer(**prev)  # a realistic carried state
    return a


def axes(a: dict) -> dict:
    """a with the RoPE as per-axis tables (`Rope3DTables`, the engine's fast path) instead of full tables."""
    from engine.model.layers import RoPE3D

    dt, dh, _ = RoPE3D(D).dims
    r3 = tg.Rope3DTables.from_full(a["cos"], a["sin"], a["frames"], (GRID_H, GRID_W), (dt // 2, (dt + dh) // 2))
    return {**a, "cos": None, "sin": None, "rope3d": r3}


def bf16_tables(a: dict) -> dict:
    return {**a, "cos": a["cos"].to(torch.bfloat16), "sin": a["sin"].to(torch.bfloat16)}


def to64(a: dict) -> dict:
    return {k: (v.double() if isinstance(v, Tensor) else v) for k, v in a.items()}


def to_dtype(a: dict, dtype: torch.dtype) -> dict:
    keep = ("cos", "sin", "state_kv", "state_z")
    return {k: (v.to(dtype) if isinstance(v, Tensor) and k not in keep else v) for k, v in a.items()}


def err(x: Tensor, ref: Tensor) -> dict:
    x, ref = x.double(), ref.double()
    d = x - ref
    bad = int((~torch.isfinite(x)).sum())
    return dict(
        rel=float(d.norm() / ref.norm().clamp_min(1e-300)), max_abs=float(d.abs().max()),
        ref_max=float(ref.abs().max()), nonfinite=bad,
    )  # fmt: skip


def features(a: dict) -> dict:
    """(B, H, T, S, D) q, k, v, q_rot, k_rot (float64) from layer inputs, by the reference prologue."""
    B, N, _ = a["q_raw"].shape
    T = a["frames"]
    q, qr = naive_fused.qk_prologue(a["q_raw"], a["q_weight"], 1e-5, 1.0, a["cos"], a["sin"], H)
    k, kr = naive_fused.qk_prologue(a["k_raw"], a["k_weight"], 1e-5, D**-0.5 * S**-0.5, a["cos"], a["sin"], H)

    def fr(t: Tensor) -> Tensor:
        return t.reshape(B, T, S, H, D).permute(0, 3, 1, 2, 4).contiguous()

    return dict(q=fr(q), k=fr(k), v=fr(a["v"]), q_rot=fr(qr), k_rot=fr(kr), beta=a["beta"], decay=a["decay"])


def checks(B: int, T: int, tiling: tg.GDNTiling) -> dict:
    out: dict = {"B": B, "T": T}
    a16 = layer_inputs(B, T, torch.bfloat16, seed=1000 + 10 * B + T)
    ref = naive_fused.gdn_layer(**to64(a16))
    names = ("out", "state_kv", "state_z")
    tri = tg.fused_gdn_layer(**a16, tiling=tiling)
    out["fused_layer_bf16_vs_fp64"] = {n: err(x, r) for n, x, r in zip(names, tri, ref)}
    tri_ax = tg.fused_gdn_layer(**axes(a16), tiling=tiling)
    out["fused_layer_bf16_rope3d_vs_fp64"] = {n: err(x, r) for n, x, r in zip(names, tri_ax, ref)}
    tri_bt = tg.fused_gdn_layer(**bf16_tables(a16), tiling=tiling)
    out["fused_layer_bf16_bf16tables_vs_fp64"] = {n: err(x, r) for n, x, r in zip(names, tri_bt, ref)}
    nv = naive_fused.gdn_layer(**a16)
    out["naive_layer_bf16_vs_fp64"] = {n: err(x, r) for n, x, r in zip(names, nv, ref)}
    out["fused_layer_bf16_vs_naive_bf16"] = {n: err(x, r) for n, x, r in zip(names, tri, nv)}
    a32 = to_dtype(a16, torch.float32)
    tri32 = tg.fused_gdn_layer(**a32, tiling=tiling)
    out["fused_layer_fp32_vs_fp64"] = {n: err(x, r) for n, x, r in zip(names, tri32, ref)}
    # plain scan on ready-made features: bf16-rounded and fp32, each against float64 of the same values
    f64 = features(to64(a16))
    st = (a16["state_kv"], a16["state_z"])
    order = ("q", "k", "v", "q_rot", "k_rot", "beta", "decay")
    for dt, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        fx = {k: v.to(dt) for k, v in f64.items()}
        ref_s = naive.bidirectional_gdn(*(fx[k].double() for k in order), st[0].double(), st[1].double())
        got = tg.bidirectional_gdn(*(fx[k] for k in order), *st, tiling=tiling)
        out[f"bidirectional_{tag}_vs_fp64"] = {n: err(x, r) for n, x, r in zip(names, got, ref_s)}
        ref_f = naive.gdn_scan(*(fx[k].double() for k in order), st[0].double(), st[1].double())
        got_f = tg.gdn_scan(*(fx[k] for k in order), *st, tiling=tiling)
        out[f"scan_{tag}_vs_fp64"] = {n: err(x, r) for n, x, r in zip(("num", "den", *names[1:]), got_f, ref_f)}
    return out


def floors(B: int, T: int, bw: float) -> dict:
    tok = B * T * S * C * 2  # one bf16 (B, N, C) tensor
    small = B * H * T * S * 2 + 2 * B * H * D * (D + 1) * 4  # beta; state in and out
    return dict(
        scan_qkv_out_us=round(4 * tok / bw * 1e6, 2),  # q, k, v read, out written
        fused_layer_us=round((5 * tok + small) / bw * 1e6, 2),  # + gate read
    )


def timings(B: int, T: int, tiling: tg.GDNTiling, bw: float) -> dict:
    sets = [layer_inputs(B, T, torch.bfloat16, seed=s) for s in range(3)]
    res: dict = {"B": B, "T": T, "floor": floors(B, T, bw)}
    fused = [lambda a=a: tg.fused_gdn_layer(**a, tiling=tiling) for a in sets]
    res["triton_fused_layer_graph"] = graph_us(fused)
    res["triton_fused_layer_eager_us"] = eager_us(fused, warmup=50, rep=300)
    for name, variant in (("rope3d", axes), ("bf16tables", bf16_tables)):
        vs = [variant(a) for a in sets]
        res[f"triton_fused_layer_{name}_graph"] = graph_us(
            [lambda a=a: tg.fused_gdn_layer(**a, tiling=tiling) for a in vs]
        )
    feats = [{k: v.to(torch.bfloat16) for k, v in features(a).items()} for a in sets]
    order = ("q", "k", "v", "q_rot", "k_rot", "beta", "decay")
    plain = [
        lambda f=f, a=a: tg.bidirectional_gdn(*(f[k] for k in order), a["state_kv"], a["state_z"], tiling=tiling)
        for f, a in zip(feats, sets)
    ]
    res["triton_scan_bf16_graph"] = graph_us(plain)
    nl = [lambda a=a: naive_fused.gdn_layer(**a) for a in sets]
    res["naive_layer_bf16_graph"] = graph_us(nl, reps=3, trials=5)
    f32 = [{k: v.float() for k, v in f.items()} for f in feats]
    ns = [
        lambda f=f, a=a: naive.bidirectional_gdn(*(f[k] for k in order), a["state_kv"], a["state_z"])
        for f, a in zip(f32, sets)
    ]
    res["naive_scan_fp32_graph"] = graph_us(ns, reps=3, trials=5)
    return res


def kernel_breakdown(tiling: tg.GDNTiling) -> dict:
    out = {}
    for B, T in ((1, 3), (1, 5), (4, 3)):
        a = layer_inputs(B, T, torch.bfloat16, seed=7)
        out[f"B{B}_T{T}"] = profile_kernels(lambda a=a: tg.fused_gdn_layer(**a, tiling=tiling))
    return out


def module_compare(B: int, T: int) -> dict:
    """GDNAttention (projections + mixer + proj) with SANA_STREAM_GDN=naive vs triton, bf16, real shapes."""
    from engine.model.gdn import GDNAttention
    from engine.model.layers import RoPE3D

    torch.manual_seed(3)
    m = GDNAttention(C, D).to(DEV)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[1] ** -0.5 if p.dim() > 1 else 0.5))
        for p in (m.q_norm.weight, m.k_norm.weight):
            p.fill_(1.0)
        m.A_log.zero_()
        m.dt_bias.zero_()
    m = m.to(torch.bfloat16).eval()
    hw = (T, GRID_H, GRID_W)
    rope = RoPE3D(D).table(T, T, GRID_H, GRID_W, torch.device(DEV))
    xs = [torch.randn(B, T * S, C, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
    state = (0.05 * torch.randn(B, H, D, D, device=DEV), torch.rand(B, H, D, 1, device=DEV))
    res: dict = {"B": B, "T": T}
    outs = {}
    for mode in ("naive", "triton"):
        os.environ["SANA_STREAM_GDN"] = mode
        with torch.no_grad():
            outs[mode] = m(xs[0], hw, rope, state)
            fns = [lambda x=x: m(x, hw, rope, state) for x in xs]
            res[f"module_{mode}_graph"] = graph_us(fns, reps=3, trials=5)
    os.environ.pop("SANA_STREAM_GDN")
    (o_n, (kv_n, z_n)), (o_t, (kv_t, z_t)) = outs["naive"], outs["triton"]
    res["triton_vs_naive"] = dict(out=err(o_t, o_n), state_kv=err(kv_t, kv_n), state_z=err(z_t, z_n))
    return res


SWEEP = [  # variations around the default (the earlier, wider sweeps are in kernels/gdn/README.md)
    tg.GDNTiling(),
    tg.GDNTiling(stages_a=2),
    tg.GDNTiling(merge_a=False),
    tg.GDNTiling(block_c=64, tokens_c=256, warps_c=8),
    tg.GDNTiling(tokens_c=384),
    tg.GDNTiling(tokens_c=256),
    tg.GDNTiling(stages_c=1),
    tg.GDNTiling(block_v=16),
]
PHASE_FIELDS = {
    "_phase_a_kernel": ("block_a", "split_a", "merge_a", "warps_a", "stages_a"),
    "_phase_b_kernel": ("block_v", "warps_b"),
    "_phase_c_kernel": ("block_c", "tokens_c", "warps_c", "stages_c"),
}


def sweep() -> tuple[list[dict], tg.GDNTiling]:
    """Per-kernel times of each variant at B=1, T=3; the fastest settings of each phase, put together."""
    sets = [layer_inputs(1, 3, torch.bfloat16, seed=s) for s in range(3)]
    rows: list[dict] = []
    best: dict[str, tuple[float, tg.GDNTiling]] = {}
    for t in SWEEP:
        try:
            kern = profile_kernels(lambda t=t: tg.fused_gdn_layer(**sets[0], tiling=t))
            total = graph_us([lambda a=a, t=t: tg.fused_gdn_layer(**a, tiling=t) for a in sets])
            rows.append({"tiling": t.__dict__, "kernels_us": kern, **total})
            for name in PHASE_FIELDS:
                if name in kern and kern[name] < best.get(name, (float("inf"), t))[0]:
                    best[name] = (kern[name], t)
        except Exception as e:  # a variant that fails to compile is reported, not fatal
            rows.append({"tiling": t.__dict__, "error": f"{type(e).__name__}: {e}"[:400]})
    fields = {}
    for name, keys in PHASE_FIELDS.items():
        if name in best:
            fields.update({k: getattr(best[name][1], k) for k in keys})
    composed = tg.GDNTiling(**{**tg.DEFAULT_TILING.__dict__, **fields})
    if composed.split_a > 1 and fields.get("block_a") is None:
        composed = tg.GDNTiling(**{**composed.__dict__, "split_a": 1})
    try:
        total = graph_us([lambda a=a: tg.fused_gdn_layer(**a, tiling=composed) for a in sets])
        kern = profile_kernels(lambda: tg.fused_gdn_layer(**sets[0], tiling=composed))
        rows.append({"tiling": composed.__dict__, "composed": True, "kernels_us": kern, **total})
        ranked = sorted((r for r in rows if "median_us" in r), key=lambda r: r["median_us"])
        return rows, tg.GDNTiling(**ranked[0]["tiling"])
    except Exception as e:
        rows.append({"tiling": composed.__dict__, "composed": True, "error": f"{type(e).__name__}: {e}"[:400]})
        ranked = sorted((r for r in rows if "median_us" in r), key=lambda r: r["median_us"])
        return rows, tg.GDNTiling(**ranked[0]["tiling"]) if ranked else tg.DEFAULT_TILING


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--sweep", action="store_true", help="time GDNTiling variants first and use the fastest")
    p.add_argument("--quick", action="store_true", help="B=1 only")
    p.add_argument("--once", action="store_true", help="only run the fused layer 6 times at B=1, T=3 (for ncu)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.once:
        a = layer_inputs(1, 3, torch.bfloat16, seed=0)
        for _ in range(6):
            tg.fused_gdn_layer(**a)
        torch.cuda.synchronize()
        return
    result: dict = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), command="python -m kernels.gdn.bench_gdn " + " ".join(sys.argv[1:]),
        shapes=dict(H=H, D=D, S=S, dtype="bf16 activations, fp32 state"),
    )  # fmt: skip
    tiling = tg.DEFAULT_TILING

    def section(name: str, fn: Callable[[], object]) -> object:
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()[-2000:]}
        print(f"# {name} done", file=sys.stderr, flush=True)
        return result[name]

    if args.sweep:
        rows_best = section("sweep", sweep)
        if isinstance(rows_best, tuple):
            result["sweep"], tiling = rows_best[0], rows_best[1]
    result["tiling"] = tiling.__dict__
    bw = copy_bandwidth()
    result["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
    shapes = [(1, 3), (1, 5)] if args.quick else [(1, 3), (1, 5), (2, 3), (4, 3)]
    for B, T in ((1, 3), (1, 5), (2, 3)):
        section(f"checks_B{B}_T{T}", lambda B=B, T=T: checks(B, T, tiling))
    section("timings", lambda: [timings(B, T, tiling, bw) for B, T in shapes])
    section("kernels", lambda: kernel_breakdown(tiling))
    section("module_B1_T3", lambda: module_compare(1, 3))
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    print("\n# summary (us per layer, CUDA graph, median)")
    for r in result.get("timings", []) if isinstance(result.get("timings"), list) else []:
        print(
            f"B={r['B']} T={r['T']}: fused {r['triton_fused_layer_graph']['median_us']}"
            f" | scan {r['triton_scan_bf16_graph']['median_us']}"
            f" | naive layer {r['naive_layer_bf16_graph']['median_us']}"
            f" | naive scan {r['naive_scan_fp32_graph']['median_us']}"
            f" | floor {r['floor']['scan_qkv_out_us']} / {r['floor']['fused_layer_us']}"
        )


if __name__ == "__main__":
    main()
