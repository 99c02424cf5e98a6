"""What a steady-state 2B chunk spends outside its CUDA graph's forwards (Performance I, fifth pass).

    python3 loadtest/probes/chunk_copies_probe.py [--json PATH]

One session at 1280x704, bf16, whole-chunk graphs (the engine's default), brought to steady state; then one chunk
under torch.profiler. Device time is split into copies (memcpy / copy kernels / concatenation: the cache entries
loaded into the graph's static buffers and the writes stored back) and everything else, with the aten copy ops by
input shape and the span of the chunk, so the cost of moving cache entries in and out of the static buffers is a
measured number. Needs CUDA and diffusers (for the VAE class).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.autograd import DeviceType

sys.path.insert(0, "loadtest")
import profile_dit as pd  # noqa: E402

COPY_WORDS = ("Memcpy", "Memset", "copy_kernel", "CatArrayBatchedCopy")


def _is_copy(name: str) -> bool:
    return any(w in name for w in COPY_WORDS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    s = pd.Setup()
    fps, _ = s.chunk_fps(reps=1)
    prof = s.profile_chunk()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    begin = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        rec = by_name.setdefault(e.name[:100], [0.0, 0])
        rec[0] += e.time_range.elapsed_us()
        rec[1] += 1
    copies = {k: v for k, v in by_name.items() if _is_copy(k)}
    ops = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::copy_", "aten::cat", "aten::clone", "aten::index_copy_"):
            dt = getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0)
            ops.append([round(dt, 1), e.key, e.count, str(e.input_shapes)[:200]])
    ops.sort(reverse=True)
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dit_fps_graphs": fps,
        "chunk_span_us": round(end - begin, 1),
        "device_busy_us": round(sum(v[0] for v in by_name.values()), 1),
        "copy_us": round(sum(v[0] for v in copies.values()), 1),
        "copy_kernels": {k: [round(v[0], 1), v[1]] for k, v in sorted(copies.items(), key=lambda kv: -kv[1][0])},
        "kernels": len(kernels),
        "copy_ops_by_shape": ops[:40],
    }
    print(json.dumps({k: v for k, v in out.items() if k != "copy_ops_by_shape"}, indent=1))
    for row in ops[:25]:
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
