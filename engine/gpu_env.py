"""Process-wide CUDA library settings the engine needs before its first GPU call (applied on `import engine`).

cuBLAS workspace (`SANA_STREAM_CUBLAS_WORKSPACE=none|library`, default none). With a workspace, cuBLAS runs the
DiT's two widest GEMMs (FFN up-projection and the fused in-projection, 2640 x 2240 -> 13440 / 9000 or 8960
columns at 1280x704) as persistent kernels with a dynamic tile scheduler, whose atomic counters it zeroes with a
memset before every call; inside a CUDA graph each memset costs its own time plus ~4 us of dependency gap before
the GEMM. Without a workspace (CUBLASLT_WORKSPACE_SIZE=0, which torch's cuBLAS and cuBLASLt paths both take)
cuBLAS picks the same tiles with a static scheduler (`..._ssched_...`), no memset, equal results: 212.7 against
220.8 us for the FFN up-projection after an elementwise kernel in a graph (H100,
`loadtest/results/memset_copy_h100.json`). `library` leaves torch's default; a CUBLASLT_WORKSPACE_SIZE the user
set is never overridden.

It has to be set before torch creates its first cuBLAS handle (the size is read once per process), hence on
import of the package rather than where the model is built.

Non-goals: cuDNN (its attention keeps a memset per call; the alternatives are slower, see loadtest/results).
"""

from __future__ import annotations

import os

_CHOICES = ("none", "library")


def cublas_workspace_mode(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    mode = env.get("SANA_STREAM_CUBLAS_WORKSPACE", "none").strip().lower() or "none"
    if mode not in _CHOICES:
        raise ValueError(f"SANA_STREAM_CUBLAS_WORKSPACE must be one of {', '.join(_CHOICES)}, got {mode!r}")
    return mode


def configure(env: dict | None = None) -> None:
    """Apply the settings to `env` (the process environment by default)."""
    env = os.environ if env is None else env
    if cublas_workspace_mode(env) == "none":
        env.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")
