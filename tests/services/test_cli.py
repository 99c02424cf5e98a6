"""`sana-stream serve`, `stream` and `demo` as a user runs them: real processes, real gRPC, Ctrl-C stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.services.conftest import free_port


def test_serve_then_stream_a_clip(tmp_path):
    from engine.testclips import write_clip
    from engine.video_io import read_video

    clip = write_clip(tmp_path / "in.mp4", 25, 128, 192, seed=3)
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local"}
    serve = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--grpc-port", str(port)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        for line in serve.stdout:
            if "serving videoedit.v1.EditService" in line:
                break
            assert time.monotonic() < deadline and serve.poll() is None, "serve did not come up"
        out = tmp_path / "out.mp4"
        r = subprocess.run([sys.executable, "-m", "services.cli", "stream", "--server", f"127.0.0.1:{port}",
                            "--video_path", str(clip), "--prompt", "make the red circle blue", "--output", str(out)],
                           capture_output=True, text=True, timeout=240)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert "FPS delivered" in r.stdout
        assert len(read_video(out, 128, 192).frames) == 25
        bad = subprocess.run([sys.executable, "-m", "services.cli", "stream", "--server", f"127.0.0.1:{port}",
                              "--video_path", str(clip), "--prompt", "word " * 100, "--output", str(out)],
                             capture_output=True, text=True, timeout=240)  # fmt: skip
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
    assert serve.returncode == 0


def test_demo_runs_the_whole_stack_in_one_command(tmp_path):
    """`sana-stream demo` (the README's main command): generated clip in, streamed through the service, edited mp4
    out with every frame, stack stopped (exit 0). The edit itself equals `sana-stream edit` (test_cluster)."""
    from engine.video_io import read_video

    env = {**os.environ, "RAY_ADDRESS": "local"}
    cmd = [sys.executable, "-m", "services.cli", "demo", "--out", str(tmp_path), "--clip-frames", "17",
           "--replicas", "bidirectional=0"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "FPS delivered" in r.stdout and "stack up on" in r.stdout
    assert len(read_video(tmp_path / "demo_input.mp4", 128, 192).frames) == 17
    assert len(read_video(tmp_path / "demo_streamed.mp4", 128, 192).frames) == 17
