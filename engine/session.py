"""Per-session state of a streaming edit, and its snapshot format.

A `SessionState` holds everything one session owns: the DiT cache (GDN states, softmax K/V window, FFN
temporal context), the VAE encoder's causal cache and pending input frames, the VAE decoder's context, the latents
waiting for a full chunk, the cursor and the settings. Tensor shapes are declared by the layers that own them
(`GDNAttention.state_shapes`, `SoftmaxAttention.kv_shapes`, the VAE's state dicts); this module only stores,
measures and serialises them.

Snapshot format (`snapshot() -> bytes`): the magic line b"SANASNAP\\n" followed by a safetensors blob whose
metadata entry "sana_stream" is JSON of {format_version, config_hash, settings, cursor, DiT cache layout}.
Tensors are stored raw, so `restore(snapshot())` is bit-exact, bf16 included. A snapshot from another
model configuration (config hash) or another format version is refused with `SnapshotMismatchError`; a damaged
blob with `SnapshotError`.

Non-goals: where snapshots live (services/), running the models (engine/pipeline.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from engine.model.cache import DiTCache

SNAPSHOT_MAGIC = b"SANASNAP\n"
SNAPSHOT_VERSION = 1


class SnapshotError(ValueError):
    """The bytes are not a readable session snapshot."""


class SnapshotMismatchError(SnapshotError):
    """The snapshot is valid but belongs to another model configuration or format version."""


@dataclass
class SessionSettings:
    """What a client chose when it opened the session (all but the prompt fixed for the session's life)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 4
    flow_shift: float = 8.0
    cfg_scale: float = 1.0
    num_cached_blocks: int = 2
    sink_token: bool = True
    efficient_cache: bool = False
    height: int = 704
    width: int = 1280
    fps: float = 16.0
    total_frames: int | None = None
    """Pixel frames of the whole input when known (files, batch jobs): the first chunk then takes
    3 + (T mod 3) latent frames like the release. None (live streams): first chunk 3, the last one shorter."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1.0, got {self.cfg_scale}")
        if self.total_frames is not None and self.total_frames < 1:
            raise ValueError(f"total_frames must be >= 1, got {self.total_frames}")


@dataclass
class Cursor:
    """Where the session is in its stream."""

    frames_in: int = 0
    """Pixel frames received."""
    latents_encoded: int = 0
    """Source latent frames produced by the VAE encoder."""
    latents_generated: int = 0
    """Edited latent frames produced by the DiT (= frames of all finished chunks)."""
    frames_out: int = 0
    """Edited pixel frames emitted."""
    prompt_version: int = 0
    """Bumped at every prompt change (takes effect from the next chunk)."""


@dataclass
class SessionState:
    """Everything one streaming session owns. Tensors live on the session's device."""

    config_hash: str
    settings: SessionSettings
    dit: DiTCache
    cursor: Cursor = field(default_factory=Cursor)
    vae_encoder: dict[str, Tensor] = field(default_factory=dict)
    """Causal conv caches of the VAE encoder (owned by engine.vae)."""
    vae_decoder: dict[str, Tensor] = field(default_factory=dict)
    """Decoder context: pending latents and blended frames (owned by engine.vae)."""
    buffers: dict[str, Tensor] = field(default_factory=dict)
    """Inputs waiting for a full step: "frames" (pixel frames before a full encode step), "source" (latents
    before a full chunk), "edited" (edited latents not yet decoded)."""
    text: dict[str, Tensor] = field(default_factory=dict)
    """Prompt embeddings in use: "embeds", "mask" (and "neg_embeds", "neg_mask" with CFG)."""
    derived: dict[str, object] = field(default_factory=dict, repr=False, compare=False)
    """Values computed from the state and kept for the next chunks, never serialised (a restored session
    recomputes them): the DiT's text keys/values for `text` (`engine.step.ChunkRunner`)."""

    # --- size -------------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the session under a stable, prefixed name."""
        out = {f"dit.{k}": v for k, v in self.dit.tensors().items()}
        for prefix, part in (("vae_enc", self.vae_encoder), ("vae_dec", self.vae_decoder),
                             ("buf", self.buffers), ("text", self.text)):  # fmt: skip
            out.update({f"{prefix}.{k}": v for k, v in part.items()})
        return out

    def nbytes(self) -> dict[str, int]:
        """Bytes per part and in total (GPU memory the session holds)."""
        sizes: dict[str, int] = {}
        for name, t in self.tensors().items():
            part = name.split(".", 1)[0]
            sizes[part] = sizes.get(part, 0) + t.numel() * t.element_size()
        sizes["total"] = sum(sizes.values())
        return sizes

    # --- snapshots ----------------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Serialise the whole session; restore() gives it back bit for bit."""
        header = {
            "format_version": SNAPSHOT_VERSION,
            "config_hash": self.config_hash,
            "settings": dataclasses.asdict(self.settings),
            "cursor": dataclasses.asdict(self.cursor),
            "dit": {
                "softmax_layers": list(self.dit.softmax_layers),
                "num_cached_blocks": self.dit.num_cached_blocks,
                "sink_token": self.dit.sink_token,
                "chunk_frames": self.dit.chunk_frames,
            },
        }
        # One metadata entry: safetensors keeps metadata in a hash map, so several keys would not keep their order
        # and equal sessions would not give equal bytes.
        meta = {"sana_stream": json.dumps(header, sort_keys=True)}
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(self.tensors().items())}
        return SNAPSHOT_MAGIC + st_save(tensors, metadata=meta)

    @classmethod
    def restore(cls, blob: bytes, config_hash: str, device: torch.device | str = "cpu") -> SessionState:
        """Rebuild a session from `snapshot()` bytes; refuses another configuration's snapshot."""
        if not blob.startswith(SNAPSHOT_MAGIC):
            raise SnapshotError("not a sana-stream session snapshot (bad magic)")
        try:
            tensors = st_load(blob[len(SNAPSHOT_MAGIC) :])
            session = json.loads(_read_metadata(blob[len(SNAPSHOT_MAGIC) :])["sana_stream"])
            version = int(session["format_version"])
        except Exception as e:  # safetensors raises several types for damaged input
            raise SnapshotError(f"damaged session snapshot: {e}") from None
        if version != SNAPSHOT_VERSION:
            raise SnapshotMismatchError(
                f"snapshot format version {version} is not supported (this build reads {SNAPSHOT_VERSION})"
            )
        if session["config_hash"] != config_hash:
            raise SnapshotMismatchError(
                f"snapshot is for model configuration {session['config_hash']}, this engine runs {config_hash}"
            )
        d = session["dit"]
        dit = DiTCache(tuple(d["softmax_layers"]), d["num_cached_blocks"], d["sink_token"], list(d["chunk_frames"]))
        parts: dict[str, dict[str, Tensor]] = {"dit": {}, "vae_enc": {}, "vae_dec": {}, "buf": {}, "text": {}}
        for name, t in tensors.items():
            prefix, rest = name.split(".", 1)
            parts[prefix][rest] = t.to(device)
        dit.load_tensors(parts["dit"])
        return cls(
            config_hash=config_hash,
            settings=SessionSettings(**session["settings"]),
            dit=dit,
            cursor=Cursor(**session["cursor"]),
            vae_encoder=parts["vae_enc"],
            vae_decoder=parts["vae_dec"],
            buffers=parts["buf"],
            text=parts["text"],
        )


def _read_metadata(blob: bytes) -> dict[str, Any]:
    """The __metadata__ of a safetensors blob (8-byte little-endian header length, then JSON)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n])["__metadata__"]
