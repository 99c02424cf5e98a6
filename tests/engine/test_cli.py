"""The `sana-stream` command line, run as a user would: a subprocess, real files, exit codes, stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.testclips import write_clip
from engine.video_io import read_video
from tests.conftest import REFERENCE


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "in.mp4", 41, 160, 224, seed=2)


def test_edit_tiny_writes_mp4(clip_path, tmp_path):
    r = cli("edit", "--preset", "tiny", "--prompt", "make the red circle blue", "--video_path", str(clip_path),
            "--output_dir", str(tmp_path), "--output_name", "out.mp4", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = read_video(tmp_path / "out.mp4", 128, 192)
    assert out.frames.shape == (41, 128, 192, 3)  # the 160x224 source was center-cropped/resized to 128x192
    assert "wrote" in r.stdout


def test_edit_bidirectional_tiny(clip_path, tmp_path):
    args = ["--mode", "bidirectional_short", "--preset", "tiny", "--prompt", "grayscale", "--step", "2"]
    args += ["--num_frames", "17", "--video_path", str(clip_path), "--output_dir", str(tmp_path), "--no-progress"]
    r = cli("edit", *args)
    assert r.returncode == 0, r.stderr
    assert read_video(tmp_path / "output.mp4", 128, 192).frames.shape[0] == 17


@pytest.mark.parametrize(
    "make_input,message",
    [
        (lambda p: p.write_text("this is not a video"), "not a video"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (None, "no such file"),
    ],
)
def test_edit_bad_input_is_one_line_error(tmp_path, make_input, message):
    src = tmp_path / "bad.mp4"
    if make_input:
        make_input(src)
    r = cli("edit", "--preset", "tiny", "--prompt", "x", "--video_path", str(src), "--output_dir", str(tmp_path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sana-stream: error:"), r.stderr
    assert message in lines[0].lower() or message in lines[0]


def test_edit_frame_smaller_than_crop(tmp_path):
    small = write_clip(tmp_path / "small.mp4", 9, 64, 96)
    r = cli("edit", "--preset", "tiny", "--prompt", "x", "--video_path", str(small), "--output_dir", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "smaller" in r.stderr


def test_edit_missing_weights_names_the_path(clip_path, tmp_path):
    r = cli("edit", "--preset", "tiny", "--prompt", "x", "--video_path", str(clip_path), "--output_dir",
            str(tmp_path), "--model_path", str(tmp_path / "nope.pth"))  # fmt: skip
    assert r.returncode == 2 and "nope.pth" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "output.mp4").exists()


def test_model_info_keys_equal_release_tsv():
    r = cli("model-info", "--preset", "sana-streaming-2b-bidirectional", "--keys")
    assert r.returncode == 0
    expected = sorted(
        line for line in (REFERENCE / "sana_streaming_2b_bidirectional_keys.tsv").read_text().splitlines()
        if not line.startswith("#")
    )  # fmt: skip
    assert sorted(r.stdout.splitlines()) == expected


def test_model_info_summary():
    r = cli("model-info", "--preset", "sana-streaming-2b-ar")
    assert r.returncode == 0
    assert "2,259,529,648" in r.stdout and "15 GDN, 5 softmax at [3, 7, 11, 15, 19]" in r.stdout


def test_unknown_preset_is_an_error():
    r = cli("model-info", "--preset", "nope")
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr


def test_bench_quick_on_cpu_writes_stable_fields(tmp_path):
    out = tmp_path / "bench.json"
    r = cli("bench", "--preset", "tiny", "--chunks", "1", "--quick", "--json", str(out))
    assert r.returncode == 0, r.stderr
    import json

    data = json.loads(out.read_text())
    for field in ("dit_ms_per_forward", "dit_fps", "vae_encode_fps", "vae_decode_fps", "e2e_fps", "snapshot_bytes"):
        assert data[field] > 0, field
    assert data["session_state_bytes"]["total"] == sum(
        v for k, v in data["session_state_bytes"].items() if k != "total"
    )
    assert data["e2e_frames_emitted"] > 0
    # The run's settings travel with its figures: here the cuBLAS workspace that `import engine` turned off.
    assert data["env"].get("CUBLASLT_WORKSPACE_SIZE") == os.environ.get("CUBLASLT_WORKSPACE_SIZE", "0")
