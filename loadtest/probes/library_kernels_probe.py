# Probe (not part of the engine): run once on the GPU for loadtest/results/README.md, Performance I fourth pass.
# ruff: noqa
import json, os, sys, time
import torch, torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.nn.attention import SDPBackend, sdpa_kernel
from kernels.timing import graph_us

dev = "cuda"
bf = torch.bfloat16
out = {}


def memsets(fn):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    names = [e.name() for e in p.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA]
    return [n[:60] for n in names]


# attention
H, D, N = 20, 112, 2640


def qkv(nk, sets=3):
    return [
        (
            torch.randn(1, H, N, D, device=dev, dtype=bf),
            torch.randn(1, H, nk, D, device=dev, dtype=bf),
            torch.randn(1, H, nk, D, device=dev, dtype=bf),
        )
        for _ in range(sets)
    ]


for name, nk in (("self", 7920), ("cross", 300)):
    ins = qkv(nk)
    for be in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, be)):
                fns = [lambda a=a: F.scaled_dot_product_attention(*a) for a in ins]
                r = graph_us(fns)
                ks = memsets(fns[0])
            out[f"attn_{name}_{be}"] = {"us": r["median_us"], "kernels": ks}
        except Exception as e:
            out[f"attn_{name}_{be}"] = str(e)[:200]
        print(name, be, out[f"attn_{name}_{be}"])
    # dense alternative for cross: two GEMMs + softmax
    if name == "cross":

        def dense(a):
            q, k, v = a
            s = torch.matmul(q, k.transpose(-1, -2)) * D**-0.5
            return torch.matmul(s.softmax(-1), v)

        r = graph_us([lambda a=a: dense(a) for a in ins])
        out["attn_cross_dense"] = r["median_us"]
        print("cross dense", r)
# GEMMs
x = [torch.randn(1, N, 2240, device=dev, dtype=bf) for _ in range(3)]
# perf1_library_kernels_h100.json (2026-11-23) was measured with "inproj" at 8980 columns, not a width of the model
# (the GDN layers' fused in-projection has 4C + 2H = 9000): rows not 16-byte aligned, so cuBLAS ran an sm80 kernel.
for nm, nout in (("inproj", 9000), ("ffn_up", 13440), ("out", 2240)):
    W = torch.randn(nout, 2240, device=dev, dtype=bf) * 0.02
    b = torch.randn(nout, device=dev, dtype=bf)
    for var in ("bias", "nobias", "addmm2d"):
        if var == "bias":
            fns = [lambda xi=xi: F.linear(xi, W, b) for xi in x]
        elif var == "nobias":
            fns = [lambda xi=xi: F.linear(xi, W) for xi in x]
        else:
            fns = [lambda xi=xi: torch.addmm(b, xi.view(-1, 2240), W.t()) for xi in x]
        for lib in ("cublaslt", "cublas"):
            torch.backends.cuda.preferred_blas_library(lib)
            r = graph_us(fns)
            ks = memsets(fns[0])
            out[f"gemm_{nm}_{var}_{lib}"] = {"us": r["median_us"], "kernels": ks}
            print(nm, var, lib, out[f"gemm_{nm}_{var}_{lib}"])
    torch.backends.cuda.preferred_blas_library("cublaslt")
# eager work of a steady-state chunk, by aten op
sys.path.insert(0, "loadtest")
import profile_dit as pd

s = pd.Setup()
s.chunk_fps(reps=1)
prof = s.profile_chunk()
rows = []
for e in prof.key_averages(group_by_input_shape=True):
    dt = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
    if dt > 0:
        rows.append((dt, e.key, e.count, str(e.input_shapes)[:150]))
rows.sort(reverse=True)
out["eager_chunk_ops"] = [[round(r[0], 1), r[1], r[2], r[3]] for r in rows[:40]]
for r in rows[:40]:
    print(round(r[0], 1), r[1], r[2], r[3])
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/exp3.json", "w"), indent=1)
