"""Registers, spills and shared memory of the GDN phase A / C kernels for sm_90, compiled offline (no GPU needed).

    python3 loadtest/probes/offline_regs_probe.py [--json PATH]

Occupancy decides much of phases A and C (kernels/gdn/README.md: one CTA per SM, latency-bound), and it follows from
the registers per thread and the shared memory per CTA, which the compiler alone fixes. This compiles each variant
with `triton.compile` for `GPUTarget("cuda", 90, 32)` at the 2B shapes (D = 112 padded to 128, bf16 operands, the
fused prologue with full RoPE tables, 22 x 40 tokens per frame) and reads the cubin's resource usage (and the SASS
instruction count) with the cuobjdump that ships with triton. Figures are those of the local triton, which may
differ from the GPU machine's; the kernels' speed is measured there (`loadtest/tile_sweep.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.gdn import triton_kernels as K  # noqa: E402

SHAPE = dict(D=112, BD=128, GRID_W=40, GRID_H=22, PT=0, PTH=0, PROLOGUE=True, ROPE=1, BF16=True, EMU=False,
             PREC="tf32")  # fmt: skip
# Pointer types of each kernel's tensors as the engine passes them (bf16 activations, fp32 statistics / states).
POINTERS = {
    "_phase_a_kernel": {"k_ptr": "*bf16", "kr_ptr": "*bf16", "v_ptr": "*bf16", "beta_ptr": "*bf16",
                        "rstd_ptr": "*fp32", "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                        "pa_ptr": "*fp32", "bz_ptr": "*fp32"},
    "_phase_c_kernel": {"q_ptr": "*bf16", "qr_ptr": "*bf16", "rstd_ptr": "*fp32", "w_ptr": "*bf16",
                        "cos_ptr": "*fp32", "sin_ptr": "*fp32", "hs_ptr": "*bf16", "zs_ptr": "*fp32",
                        "gate_ptr": "*bf16", "out_ptr": "*bf16", "den_ptr": "*fp32"},
}  # fmt: skip
FLOATS = {"scale", "eps"}
# (kernel, constexprs beyond SHAPE, num_warps, num_stages); the first of each kernel is the engine's default.
VARIANTS = [
    ("_phase_a_kernel", dict(MERGE=True, BS=32, BO=128), 8, 1),
    ("_phase_a_kernel", dict(MERGE=True, BS=32, BO=64), 8, 1),
    ("_phase_a_kernel", dict(MERGE=True, BS=16, BO=64), 8, 1),
    ("_phase_a_kernel", dict(MERGE=True, BS=16, BO=64), 8, 2),
    ("_phase_a_kernel", dict(MERGE=False, BS=32, BO=64), 8, 1),
    ("_phase_a_kernel", dict(MERGE=False, BS=32, BO=64), 8, 2),
    ("_phase_a_kernel", dict(MERGE=False, BS=16, BO=64), 8, 1),
    ("_phase_a_kernel", dict(MERGE=True, BS=32, BO=64), 4, 1),
    ("_phase_c_kernel", dict(GATE=True, NUM_DEN=False, BS=128), 16, 2),
    ("_phase_c_kernel", dict(GATE=True, NUM_DEN=False, BS=128), 8, 2),
    ("_phase_c_kernel", dict(GATE=True, NUM_DEN=False, BS=64), 16, 2),
]


def compile_variant(name: str, const: dict, warps: int, stages: int):
    fn = getattr(K, name)
    const = {**SHAPE, **const}
    ptrs = POINTERS[name]
    sig = {a: "constexpr" if a in const else ptrs.get(a, "fp32" if a in FLOATS else "i32") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ptrs}
    src = ASTSource(fn, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def resources(kernel) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(kernel.asm["cubin"])
        out = subprocess.run([str(cuobjdump), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-300:]}")
    regs, shared = int(m.group(1)), int(kernel.metadata.shared)
    warps = kernel.metadata.num_warps
    # An H100 SM: 64 K registers (allocated per warp in multiples of 8 per thread), 228 KiB of shared memory
    # (1 KiB of it reserved per CTA), 64 warps.
    by_regs = 65536 // (-(-regs // 8) * 8 * 32 * warps)
    by_shared = (228 * 1024) // (shared + 1024)
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, flags=re.M))
    return {"regs": regs, "stack_bytes": int(m.group(2)), "shared_bytes": shared,
            "ctas_per_sm": min(by_regs, by_shared, 64 // warps), "sass_instructions": instructions}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for name, const, warps, stages in VARIANTS:
        r = {"kernel": name, **const, "num_warps": warps, "num_stages": stages,
             **resources(compile_variant(name, const, warps, stages))}  # fmt: skip
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        res = {"date": time.strftime("%Y-%m-%d"), "command": "python3 " + " ".join(sys.argv),
               "machine": "CPU only (offline compile)", "triton": triton.__version__, "target": "sm_90",
               "variants": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
