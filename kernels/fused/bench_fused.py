"""GPU check and benchmark of the fused DiT-block kernels at SANA-Streaming's real shapes; prints JSON.

    python -m kernels.fused.bench_fused [--json FILE] [--no-sweep]

Shapes: B = 1, T = 3 latent frames of 22 x 40 tokens (1280x704, N = 2640), C = 2240, FFN hidden F = 6720
(u is (1, 2640, 13440)), bf16 activations and weights (the model's dtype).

For each op (`dwconv_glu`, `ln_modulate`, `residual_ln_modulate` with a gate and without) it:

- checks the bf16 kernel against an fp32 evaluation of the reference on the same (upcast) inputs, next to the
  bf16 reference's own error, and the kernel against the bf16 reference (where the two round alike); fp32
  kernel against the fp32 reference;
- sweeps launch configurations (`DWConvTiling`, `LNTiling`), each checked against the bf16 reference;
- times, as CUDA-graph replays over rotating input sets (so inputs do not sit in L2): the Triton kernel (the
  default and the sweep's best configuration), the eager PyTorch reference, and torch.compile of the
  reference; the Triton kernel also without a graph (launch overhead included); reports us, GB/s and the
  memory floor (bytes read + written once, over a measured device-to-device copy's bandwidth);
- breaks the eager and compiled references down per kernel (torch.profiler).

Imports only torch, triton and kernels/. Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import traceback
from collections.abc import Callable

import torch
import triton
from torch import Tensor

from kernels.fused import naive
from kernels.fused import triton_fused as tf
from kernels.timing import copy_bandwidth, eager_us, graph_us, profile_kernels

DEV = "cuda"
T, GH, GW = 3, 22, 40
N = T * GH * GW
C, FF = 2240, 6720
EPS = 1e-6
BF16 = torch.bfloat16

DW_SWEEP = [  # shift, block_w, block_c, rows, num_warps, fast_silu
    ("dot", 16, 64, 22, 4), ("dot", 16, 64, 11, 4), ("dot", 16, 64, 8, 4), ("dot", 16, 32, 22, 2),
    ("dot", 16, 32, 11, 4), ("dot", 16, 64, 11, 8), ("dot", 16, 128, 11, 8), ("dot", 16, 128, 22, 8),
    ("dot", 16, 64, 22, 4, True), ("dot", 16, 64, 11, 4, True), ("dot", 16, 64, 11, 8, True),
    ("dot", 16, 32, 11, 4, True), ("load", 8, 64, 11, 4), ("load", 16, 64, 11, 8), ("load", 8, 64, 11, 4, True),
    ("load", 8, 32, 22, 2, True),
]  # fmt: skip
LN_SWEEP = [  # rows, num_warps, split
    (1, 4, True), (1, 8, True), (2, 4, True), (2, 8, True), (4, 8, True), (1, 2, True), (2, 8, False), (1, 4, False),
]  # fmt: skip


def dw_inputs(seed: int, dtype: torch.dtype = BF16) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    u = 1.5 * torch.randn(1, N, 2 * FF, generator=g, device=DEV)
    w = torch.randn(2 * FF, 1, 3, 3, generator=g, device=DEV) / 3
    b = 0.1 * torch.randn(2 * FF, generator=g, device=DEV)
    return dict(u=u.to(dtype), weight=w.to(dtype), bias=b.to(dtype), frames=T, height=GH, width=GW)


def ln_inputs(seed: int, dtype: torch.dtype = BF16) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rn(*shape: int, s: float = 1.0) -> Tensor:
        return (s * torch.randn(*shape, generator=g, device=DEV)).to(dtype)

    x = (2.0 * torch.randn(1, N, C, generator=g, device=DEV) + 0.3).to(dtype)
    return dict(x=x, delta=rn(1, N, C), gate=rn(1, 1, C, s=0.5), shift=rn(1, 1, C, s=0.3), scale=rn(1, 1, C, s=0.3))


def up(a: dict) -> dict:
    return {k: (v.float() if isinstance(v, Tensor) else v) for k, v in a.items()}


def err(x: Tensor, ref: Tensor) -> dict:
    d = x.double() - ref.double()
    return dict(
        rel_l2=float(d.norm() / ref.double().norm()), max_abs=float(d.abs().max()),
        max_ref=float(ref.double().abs().max()), frac_differ=float((d != 0).double().mean()),
    )  # fmt: skip


# --- the ops as the bench calls them: (triton fn, reference fn) on one input dict ------------------------------


def op_fns(op: str) -> tuple[Callable[..., object], Callable[..., object]]:
    if op == "dwconv_glu":
        return (
            lambda a, t=tf.DEFAULT_DWCONV: tf.dwconv_glu(**a, tiling=t),
            lambda a: naive.dwconv_glu(**a),
        )
    if op == "ln_modulate":
        return (
            lambda a, t=tf.DEFAULT_LN: tf.ln_modulate(a["x"], a["shift"], a["scale"], EPS, tiling=t),
            lambda a: naive.ln_modulate(a["x"], a["shift"], a["scale"], EPS),
        )
    gate = op == "residual_ln_modulate_gate"
    return (
        lambda a, t=tf.DEFAULT_LN: tf.residual_ln_modulate(
            a["x"], a["delta"], a["gate"] if gate else None, a["shift"], a["scale"], EPS, tiling=t
        ),
        lambda a: naive.residual_ln_modulate(
            a["x"], a["delta"], a["gate"] if gate else None, a["shift"], a["scale"], EPS
        ),
    )


OPS = ["dwconv_glu", "ln_modulate", "residual_ln_modulate_gate", "residual_ln_modulate"]


def inputs(op: str, seed: int, dtype: torch.dtype = BF16) -> dict:
    return dw_inputs(seed, dtype) if op == "dwconv_glu" else ln_inputs(seed, dtype)


def n_sets(op: str) -> int:
    return 3 if op == "dwconv_glu" else 5  # enough distinct inputs to overflow the 50 MB L2


def bytes_moved(op: str) -> int:
    e = 2  # bf16
    if op == "dwconv_glu":
        return N * 2 * FF * e + N * FF * e
    if op == "ln_modulate":
        return 2 * N * C * e
    return 4 * N * C * e  # x, delta read; x_new, h written


def outs(r: object) -> list[Tensor]:
    return list(r) if isinstance(r, tuple) else [r]  # type: ignore[arg-type]


def tiling_of(op: str, cfg: tuple) -> object:
    return tf.DWConvTiling(*cfg) if op == "dwconv_glu" else tf.LNTiling(*cfg)


# --- timing --------------------------------------------------------------------------------------------------


def kernel_stats(fn: object) -> dict:
    """Registers / spills / shared memory of the kernel fn compiled last (Triton's JIT cache)."""
    try:
        for entry in fn.device_caches.values():  # type: ignore[attr-defined]
            cache = entry[0]
            if cache:
                k = list(cache.values())[-1]
                return dict(n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared)
    except Exception as e:
        return {"stats_error": f"{type(e).__name__}: {e}"[:200]}
    return {}


# --- sections ------------------------------------------------------------------------------------------------


def checks(op: str) -> dict:
    fast, ref = op_fns(op)
    a = inputs(op, seed=100)
    a32 = up(a)
    r32, rbf, got = outs(ref(a32)), outs(ref(a)), outs(fast(a))
    names = ["out"] if len(got) == 1 else ["x_new", "h"]
    res: dict = {}
    for n, g_, rb, r3 in zip(names, got, rbf, r32):
        res[n] = dict(
            triton_bf16_vs_fp32=err(g_, r3), reference_bf16_vs_fp32=err(rb, r3), triton_vs_reference_bf16=err(g_, rb),
        )  # fmt: skip
    got32 = outs(fast(a32))
    res["fp32"] = {n: err(g_, r3) for n, g_, r3 in zip(names, got32, r32)}
    return res


def sweep(op: str, configs: list[tuple]) -> dict:
    fast, ref = op_fns(op)
    sets = [inputs(op, seed=s) for s in range(n_sets(op))]
    want = outs(ref(sets[0]))
    rows = []
    for cfg in configs:
        row: dict = {"config": list(cfg)}
        try:
            t = tiling_of(op, cfg)
            got = outs(fast(sets[0], t))
            row["vs_reference_bf16"] = max(err(g_, w_)["rel_l2"] for g_, w_ in zip(got, want))
            row.update(kernel_stats(tf._dwconv_glu_kernel if op == "dwconv_glu" else tf._ln_modulate_kernel))
            row.update(graph_us([lambda a=a, t=t: fast(a, t) for a in sets]))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:600]
        rows.append(row)
        print(f"#   {op} {cfg}: {row.get('median_us', row.get('error'))}", file=sys.stderr, flush=True)
    ok = [r for r in rows if "median_us" in r and r["vs_reference_bf16"] < 1e-2]
    best = min(ok, key=lambda r: r["median_us"]) if ok else None
    return dict(rows=rows, best=best["config"] if best else None)


def timings(op: str, best: object | None, bw: float) -> dict:
    fast, ref = op_fns(op)
    sets = [inputs(op, seed=s) for s in range(n_sets(op))]
    nbytes = bytes_moved(op)
    res: dict = dict(bytes=nbytes, floor_us=round(nbytes / bw * 1e6, 2))
    default = tf.DEFAULT_DWCONV if op == "dwconv_glu" else tf.DEFAULT_LN
    res["default_tiling"] = default.__dict__
    res["triton_default_graph"] = graph_us([lambda a=a: fast(a, default) for a in sets])
    if best is not None:
        res["best_tiling"] = best.__dict__
        res["triton_best_graph"] = graph_us([lambda a=a: fast(a, best) for a in sets])
    res["triton_default_no_graph_us"] = eager_us([lambda a=a: fast(a, default) for a in sets])
    if best is not None:  # the best configuration against the bf16 and fp32 references
        got, rbf, r32 = outs(fast(sets[0], best)), outs(ref(sets[0])), outs(ref(up(sets[0])))
        names = ["out"] if len(got) == 1 else ["x_new", "h"]
        res["checks_best"] = {
            n: dict(vs_reference_bf16=err(g_, b_), vs_fp32=err(g_, f_)) for n, g_, b_, f_ in zip(names, got, rbf, r32)
        }
    res["eager_reference_graph"] = graph_us([lambda a=a: ref(a) for a in sets], reps=3, trials=5)
    compiled = torch.compile(ref, dynamic=False)
    res["compiled_reference_graph"] = graph_us([lambda a=a: compiled(a) for a in sets], reps=5, trials=5)
    for k in ("triton_default_graph", "triton_best_graph", "eager_reference_graph", "compiled_reference_graph"):
        if k in res:
            res[k]["GBps"] = round(nbytes / (res[k]["median_us"] * 1e-6) / 1e9, 1)
    res["compiled_vs_reference_bf16"] = [
        err(c, r)["rel_l2"] for c, r in zip(outs(compiled(sets[0])), outs(ref(sets[0])))
    ]
    res["kernels_eager_reference"] = profile_kernels(lambda: ref(sets[0]))
    res["kernels_compiled_reference"] = profile_kernels(lambda: compiled(sets[0]))
    res["kernels_triton_default"] = profile_kernels(lambda: fast(sets[0], default))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--no-sweep", action="store_true", help="time the default tilings only")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result: dict = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), command="python -m kernels.fused.bench_fused " + " ".join(sys.argv[1:]),
        shapes=dict(B=1, T=T, H=GH, W=GW, N=N, C=C, F=FF, dtype="bf16"),
    )  # fmt: skip

    def section(name: str, fn: Callable[[], object]) -> object:
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()[-2000:]}
        print(f"# {name} done", file=sys.stderr, flush=True)
        if args.json:  # after every section, so a run cut short still leaves what it measured
            with open(args.json, "w") as f:
                f.write(json.dumps(result, indent=1) + "\n")
        return result[name]

    bw = copy_bandwidth()
    result["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
    ops = args.ops.split(",")
    for op in ops:
        section(f"checks_{op}", lambda op=op: checks(op))
    for op in ops:
        best = None
        if not args.no_sweep:
            configs = DW_SWEEP if op == "dwconv_glu" else LN_SWEEP
            sw = section(f"sweep_{op}", lambda op=op, configs=configs: sweep(op, configs))
            if isinstance(sw, dict) and sw.get("best"):
                best = tiling_of(op, tuple(sw["best"]))
        section(f"timings_{op}", lambda op=op, best=best: timings(op, best, bw))
        torch.cuda.empty_cache()
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    print("\n# summary (us per call, CUDA graph medians; GB/s)")
    for op in ops:
        r = result.get(f"timings_{op}", {})
        if "floor_us" not in r:
            continue
        line = f"{op}: floor {r['floor_us']}"
        for k in ("triton_default_graph", "triton_best_graph", "eager_reference_graph", "compiled_reference_graph"):
            if k in r:
                line += f" | {k.replace('_graph', '')} {r[k]['median_us']} ({r[k]['GBps']})"
        print(line)


if __name__ == "__main__":
    main()
