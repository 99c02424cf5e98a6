"""Two levers on the last percent of Performance I, measured at the 2B shapes (H100, run from the repository root).

    python3 loadtest/probes/memset_copy_probe.py [--json PATH]

1. The library memsets. Inside one forward's CUDA graph, 65 memsets (before the FFN-up and fused in-projection
   GEMMs, and before each cuDNN attention) cost ~4 us of dependency gap each besides their own time. If they are
   cuBLAS zeroing the atomic counters of a persistent kernel's tile scheduler in its workspace, a process with a
   smaller (or no) cuBLAS workspace gets kernels without them. Each variant runs in a fresh subprocess with the
   environment set before CUDA starts: the GEMM after a LayerNorm-sized elementwise kernel, chained in a graph
   (so the memset's gap counts), its kernels' names, and its result against the default's.
2. The per-chunk cache copies (~150 tensors, ~210 MB each way): one `copy_` per tensor, as the engine does, against
   `torch._foreach_copy_` (multi-tensor kernels) on the same list, device time with the host ahead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VARIANTS = {
    "default": {},
    "lt_ws_0": {"CUBLASLT_WORKSPACE_SIZE": "0"},
    "lt_ws_0_cublas_ws_0": {"CUBLASLT_WORKSPACE_SIZE": "0", "CUBLAS_WORKSPACE_CONFIG": ":0:0"},
    "lt_ws_64k_cublas_64k": {"CUBLASLT_WORKSPACE_SIZE": "64", "CUBLAS_WORKSPACE_CONFIG": ":64:1"},
}
N, C = 2640, 2240
# Output widths: FFN up (6C), the GDN layers' fused in-projection (4C + 2H = 9000), the 2240-wide projections.
# memset_copy_h100.json (2026-12-07) was measured with "inproj" at 8980 columns, not a width of the model: its rows
# are not 16-byte aligned, so cuBLAS ran an sm80 kernel there (~420 us); the forward's in-projections run nvjet.
SHAPES = {"ffn_up": 13440, "inproj": 9000, "out": 2240}


def gemm_child() -> dict:
    import torch
    import torch.nn.functional as F
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from kernels.timing import graph_us

    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(dev).manual_seed(0)
    xs = [torch.randn(1, N, C, device=dev, dtype=bf, generator=g) for _ in range(3)]
    out = {}
    for name, nout in SHAPES.items():
        W = torch.randn(nout, C, device=dev, dtype=bf, generator=g) * 0.02
        b = torch.randn(nout, device=dev, dtype=bf, generator=g)
        for lib in ("cublaslt", "cublas"):
            torch.backends.cuda.preferred_blas_library(lib)

            def chain(x, W=W, b=b):
                return F.linear(x * 1.0001, W, b)  # an elementwise kernel first, as the forward has

            r = graph_us([lambda x=x: chain(x) for x in xs], reps=10, trials=9)
            chain(xs[0])
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                y = chain(xs[0])
                torch.cuda.synchronize()
            ks = [e.name()[:70] for e in p.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA]
            out[f"{name}_{lib}"] = {"chain_us": r["median_us"], "kernels": ks, "sum": float(y.float().sum())}
    return out


def copy_probe() -> dict:
    import torch

    dev, bf = "cuda", torch.bfloat16
    sizes = [(1, 2640, 20, 112)] * 10 + [(1, 880, 2240)] * 20 + [(1, 20, 112, 112)] * 15 + [(1, 20, 112, 1)] * 15
    src = [torch.randn(s, device=dev, dtype=bf if len(s) != 4 or s[1] != 20 else torch.float32) for s in sizes]
    dst = [torch.empty_like(t) for t in src]
    nbytes = sum(t.numel() * t.element_size() for t in src)

    def one_by_one():
        for d, s in zip(dst, src):
            d.copy_(s)

    def grouped():
        torch._foreach_copy_(dst, src)

    res = {"tensors": len(src), "MB": round(nbytes / 1e6, 1)}
    for name, fn in (("copy_each", one_by_one), ("foreach_copy", grouped)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(7):
            torch.cuda._sleep(20_000_000)  # the host runs ahead, as in the engine's steady state
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(5):
                fn()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e3 / 5)
        ts.sort()
        res[name] = {"median_us": round(ts[3], 1), "min_us": round(ts[0], 1)}
        if name == "foreach_copy":
            res["foreach_equal"] = all(torch.equal(d, s) for d, s in zip(dst, src))
    res["GBps_each"] = round(2 * nbytes / res["copy_each"]["median_us"] / 1e3, 1)
    res["GBps_foreach"] = round(2 * nbytes / res["foreach_copy"]["median_us"] / 1e3, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(gemm_child()))
        return
    import torch

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemm": {}}
    for name, env in VARIANTS.items():
        proc = subprocess.run(
            [sys.executable, __file__, "--child"], env={**os.environ, **env}, capture_output=True, text=True
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        out["gemm"][name] = json.loads(line[0][7:]) if line else {"error": proc.stderr[-1500:]}
        print(name, json.dumps(out["gemm"][name])[:1500], flush=True)
    out["copies"] = copy_probe()
    print(json.dumps(out["copies"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
