"""The wire format: generated code is fresh, conversions round-trip, snapshots are versioned and checked."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from services.wire import (
    PROTO_ROOT,
    WireError,
    latents_from_proto,
    latents_to_proto,
    pb,
    rgb24_to_frames,
    unwrap_snapshot,
    wrap_snapshot,
)


def test_generated_code_is_fresh(tmp_path):
    """`make proto` output must equal what is committed (regenerate with `make proto` when this fails)."""
    src = tmp_path / "proto"
    shutil.copytree(PROTO_ROOT, src, ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__"))
    protos = sorted(str(p.relative_to(src)) for p in src.rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(src), f"--python_out={src}",
                    f"--grpc_python_out={src}", *protos], check=True, cwd=src)  # fmt: skip
    generated = sorted(p.relative_to(src) for p in src.rglob("*_pb2*.py"))
    committed = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*_pb2*.py"))
    assert generated == committed
    stale = [str(p) for p in generated if not filecmp.cmp(src / p, PROTO_ROOT / p, shallow=False)]
    assert not stale, f"stale generated code (run `make proto`): {stale}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_latent_chunk_round_trip(dtype):
    t = torch.randn(1, 16, 3, 4, 6).to(dtype)
    msg = pb.LatentChunk.FromString(latents_to_proto(t, "s", 5, seq=2).SerializeToString())
    back = latents_from_proto(msg)
    assert (
        back.dtype == dtype and torch.equal(back, t) and msg.first_latent == 5 and list(msg.shape) == [1, 16, 3, 4, 6]
    )
    msg.data = msg.data[:-2]
    with pytest.raises(WireError, match="needs"):
        latents_from_proto(msg)


def test_rgb24_sizes_are_checked():
    data = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).tobytes()
    assert rgb24_to_frames(data, 2, 4, 6).shape == (2, 4, 6, 3)
    with pytest.raises(WireError, match="6x4 RGB24"):
        rgb24_to_frames(data, 3, 4, 6)


def test_snapshot_message_is_versioned_and_checked():
    from engine.pipeline import Engine, StreamingEditor
    from engine.session import SessionSettings, SnapshotError

    editor = StreamingEditor(Engine.load("tiny", seed=0))
    state = editor.open_part(SessionSettings(prompt="p", height=128, width=192), "decoder")
    blob = wrap_snapshot(state, "sid", "egress", {"h264": True})
    msg = unwrap_snapshot(blob, "egress")
    assert msg.session_id == "sid" and msg.config_hash == editor.config_hash
    assert editor.restore(msg.engine_state).snapshot() == state.snapshot()
    with pytest.raises(SnapshotError, match="stage"):
        unwrap_snapshot(blob, "generator")
    bad = pb.SessionSnapshot.FromString(blob)
    bad.engine_state = bad.engine_state[:-1] + b"x"
    with pytest.raises(SnapshotError, match="sha256"):
        unwrap_snapshot(bad.SerializeToString())
    bad = pb.SessionSnapshot.FromString(blob)
    bad.format_version = 99
    with pytest.raises(SnapshotError, match="format_version 99"):
        unwrap_snapshot(bad.SerializeToString())
