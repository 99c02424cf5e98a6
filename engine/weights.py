"""Locating, reading and loading model checkpoints.

Scope:
    - `resolve`: `hf://owner/repo[@revision][/path]` URIs (through huggingface_hub) and local paths
      -> a local path.
    - `load_state_dict_file`: `.pth` / `.pt` / `.bin` (torch.load, mmap, weights only) and `.safetensors`
      files, or a folder holding one weights file or a sharded safetensors index, normalised to one flat
      `{name: tensor}` dict from the layouts the SANA-Streaming release and its trainers write (reference §8).
    - `load_into`: check keys and shapes against a module built on the meta device, then assign the tensors
      (no copy through a randomly initialised model), cast, move, and re-create non-persistent buffers.
    - `save_checkpoint`, `load_model`: the round trip for tests and training, and the one-call loader.

Non-goals: key renaming between model versions (the release's shape adaptations for x_embedder / fused
qkv / t_conv are not reproduced: released files already have the final shapes), diffusers / transformers
models (they load through their own `from_pretrained`, fed a local folder by `resolve`), optimizer state.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Layout = Literal["flat", "state_dict", "generator"]

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
_WEIGHT_SUFFIXES = PTH_SUFFIXES + SAFETENSORS_SUFFIXES
_STRIP_PREFIXES = ("model.", "module.")
_DROP_KEYS = ("pos_embed",)
_MAX_LISTED = 20


class WeightsNotFoundError(FileNotFoundError):
    """A weights location (local path or hub URI) that does not exist or cannot be reached."""


class HubUnavailableError(WeightsNotFoundError):
    """The hub could not be reached (offline mode or no network) and the file is not in the local cache."""


class CheckpointFormatError(ValueError):
    """A file that is not a checkpoint of a layout this loader understands."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the module; the message lists every offending key."""

    def __init__(
        self,
        module_name: str,
        missing: list[str],
        unexpected: list[str],
        mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mis_shaped = mis_shaped
        head = (
            f"checkpoint does not match {module_name}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mis_shaped)} mis-shaped key(s)"
        )
        lines = [head]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_listing(unexpected)}")
        if mis_shaped:
            shown = [f"{k} expected {tuple(want)} got {tuple(got)}" for k, want, got in mis_shaped[:_MAX_LISTED]]
            more = len(mis_shaped) - len(shown)
            lines.append(
                f"  mis-shaped ({len(mis_shaped)}): " + "; ".join(shown) + (f"; ... and {more} more" if more else "")
            )
        super().__init__("\n".join(lines))


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


# --- locating ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRef:
    """A parsed `hf://` URI."""

    repo_id: str
    """"owner/repo"."""
    path: str | None
    """Path inside the repository; None = the whole repository."""
    revision: str | None = None
    """Branch, tag or commit given as `owner/repo@revision`; None = the default branch."""

    @property
    def is_file(self) -> bool:
        """A path whose last component has a suffix names a file; otherwise a folder (e.g. `.../vae`)."""
        return self.path is not None and "." in self.path.rsplit("/", 1)[-1]


def parse_hf_uri(uri: str) -> HubRef:
    """Split `hf://owner/repo[@revision][/path/in/repo]` into its parts (pure; no network).

    `hf://Efficient-Large-Model/SANA-Streaming/dit/sana_streaming_ar.pth`
        -> repo_id 'Efficient-Large-Model/SANA-Streaming', path 'dit/sana_streaming_ar.pth'.
    `hf://Efficient-Large-Model/gemma-2-2b-it` -> repo_id 'Efficient-Large-Model/gemma-2-2b-it', path None.
    A trailing '/' is ignored; `owner/repo@v1.0/...` sets the revision.
    """
    if not uri.startswith("hf://"):
        raise ValueError(f"not an hf:// URI: {uri!r}")
    parts = uri[len("hf://") :].strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"hf:// URI needs at least owner/repo, got {uri!r}")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"hf:// URI has an empty or relative path component: {uri!r}")
    owner, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if not repo or not revision:
            raise ValueError(f"hf:// URI has an empty repo or revision around '@': {uri!r}")
    path = "/".join(parts[2:]) or None
    return HubRef(repo_id=f"{owner}/{repo}", path=path, revision=revision)


def resolve(
    uri: str | os.PathLike[str],
    *,
    allow_patterns: list[str] | None = None,
    local_files_only: bool | None = None,
) -> pathlib.Path:
    """A weights location -> a local file or folder.

    `hf://owner/repo/path.ext` -> `hf_hub_download` (one file); `hf://owner/repo` -> `snapshot_download`
    (the repository, filtered by `allow_patterns`); `hf://owner/repo/folder` (no suffix) -> the snapshot
    restricted to that folder, returned as `<snapshot>/folder`. Anything else is a local path, returned as is
    if it exists. `local_files_only=None` follows HF_HUB_OFFLINE.
    Raises `WeightsNotFoundError` (`HubUnavailableError` when the hub cannot be reached).
    """
    text = os.fspath(uri)
    if not text.startswith("hf://"):
        path = pathlib.Path(text).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(f"weights not found: {text} (no such file or folder)")
        return path
    ref = parse_hf_uri(text)
    return _download(ref, text, allow_patterns, local_files_only)


def _download(ref: HubRef, uri: str, allow_patterns: list[str] | None, local_files_only: bool | None) -> pathlib.Path:
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import errors as hub_errors

    kwargs: dict[str, Any] = {"revision": ref.revision}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        if ref.is_file:
            assert ref.path is not None
            return pathlib.Path(huggingface_hub.hf_hub_download(ref.repo_id, ref.path, **kwargs))
        if ref.path is not None:
            folder = ref.path.rstrip("/")
            patterns = [f"{folder}/{p}" for p in allow_patterns] if allow_patterns else [f"{folder}/*"]
            root = huggingface_hub.snapshot_download(ref.repo_id, allow_patterns=patterns, **kwargs)
            return pathlib.Path(root) / folder
        return pathlib.Path(huggingface_hub.snapshot_download(ref.repo_id, allow_patterns=allow_patterns, **kwargs))
    except hub_errors.LocalEntryNotFoundError as e:
        raise HubUnavailableError(
            f"cannot fetch {uri}: the Hugging Face Hub is unreachable or offline mode is on "
            "(HF_HUB_OFFLINE / local_files_only) and it is not in the local cache "
            f"({hub_constants.HF_HUB_CACHE}). Download it into that cache on a connected machine, "
            "or pass a local path instead of hf://."
        ) from e
    except hub_errors.GatedRepoError as e:
        raise WeightsNotFoundError(f"cannot fetch {uri}: {ref.repo_id} is gated; log in or set HF_TOKEN") from e
    except hub_errors.RepositoryNotFoundError as e:
        raise WeightsNotFoundError(f"cannot fetch {uri}: repository {ref.repo_id} not found (or private)") from e
    except hub_errors.RevisionNotFoundError as e:
        raise WeightsNotFoundError(f"cannot fetch {uri}: revision {ref.revision} not found") from e
    except hub_errors.EntryNotFoundError as e:
        raise WeightsNotFoundError(f"cannot fetch {uri}: {ref.path} not found in {ref.repo_id}") from e
    except (ConnectionError, OSError) as e:  # network failures and other HTTP errors (HfHubHTTPError)
        raise HubUnavailableError(
            f"cannot fetch {uri}: {type(e).__name__}: {e}. Set HF_HUB_OFFLINE=1 to use the local cache only, "
            "or pass a local path instead of hf://."
        ) from e


# --- reading -------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | os.PathLike[str], *, select: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat `{name: tensor}` dict on the CPU (memory-mapped where the format allows).

    `path`: a `.pth`/`.pt`/`.bin`/`.ckpt` file (torch.load, `mmap=True, weights_only=True`; files in the
    legacy non-zip format load without mmap), a `.safetensors` file, or a folder with one weights file or a
    `*.safetensors.index.json` of shards. `select` picks a top-level entry explicitly (e.g.
    `generator_ema`); otherwise see `normalize_state_dict`.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"weights not found: {path}")
    if path.is_dir():
        return normalize_state_dict(_read_folder(path), select=select)
    return normalize_state_dict(_read_file(path), select=select)


def _read_file(path: pathlib.Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for malformed headers
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e
    if suffix not in PTH_SUFFIXES:
        raise CheckpointFormatError(f"{path}: unknown weights suffix {suffix!r}; expected one of {_WEIGHT_SUFFIXES}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) serialization
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(
            f"{path}: holds objects other than tensors and plain containers, refused by weights_only "
            f"loading; re-save its state dict with torch.save (error: {str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint ({e})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: top level is {type(obj).__name__}, expected a dict")
    return obj


def _read_folder(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        weight_map: dict[str, str] = json.loads(indexes[0].read_text())["weight_map"]
        merged: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            merged.update(_read_file(folder / shard))  # type: ignore[arg-type]
        return merged
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES)
    if len(files) != 1:
        names = ", ".join(p.name for p in files) or "none"
        raise CheckpointFormatError(f"{folder}: expected one weights file or one shard index, found: {names}")
    return dict(_read_file(files[0]))


def normalize_state_dict(obj: Mapping[str, Any], *, select: str | None = None) -> dict[str, torch.Tensor]:
    """The release's layouts -> one flat dict with the model's own key names.

    Picks `obj[select]`, else top-level `generator` (long-training outputs), else `state_dict` (short
    trainer, release files), else `obj` itself. Then, in every layout (the release strips only in the flat
    case), strips a leading `model.` and then a leading `module.` from each key, and drops `pos_embed` (the
    release's unused all-zero buffer). Raises `CheckpointFormatError` on non-tensor values or on keys that
    collide after stripping.
    """
    if select is not None:
        if select not in obj:
            raise CheckpointFormatError(f"checkpoint has no top-level {select!r}; it has {_listing(list(obj))}")
        sd = obj[select]
    elif "generator" in obj:
        sd = obj["generator"]
    elif "state_dict" in obj:
        sd = obj["state_dict"]
    else:
        sd = obj
    if not isinstance(sd, Mapping):
        raise CheckpointFormatError(f"state dict is {type(sd).__name__}, expected a dict of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(f"state dict has non-tensor entries: {_listing([str(k) for k in bad])}")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key
        for prefix in _STRIP_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if name in _DROP_KEYS:
            continue
        if name in out:
            raise CheckpointFormatError(f"keys collide after stripping 'model.'/'module.' prefixes: {name!r}")
        out[name] = value
    return out


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    layout: Layout = "flat",
    prefix: str = "",
) -> pathlib.Path:
    """Write a state dict as `.safetensors` (flat layout only) or torch `.pth`/`.pt`/`.bin`, chosen by suffix.

    `layout`: 'flat' = the dict itself, 'state_dict' = `{"state_dict": sd}`,
    'generator' = `{"generator": sd}`.
    `prefix` is prepended to every key (e.g. 'model.' as the long trainer writes).
    """
    if layout not in ("flat", "state_dict", "generator"):
        raise ValueError(f"unknown layout {layout!r}; expected 'flat', 'state_dict' or 'generator'")
    path = pathlib.Path(path)
    sd = {f"{prefix}{k}": v.detach() for k, v in state_dict.items()}
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in SAFETENSORS_SUFFIXES:
        if layout != "flat":
            raise ValueError(f"safetensors holds a flat dict only; layout {layout!r} needs a .pth file")
        import safetensors.torch

        safetensors.torch.save_file(_unshare(sd), str(path), metadata={"format": "pt"})
    elif suffix in PTH_SUFFIXES:
        obj: dict[str, Any] = sd if layout == "flat" else {layout: sd}
        torch.save(obj, path)
    else:
        raise ValueError(f"unknown weights suffix {suffix!r}; expected one of {_WEIGHT_SUFFIXES}")
    return path


def _unshare(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights, views): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.contiguous().clone() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    return out


# --- loading into a module -----------------------------------------------------------------------------


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Compare keys and shapes with `module.state_dict()` (meta modules too); raise `CheckpointMismatchError`.

    Mis-shaped keys always fail. `strict=True`: missing and unexpected keys fail. `strict=False`: unexpected
    keys are ignored (as the release's `load_state_dict` override does), and missing keys fail only for
    tensors on the meta device (they would have no data).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in state_dict.items()
        if k in expected and tuple(expected[k].shape) != tuple(v.shape)
    ]
    if not strict:
        unexpected = []
        missing = [k for k in missing if expected[k].is_meta]
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(type(module).__name__, missing, unexpected, mis_shaped)


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load `state_dict` into `module` (normally built under `torch.device('meta')`) without a second copy.

    Order: check keys and shapes (`check_state_dict`); move/cast each tensor to `device`/`dtype` (floating
    tensors only; `dtype=None` keeps the checkpoint's dtypes); `load_state_dict(assign=True)`; move what the
    checkpoint did not cover (parameters are cast too, buffers only change device); then call
    `module.init_non_persistent_buffers()` if the module defines it (tables such as RoPE that are not saved;
    it must create them on the parameters' device). Anything still on the meta device after that is an
    error. Returns `module`.
    """
    check_state_dict(module, state_dict, strict=strict)
    expected = module.state_dict()
    target = torch.device(device) if device is not None else None

    def place(t: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else None
        return t.to(device=target, dtype=cast) if (target is not None or cast is not None) else t

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=target) if target is not None else t

    sd = {k: place(v) for k, v in state_dict.items() if k in expected}
    module.load_state_dict(sd, strict=False, assign=True)
    _place_leftovers(module, loaded=set(sd), place_param=place, place_buffer=move)
    init = getattr(module, "init_non_persistent_buffers", None)
    if callable(init):
        init()
    still_meta = [n for n, t in _named_tensors(module) if t.is_meta]
    if still_meta:
        raise RuntimeError(
            f"{type(module).__name__}: still on the meta device after loading: {_listing(still_meta)}. "
            "Tensors outside the state dict must be re-created by an init_non_persistent_buffers() method."
        )
    return module


def _named_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _place_leftovers(
    module: nn.Module,
    loaded: set[str],
    place_param: Callable[[torch.Tensor], torch.Tensor],
    place_buffer: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Move what the state dict did not provide: parameters (strict=False gaps) are also cast like the
    checkpoint; buffers (non-persistent tables such as RoPE frequencies) only change device."""
    for mod_name, sub in module.named_modules():
        stem = f"{mod_name}." if mod_name else ""
        for name, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta and f"{stem}{name}" not in loaded:
                sub._parameters[name] = nn.Parameter(place_param(p.data), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and not b.is_meta and f"{stem}{name}" not in loaded:
                sub._buffers[name] = place_buffer(b)


def load_model(
    build: Callable[[], nn.Module],
    uri: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    select: str | None = None,
) -> nn.Module:
    """Build on the meta device, resolve `uri`, read, check and assign; returns the module in eval mode.

    Example:
        load_model(lambda: SanaStreamingDiT(cfg.dit), cfg.dit_weights, device="cuda", dtype=torch.bfloat16)
    """
    with torch.device("meta"):
        module = build()
    path = resolve(uri)
    state_dict = load_state_dict_file(path, select=select)
    return load_into(module, state_dict, strict=strict, dtype=dtype, device=device).eval()
