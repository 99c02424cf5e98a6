"""The wire: generated protobuf modules, and conversions between messages and engine objects.

Scope: `pb` / `pb_grpc` (videoedit.v1), SessionOpen -> SessionSettings, RGB24 bytes <-> uint8 arrays (zero-copy
views), torch latents <-> `LatentChunk`, a stage's `SessionState` <-> `SessionSnapshot` (versioned, hashed).
Non-goals: transport (gateway.py), policy (what a tenant may ask for).

The generated code lives in proto/videoedit/v1/ (DESIGN.md) but is imported as `videoedit.v1`: a top-level
package named `proto` already exists in most environments (proto-plus, pulled in by google-api-core via
ray[serve]), so `proto/` is deliberately not a Python package. An installed sana-stream (wheel or `pip install
-e .`) ships it as the top-level package `videoedit` (pyproject.toml maps `videoedit` to proto/videoedit); in a
source checkout, proto/ goes first on sys.path here (only when it is this repository's folder).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
if (PROTO_ROOT / "videoedit" / "v1" / "edit.proto").is_file() and str(PROTO_ROOT) not in sys.path:
    sys.path.insert(0, str(PROTO_ROOT))  # a source checkout wins (in site-packages `proto` is proto-plus: skipped)

from videoedit.v1 import edit_pb2 as pb  # noqa: E402
from videoedit.v1 import edit_pb2_grpc as pb_grpc  # noqa: E402

from engine.session import SNAPSHOT_VERSION, SessionSettings, SessionState, SnapshotError  # noqa: E402

WIRE_VERSION = 1
"""`SessionSnapshot.format_version` this build writes and reads."""

STAGES = ("ingest", "generator", "egress")
"""The stateful stages, in pipeline order."""

MODES = {pb.EDIT_MODE_UNSPECIFIED: "long_streaming", pb.EDIT_MODE_LONG_STREAMING: "long_streaming",
         pb.EDIT_MODE_BIDIRECTIONAL_SHORT: "bidirectional_short"}  # fmt: skip

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WireError(ValueError):
    """A message does not fit the wire format (sizes, versions, hashes); the text says what was expected."""


# --- session settings ------------------------------------------------------------------------------------------


def settings_from_open(msg: pb.SessionOpen, defaults) -> SessionSettings:
    """SessionOpen -> SessionSettings; zero / unset fields take the preset's (`defaults`: a PresetConfig)."""
    kw = {
        "prompt": msg.prompt,
        "negative_prompt": msg.negative_prompt,
        "seed": int(msg.seed),
        "steps": int(msg.steps) or int(defaults.steps),
        "flow_shift": float(defaults.flow_shift),
        "cfg_scale": float(msg.cfg_scale) or 1.0,
        "num_cached_blocks": int(msg.num_cached_blocks) or 2,
        "sink_token": msg.sink_token if msg.HasField("sink_token") else True,
        "height": int(msg.height) or int(defaults.height),
        "width": int(msg.width) or int(defaults.width),
        "fps": float(msg.fps) or float(defaults.fps),
        "total_frames": int(msg.total_frames) if msg.HasField("total_frames") else None,
    }
    return SessionSettings(**kw)


def bidirectional_settings_from_open(msg: pb.SessionOpen, defaults) -> SessionSettings:
    """SessionOpen of a bidirectional_short session -> SessionSettings, with the defaults of
    `sana-stream edit --mode bidirectional_short` (50 steps, CFG 6, the release's negative prompt, the prompt
    suffix " motion score: N." with N = motion_score, 10 when unset); `defaults`: the bidirectional preset."""
    import dataclasses

    from engine.cli import MODE_DEFAULTS
    from engine.sampler import DEFAULT_NEGATIVE_PROMPT, bidirectional_prompt

    md = MODE_DEFAULTS["bidirectional_short"]
    s = settings_from_open(msg, defaults)
    motion = int(msg.motion_score) if msg.HasField("motion_score") else 10
    return dataclasses.replace(
        s,
        prompt=bidirectional_prompt(msg.prompt, motion) if msg.prompt.strip() else "",
        negative_prompt=msg.negative_prompt if msg.HasField("negative_prompt") else DEFAULT_NEGATIVE_PROMPT,
        steps=int(msg.steps) or int(md["step"]),
        cfg_scale=float(msg.cfg_scale) or float(md["cfg_scale"]),
    )


def settings_to_dict(s: SessionSettings) -> dict:
    import dataclasses

    return dataclasses.asdict(s)


# --- frames ------------------------------------------------------------------------------------------------------


def rgb24_to_frames(data: bytes, count: int, height: int, width: int) -> np.ndarray:
    """RGB24 bytes -> read-only uint8 view (count, height, width, 3); WireError when the sizes disagree."""
    frame_bytes = height * width * 3
    if count <= 0:
        raise WireError(f"frames request has count={count}; expected >= 1 frame of {width}x{height} RGB24")
    if len(data) != count * frame_bytes:
        got = len(data) / frame_bytes
        raise WireError(
            f"frames request holds {len(data)} bytes for count={count}: the session is {width}x{height} RGB24, "
            f"{frame_bytes} bytes per frame, so {count * frame_bytes} bytes were expected "
            f"({got:.3g} frames of this size came)"
        )
    return np.frombuffer(data, np.uint8).reshape(count, height, width, 3)


def frames_to_rgb24(frames: np.ndarray) -> bytes:
    return np.ascontiguousarray(frames, dtype=np.uint8).tobytes()


# --- latents -----------------------------------------------------------------------------------------------------


def latents_to_proto(latents: torch.Tensor, session_id: str, first_latent: int, seq: int = 0, final: bool = False):
    """(B, C, T, h, w) tensor -> LatentChunk (raw little-endian bytes, bf16 kept as its 16-bit pattern)."""
    t = latents.detach().to("cpu").contiguous()
    name = next((k for k, v in _DTYPES.items() if v == t.dtype), None)
    if name is None:
        raise WireError(f"latents of dtype {t.dtype} cannot travel; expected one of {', '.join(_DTYPES)}")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return pb.LatentChunk(session_id=session_id, first_latent=first_latent, shape=list(t.shape), dtype=name,
                          data=raw.numpy().tobytes(), final=final, seq=seq)  # fmt: skip


def latents_from_proto(msg: pb.LatentChunk) -> torch.Tensor:
    if msg.dtype not in _DTYPES:
        raise WireError(f"LatentChunk dtype {msg.dtype!r}; expected one of {', '.join(_DTYPES)}")
    dtype = _DTYPES[msg.dtype]
    shape = tuple(msg.shape)
    n = int(np.prod(shape)) if shape else 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != n * itemsize:
        raise WireError(f"LatentChunk of shape {shape} {msg.dtype} needs {n * itemsize} bytes, got {len(msg.data)}")
    if dtype == torch.bfloat16:
        arr = np.frombuffer(msg.data, np.int16).reshape(shape)
        return torch.from_numpy(arr.copy()).view(torch.bfloat16)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
    return torch.from_numpy(np.frombuffer(msg.data, np_dtype).reshape(shape).copy())


# --- snapshots ---------------------------------------------------------------------------------------------------


def wrap_snapshot(
    state: SessionState, session_id: str, stage: str, extra: dict | None = None, codec_state: bytes = b""
) -> bytes:
    """A stage's SessionState -> serialized SessionSnapshot (the engine's bytes plus who/what/where)."""
    if stage not in STAGES:
        raise WireError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    blob = state.snapshot()
    msg = pb.SessionSnapshot(
        format_version=WIRE_VERSION,
        session_id=session_id,
        stage=stage,
        config_hash=state.config_hash,
        engine_format_version=SNAPSHOT_VERSION,
        engine_state=blob,
        sha256=hashlib.sha256(blob).digest(),
        latents_generated=state.cursor.latents_generated,
        frames_in=state.cursor.frames_in,
        created_unix=time.time(),
        extra=json.dumps(extra or {}, sort_keys=True).encode(),
        codec_state=codec_state,
    )
    return msg.SerializeToString()


def unwrap_snapshot(data: bytes, stage: str | None = None) -> pb.SessionSnapshot:
    """Parse and check a SessionSnapshot (version, stage, integrity); the engine checks the config hash."""
    msg = pb.SessionSnapshot()
    try:
        msg.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError
        raise SnapshotError(f"not a SessionSnapshot message: {e}") from None
    if msg.format_version != WIRE_VERSION:
        raise SnapshotError(f"SessionSnapshot format_version {msg.format_version}; this build reads {WIRE_VERSION}")
    if stage is not None and msg.stage != stage:
        raise SnapshotError(f"snapshot is of stage {msg.stage!r}, expected {stage!r}")
    if hashlib.sha256(msg.engine_state).digest() != msg.sha256:
        raise SnapshotError("SessionSnapshot engine_state does not match its sha256 (damaged)")
    return msg


__all__ = [
    "MODES",
    "STAGES",
    "bidirectional_settings_from_open",
    "WIRE_VERSION",
    "WireError",
    "frames_to_rgb24",
    "latents_from_proto",
    "latents_to_proto",
    "pb",
    "pb_grpc",
    "rgb24_to_frames",
    "settings_from_open",
    "unwrap_snapshot",
    "wrap_snapshot",
]
