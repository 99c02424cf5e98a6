"""Kernel tilings timed where they run: inside the whole 2B forward (one CUDA-graph replay), not alone.

    python3 loadtest/tile_sweep.py [--json PATH] [--match SUBSTRING[,SUBSTRING...]]

The kernel benchmarks (kernels/*/bench_*.py) time one kernel on its own, with the GPU at its idle clocks and
nothing else in L2; inside the forward the same kernel runs between GEMMs that hold the clocks down and fill L2,
and the fastest tiling differs (phase A of the GDN scan: 64-token tiles alone, 32 inside). For every variant this
captures a fresh graph of `DiTModel.forward_step` on the steady-state chunk inputs (1280x704, bf16, random weights,
softmax window of sink + previous chunk) and reports the best of three means of eight replays, in ms per forward.
The default is measured several times through the list: the spread of those is the noise to compare against.
Needs CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import profile_dit  # noqa: E402

from engine import step as step_mod  # noqa: E402
from engine.bench import _env  # noqa: E402
from kernels.fused import triton_fused as tf  # noqa: E402
from kernels.gdn import triton_gdn as tg  # noqa: E402


def variants() -> list[tuple[str, tg.GDNTiling | None, tf.DWConvTiling | None]]:
    """(name, GDN tiling or None = default, dwconv tiling or None = default); "default" recurs as the control."""
    R = dataclasses.replace
    G, W = tg.DEFAULT_TILING, tf.DEFAULT_DWCONV
    return [
        ("default", None, None),
        ("gdn a_block64", R(G, block_a=64), None),
        ("gdn a_block16", R(G, block_a=16), None),
        ("gdn a_stages2", R(G, stages_a=2), None),
        ("gdn a_nomerge", R(G, merge_a=False), None),
        ("gdn a_split2", R(G, split_a=2), None),
        ("default", None, None),
        ("gdn c_stages1", R(G, stages_c=1), None),
        ("gdn c_stages3", R(G, stages_c=3), None),
        ("gdn c_warps8", R(G, warps_c=8), None),
        ("gdn c_tokens256", R(G, tokens_c=256), None),
        ("gdn b_v64", R(G, block_v=64), None),
        ("default", None, None),
        ("dw bc32 w2", None, R(W, block_c=32, num_warps=2)),
        ("dw bc128 w4", None, R(W, block_c=128)),
        ("dw bc64 w8", None, R(W, num_warps=8)),
        ("dw rows11", None, R(W, rows=11)),
        ("dw dot bw16", None, R(W, shift="dot", block_w=16)),
        ("previous defaults", R(G, block_a=64, stages_c=1), R(W, block_c=32, num_warps=2)),
        ("default", None, None),
        ("dw pairs", None, R(W, paired_rounding=True)),
        ("dw pairs bc32 w2", None, R(W, paired_rounding=True, block_c=32, num_warps=2)),
        ("default", None, None),
        ("dw pairs", None, R(W, paired_rounding=True)),
        ("dw pairs dot bw16", None, R(W, paired_rounding=True, shift="dot", block_w=16)),
        ("default", None, None),
        # Phase A in 64 x 64 blocks. Registers per thread from an offline sm_90 compile (triton 3.9, 8 warps):
        # 205 as is (the default: 251), 121 with 16-token tiles, 126 with P and P_z in separate programs: at
        # <= 128 two 8-warp CTAs fit per SM.
        ("gdn a_splitd", R(G, split_d_a=True), None),
        ("gdn a_splitd b16", R(G, split_d_a=True, block_a=16), None),
        ("gdn a_splitd b16 s2", R(G, split_d_a=True, block_a=16, stages_a=2), None),
        ("default", None, None),
        ("gdn a_splitd nomerge", R(G, split_d_a=True, merge_a=False), None),
        ("gdn a_splitd nomerge s2", R(G, split_d_a=True, merge_a=False, stages_a=2), None),
        ("gdn a_splitd nomerge b16", R(G, split_d_a=True, merge_a=False, block_a=16), None),
        ("default", None, None),
    ]


def env_variants() -> list[tuple[str, tg.GDNTiling | None, tf.DWConvTiling | None, dict]]:
    """Variants under an environment setting, read per launch (so it holds for the graph captured while set):
    programmatic dependent launch of every Triton kernel (kernels/pdl.py)."""
    pdl = {"SANA_STREAM_PDL": "1"}
    split = dataclasses.replace(tg.DEFAULT_TILING, split_d_a=True, block_a=16)
    return [("pdl", None, None, pdl), ("pdl a_splitd b16", split, None, pdl), ("default", None, None, {})]


def replay_ms(setup: profile_dit.Setup, inputs: dict, pool, gdn=None, dw=None) -> float | str:
    gdn_defaults = tg.fused_gdn_layer.__defaults__
    dw_defaults = dict(tf.dwconv_glu.__kwdefaults__)
    if gdn is not None:  # the engine calls both with their default tiling
        tg.fused_gdn_layer.__defaults__ = (*gdn_defaults[:-1], gdn)
    if dw is not None:
        tf.dwconv_glu.__kwdefaults__ = {"tiling": dw}
    try:
        with torch.no_grad():
            graph = step_mod._Graph(setup.dit, step_mod.StaticInputs(inputs), pool)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(3):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(8):
                graph.replay()
            e1.record()
            e1.synchronize()
            best = min(best, e0.elapsed_time(e1) / 8)
        del graph
        return round(best, 3)
    except Exception as e:  # an invalid combination: report it, keep sweeping
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        tg.fused_gdn_layer.__defaults__ = gdn_defaults
        tf.dwconv_glu.__kwdefaults__ = dw_defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="/tmp/tile_sweep.json")
    ap.add_argument(
        "--match",
        default="",
        help="only the variants whose name contains one of these, comma-separated (and the controls)",
    )
    args = ap.parse_args()
    s = profile_dit.Setup()
    s.chunk_fps(reps=1, chunk_graphs=False)  # captures per-forward graphs; the steady-state one has the longest window

    def window(graph) -> int:
        reads = [r for r in graph.inputs["reads"] if r.past_kv is not None]
        return reads[0].past_kv[0].shape[1] if reads else 0

    inputs = max(s.editor.runner._graphs.values(), key=window).inputs
    pool = torch.cuda.graph_pool_handle()
    res: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python3 " + " ".join(sys.argv),
        "defaults": {"gdn": dataclasses.asdict(tg.DEFAULT_TILING), "dwconv": dataclasses.asdict(tf.DEFAULT_DWCONV)},
        "ms_per_forward": {},
    }
    for name, gdn, dw, env in [(*v, {}) for v in variants()] + env_variants():
        if not any(m in name for m in args.match.split(",")) and name != "default":
            continue
        with _env(**env):
            ms = replay_ms(s, inputs, pool, gdn, dw)
        res["ms_per_forward"].setdefault(name, []).append(ms)
        print(f"{name:24s} {ms}", flush=True)
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
