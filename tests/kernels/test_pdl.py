"""Programmatic dependent launch (kernels/pdl.py): when it is on, and that every kernel waits before it reads.

The launch itself needs a GPU (timed there, loadtest/results/README.md); what a CPU can check is the switch, that
each of the project's Triton kernels issues the wait as its first statement (a kernel launched early that read or
wrote memory before it would race with the kernel before it), and that the wait is in the compiled sm_90 code.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

pytest.importorskip("triton")

from kernels import pdl  # noqa: E402

KERNEL_MODULES = (
    "kernels.fused.triton_block",
    "kernels.fused.triton_fused",
    "kernels.fused.triton_norm",
    "kernels.gdn.triton_kernels",
)


def test_off_by_default_and_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("SANA_STREAM_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert pdl.pdl_options() == {}
    monkeypatch.setenv("SANA_STREAM_PDL", "1")
    assert pdl.pdl_options() == {"GDC": True, "launch_pdl": True}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.pdl_options() == {}


def test_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv("SANA_STREAM_PDL", "yes")
    with pytest.raises(ValueError, match="SANA_STREAM_PDL must be 0 or 1, got 'yes'"):
        pdl.pdl_options()


def _kernels():
    import importlib

    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") and attr.endswith("_kernel") and hasattr(obj, "fn"):
                yield f"{name}.{attr}", obj.fn


def test_every_kernel_waits_first():
    found = list(_kernels())
    assert len(found) == 14  # the launch sites pass pdl_options(); a new kernel must be added here and there
    for name, fn in found:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        func = tree.body[0]
        params = [a.arg for a in func.args.args]
        assert params[-1] == "GDC" and isinstance(func.args.defaults[-1], ast.Constant), name
        body = func.body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # docstring
            body = body[1:]
        first = body[0]
        assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call), name
        assert ast.unparse(first.value) == "wait_previous(GDC)", name


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.fused.triton_block import _gated_residual_kernel as k

for gdc in (False, True):
    const = dict(ROWS=8, BLOCK_C=512, R_O=1, INTERP=False, GDC=gdc)
    ptrs = ("x_ptr", "g_ptr", "d_ptr", "o_ptr")
    sig = {a: "constexpr" if a in const else "*bf16" if a in ptrs else "i32" for a in k.arg_names}
    src = ASTSource(k, sig, const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    print(gdc, "griddepcontrol.wait" in ptx)
"""


def test_the_wait_is_in_the_sm90_code():
    """Offline compile (no GPU): the PTX has griddepcontrol.wait exactly when GDC is set."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0 and "ptxas" in run.stderr:
        pytest.skip(f"no ptxas for an offline sm_90 compile: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "False", "True", "True"]
