"""Set-up shared by the kernel tests that run Triton kernels on CPU tensors through Triton's interpreter.

The interpreter works only if TRITON_INTERPRET=1 was set before triton was first imported. In a full test run
another module may have imported it already (diffusers -> torch._dynamo -> triton): then a test module's tests
skip here (`in_process`) and its `fresh_process` test re-runs the module in a new interpreter. Import this module
before anything that imports triton, then call `require_interpreter()`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT

PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")

in_process = pytest.mark.skipif(PREIMPORTED, reason="triton was imported before TRITON_INTERPRET was set")
fresh_process = pytest.mark.skipif(not PREIMPORTED, reason="runs only when the module's tests cannot run here")


def require_interpreter() -> None:
    """Skip the calling module where triton is missing or the interpreter could not be switched on."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these tests drive the kernels through TRITON_INTERPRET=1", allow_module_level=True)


def run_in_fresh_process(test_file: str) -> None:
    """Run a test module in a new interpreter with TRITON_INTERPRET=1 set before triton loads; assert it passes."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


@contextlib.contextmanager
def poisoned(monkeypatch, *modules) -> Iterator[None]:
    """Every buffer the modules' launchers allocate (through their `_empty`) starts as NaN, so an element a kernel
    fails to write shows up; the interpreter's exp(-u) overflow warnings are expected and silenced."""

    import torch

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in modules:
        monkeypatch.setattr(module, "_empty", nan_empty)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        yield
