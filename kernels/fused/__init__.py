"""Fused memory-bound DiT-block ops: references (`naive`) and, where triton imports, Triton kernels.

`kernels.fused.triton_fused` imports triton at module load, so nothing here imports it eagerly: `triton_ops()`
returns the module, or None where triton is missing.
"""

from __future__ import annotations

import functools
from types import ModuleType

from kernels.fused.naive import dwconv_glu, ln_modulate, residual_ln_modulate, rms_norm

__all__ = ["dwconv_glu", "ln_modulate", "residual_ln_modulate", "rms_norm", "triton_ops"]


@functools.cache
def triton_ops() -> ModuleType | None:
    """`kernels.fused.triton_fused`, or None when triton (or the module) cannot be imported here."""
    try:
        from kernels.fused import triton_fused
    except ImportError:
        return None
    return triton_fused
