"""Fixtures for the services tests: a real redis-server, one Ray instance with the whole app (2 replicas per
stateful stage, tracing to in-memory exporters) for the test session, and engine references computed in-process.

Every stage replica runs torch with 1 intra-op thread; the references here do too, because CPU kernels reduce
in a thread-count-dependent order and we compare bit for bit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
H, W = 128, 192
MAX_MESSAGE = 3 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.DEVNULL)  # fmt: skip
    import redis

    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def cluster(redis_url):
    """The application on a local Ray instance: returns (address, gateway handle)."""
    import ray
    from ray import serve

    from services.app import AppConfig, run
    from services.stage import EngineSpec

    port = free_port()
    # OTEL_TRACES_EXPORTER=memory: every replica keeps its finished spans (test_tracing.py reads them)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OTEL_TRACES_EXPORTER": "memory"}})  # fmt: skip
    cfg = AppConfig(
        grpc_port=port,
        redis_url=redis_url,
        replicas={"ingest": 2, "generator": 2, "egress": 2},
        checkpoint_every=1,
        max_message_bytes=MAX_MESSAGE,
        idle_timeout_s=2.0,
        reap_interval_s=3600.0,
        engine=EngineSpec(preset="tiny", torch_threads=1),
    )
    handle = run(cfg)
    from services.client import EditClient

    with EditClient(f"127.0.0.1:{port}") as c:
        c.wait_ready(120)
    yield f"127.0.0.1:{port}", handle
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(cluster):
    from services.client import EditClient

    with EditClient(cluster[0]) as c:
        yield c


@pytest.fixture(scope="session")
def editor():
    from engine.pipeline import Engine, StreamingEditor

    return StreamingEditor(Engine.load("tiny", seed=0))


def h264_stream(frames, **options) -> bytes:
    """uint8 (n, h, w, 3) RGB frames -> an H.264 Annex-B byte stream (libx264, low latency; options added)."""
    import av

    enc = av.CodecContext.create("libx264", "w")
    enc.height, enc.width, enc.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
    enc.options = {"preset": "ultrafast", "tune": "zerolatency", **options}
    data = bytearray()
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24")
        vf.pts = i
        for p in enc.encode(vf):
            data += bytes(p)
    for p in enc.encode(None):
        data += bytes(p)
    return bytes(data)


def reference(editor, frames, prompt, *, seed=0, cut=24, prompts=None, total=True) -> np.ndarray:
    """The engine called directly, fed the same requests as the client sends (1 torch thread)."""
    from engine.session import SessionSettings

    prompts = prompts or {}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = SessionSettings(prompt=prompt, seed=seed, height=H, width=W, total_frames=len(frames) if total else None)
        state = editor.open(s)
        outs = []
        for seq, i in enumerate(range(0, len(frames), cut)):
            if seq in prompts:
                editor.set_prompt(state, prompts[seq])
            outs.append(editor.push(state, frames[i : i + cut]))
        outs.append(editor.finish(state))
        return np.concatenate(outs)
    finally:
        torch.set_num_threads(old)
