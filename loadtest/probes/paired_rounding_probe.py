"""Probe (not part of the engine): dwconv_glu with bf16 rounding two elements per conversion
(`DWConvTiling.paired_rounding`) against one per conversion, at the 2B shape on the GPU.

    python3 loadtest/probes/paired_rounding_probe.py [--json PATH]

Checks the outputs are bit-identical (both round to nearest even; only the instruction sequence differs) and
times each tiling alone (CUDA-graph medians over rotating inputs, kernels/timing.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from kernels.fused import bench_fused as bf
from kernels.fused import triton_fused as tf
from kernels.timing import graph_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="/tmp/paired_rounding.json")
    args = ap.parse_args()
    R, W = dataclasses.replace, tf.DEFAULT_DWCONV
    tilings = {
        "default": W,
        "pairs": R(W, paired_rounding=True),
        "bc32 w2": R(W, block_c=32, num_warps=2),
        "pairs bc32 w2": R(W, paired_rounding=True, block_c=32, num_warps=2),
        "dot bw16": R(W, shift="dot", block_w=16),
        "pairs dot bw16": R(W, shift="dot", block_w=16, paired_rounding=True),
    }
    sets = [bf.dw_inputs(seed) for seed in range(bf.n_sets("dwconv_glu"))]
    res: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with torch.no_grad():
        base = {}
        for name, t in tilings.items():
            out = tf.dwconv_glu(**sets[0], tiling=t)
            key = (t.shift, t.fast_silu)
            entry: dict = graph_us([lambda a=a, t=t: tf.dwconv_glu(**a, tiling=t) for a in sets])
            entry.update(bf.kernel_stats(tf._dwconv_glu_kernel))
            if key in base:
                entry["differs_from_unpaired"] = float((out != base[key]).float().mean())
            else:
                base[key] = out
            res[name] = entry
            print(name, entry, flush=True)
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
