"""A non-editable install carries the generated wire code: the wheel holds `videoedit.v1`, and `services.wire`
imports it from there (no source checkout on the path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_generated_proto_code(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    for name in ("engine", "kernels", "services", "loadtest", "proto"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "w"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(wheels)], check=True, cwd=tmp_path, timeout=120)  # fmt: skip
    (whl,) = wheels.glob("sana_stream-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        for mod in ("videoedit/__init__.py", "videoedit/v1/__init__.py", "videoedit/v1/edit_pb2.py",
                    "videoedit/v1/edit_pb2_grpc.py", "videoedit/v1/edit.proto"):  # fmt: skip
            assert mod in names, mod
            if mod.endswith("_pb2.py"):
                assert z.read(mod) == (ROOT / "proto" / mod).read_bytes()  # the checked-in (fresh) code
        assert not any(n.startswith("proto/") for n in names)  # `proto` is proto-plus's name
        site = tmp_path / "site"
        z.extractall(site)
    # import from the unpacked wheel alone: services.wire must find videoedit there, not via proto/
    code = ("import services.wire as w, videoedit.v1.edit_pb2 as pb; "
            "print(w.__file__); print(pb.__file__); print(w.pb.SessionOpen.DESCRIPTOR.full_name)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    wire, where, name = r.stdout.split()
    assert Path(wire).is_relative_to(site) and Path(where).is_relative_to(site), r.stdout
    assert name == "videoedit.v1.SessionOpen"
