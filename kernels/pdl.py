"""Programmatic dependent launch (PDL) for the project's Triton kernels, off unless SANA_STREAM_PDL=1.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still running; it waits
for that kernel to finish (and its writes to be visible) at `griddepcontrol.wait`, which every kernel here
issues first thing when compiled with GDC=True, before it reads or writes any global memory. So the launch and
block scheduling overlap the previous kernel's tail instead of following it: 0.35-0.45 us a kernel in a chain of
Triton kernels under a CUDA graph on an H100 (`loadtest/results/perf1_graph_gaps_h100.json`); the forward's gaps
before Triton kernels add up to ~0.09 ms of its ~23.5 ms.

Correctness does not depend on the previous kernel: one that never triggers early (cuBLAS, cuDNN, torch's own)
simply lets ours start at its end, as without PDL. Every kernel here waits before touching memory, so a
kernel's completion still implies all kernels before it in the stream have completed.

Off by default until timed in the whole forward (`loadtest/results/README.md`); never under TRITON_INTERPRET=1
(the interpreter has no grid dependencies), nor where the installed triton lacks `gdc_wait`.

Non-goals: early triggers (`gdc_launch_dependents`): a kernel that triggered before its last write would let the
next one start on stale data unless that one waits, and all of ours do; the gain is in the launch, not there.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_ON = ("1",)
_OFF = ("", "0")


def pdl_enabled() -> bool:
    """Whether launches use PDL now (read per call, like TRITON_INTERPRET, so a process can time both)."""
    value = os.environ.get("SANA_STREAM_PDL", "0").strip()
    if value not in _ON + _OFF:
        raise ValueError(f"SANA_STREAM_PDL must be 0 or 1, got {value!r}")
    if value in _OFF or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return hasattr(tl.extra.cuda, "gdc_wait")


@triton.jit
def wait_previous(GDC: tl.constexpr):
    """A kernel's first statement: with GDC, wait until the previous kernel in the stream has completed."""
    if GDC:
        tl.extra.cuda.gdc_wait()


def pdl_options() -> dict:
    """Extra keyword arguments for a kernel launch: the kernel's GDC constexpr and triton's `launch_pdl` option
    when PDL is on, nothing otherwise (the kernels' GDC defaults to False)."""
    return {"GDC": True, "launch_pdl": True} if pdl_enabled() else {}
