"""The process-wide CUDA library settings applied on `import engine` (engine/gpu_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import gpu_env


def test_default_runs_cublas_without_workspace():
    env: dict[str, str] = {}
    gpu_env.configure(env)
    assert env == {"CUBLASLT_WORKSPACE_SIZE": "0"}


def test_library_mode_and_user_setting_are_left_alone():
    env = {"SANA_STREAM_CUBLAS_WORKSPACE": "Library"}
    gpu_env.configure(env)
    assert "CUBLASLT_WORKSPACE_SIZE" not in env
    env = {"CUBLASLT_WORKSPACE_SIZE": "4096"}
    gpu_env.configure(env)
    assert env["CUBLASLT_WORKSPACE_SIZE"] == "4096"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="SANA_STREAM_CUBLAS_WORKSPACE must be one of none, library, got 'zero'"):
        gpu_env.configure({"SANA_STREAM_CUBLAS_WORKSPACE": "zero"})


def test_importing_the_engine_sets_it_before_torch_uses_cublas():
    env = {k: v for k, v in os.environ.items() if k not in ("CUBLASLT_WORKSPACE_SIZE", "SANA_STREAM_CUBLAS_WORKSPACE")}
    code = "import engine, os; print(os.environ.get('CUBLASLT_WORKSPACE_SIZE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
