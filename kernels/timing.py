"""GPU timing helpers shared by the kernel benchmarks (kernels/*/bench_*.py): CUDA-graph medians over rotating
input sets (so inputs are not sitting in L2), eager medians, and the device's copy bandwidth for floors."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import triton


def graph_us(fns: list[Callable[[], object]], reps: int = 10, trials: int = 7) -> dict:
    """Median microseconds per call of fns (rotating), replayed from one CUDA graph of reps rounds."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph (autotuning, lazy init)
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / (reps * len(fns)))
    del g
    torch.cuda.synchronize()
    return dict(median_us=round(statistics.median(ts), 2), min_us=round(min(ts), 2), max_us=round(max(ts), 2))


def eager_us(fns: list[Callable[[], object]], warmup: int = 25, rep: int = 200) -> float:
    """Median microseconds per call of fns (rotating), launched one by one (launch overhead included)."""
    i = [0]

    def f() -> None:
        fns[i[0] % len(fns)]()
        i[0] += 1

    return round(1e3 * triton.testing.do_bench(f, warmup=warmup, rep=rep, return_mode="median"), 2)


def copy_bandwidth() -> float:
    """Device-to-device copy in bytes/s, counting bytes read plus written (1 GiB buffers)."""
    x = torch.empty(2**29, dtype=torch.float16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=20, rep=200, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def profile_kernels(fn: Callable[[], object], iters: int = 20) -> dict[str, float]:
    """Average device microseconds per call of each kernel fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        tot = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if tot:
            rows[e.key[:120]] = round(tot / iters, 2)
    return rows
