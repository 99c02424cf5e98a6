"""Frame-level bidirectional GDN: reference (`naive`, `naive_fused`) and, where triton imports, fast kernels.

`kernels.gdn.triton_gdn` imports triton at module load, so nothing here imports it eagerly: `triton_ops()`
returns the module, or None where triton is missing, and the engine picks its path from that.
"""

from __future__ import annotations

import functools
from types import ModuleType

from kernels.gdn.naive import bidirectional_gdn, gdn_scan

__all__ = ["bidirectional_gdn", "gdn_scan", "triton_ops"]


@functools.cache
def triton_ops() -> ModuleType | None:
    """`kernels.gdn.triton_gdn`, or None when triton (or the module) cannot be imported here."""
    try:
        from kernels.gdn import triton_gdn
    except ImportError:
        return None
    return triton_gdn
