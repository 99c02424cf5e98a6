# Probe (not part of the engine): run once on the GPU for loadtest/results/README.md, Performance I fourth pass.
# ruff: noqa
"""Device experiment: (1) does PDL work under graph capture with triton 3.6, and what does it save per launch;
(2) where the in-graph gaps of one 2B forward are (by the kernel that follows)."""

import json, sys, time, os
import torch, triton, triton.language as tl
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


@triton.jit
def _inc(x_ptr, y_ptr, n, BLOCK: tl.constexpr, GDC: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if GDC:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + offs, mask=m)
    tl.store(y_ptr + offs, x + 1.0, mask=m)


def chain(n_el, pdl, N=200):
    a = torch.zeros(n_el, device="cuda")
    b = torch.zeros_like(a)

    def run():
        x, y = a, b
        for i in range(N):
            kw = {"launch_pdl": True} if pdl else {}
            _inc[(triton.cdiv(n_el, 1024),)](x, y, n_el, BLOCK=1024, GDC=pdl, **kw)
            x, y = y, x

    run()
    torch.cuda.synchronize()
    a.zero_()
    b.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    a.zero_()
    b.zero_()
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    ok = bool((a == N).all()) if N % 2 == 0 else bool((b == N).all())
    ts = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / N)
    return {"ok": ok, "us_per_kernel": round(min(ts), 2)}


out = {}
for n_el in (2640 * 2240 // 2, 2640 * 560, 4096):
    out[f"chain_{n_el}"] = {"plain": chain(n_el, False), "pdl": chain(n_el, True)}
print(json.dumps(out, indent=1))

sys.path.insert(0, "loadtest")
import profile_dit as pd

s = pd.Setup()
s.chunk_fps(reps=1, chunk_graphs=False)
g = max(s.editor.runner._graphs.values(), key=lambda gr: gr.inputs["x"].numel())
for _ in range(3):
    g.replay()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
evs = sorted(
    (e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.name())
    for e in prof.profiler.kineto_results.events()
    if e.device_type() == DeviceType.CUDA
)
n = len(evs) // 3
one = evs[n : 2 * n]
by = {}
tot = 0.0
for i in range(1, len(one)):
    gap = one[i][0] - one[i - 1][1]
    tot += gap
    k = one[i - 1][2][:40] + " -> " + one[i][2][:40]
    v = by.setdefault(k, [0, 0.0])
    v[0] += 1
    v[1] += gap
nxt = {}
for i in range(1, len(one)):
    gap = one[i][0] - one[i - 1][1]
    v = nxt.setdefault(one[i][2][:50], [0, 0.0])
    v[0] += 1
    v[1] += gap
res = {
    "kernels_per_replay": n,
    "gap_total_us": round(tot, 1),
    "span_us": round(one[-1][1] - one[0][0], 1),
    "busy_us": round(sum(e[1] - e[0] for e in one), 1),
    "by_next": {k: [v[0], round(v[1], 1)] for k, v in sorted(nxt.items(), key=lambda kv: -kv[1][1])[:30]},
    "by_pair": {k: [v[0], round(v[1], 1)] for k, v in sorted(by.items(), key=lambda kv: -kv[1][1])[:30]},
}
out["graph_gaps"] = res
print(json.dumps(res, indent=1))
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/gaps.json", "w"), indent=1)
