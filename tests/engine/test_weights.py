"""engine.weights: hf:// parsing, checkpoint layouts, key/shape checks, meta-device loading."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from engine import weights as W


class TinyNet(nn.Module):
    """Parameters, a persistent buffer, and a non-persistent table re-created by the loading hook."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(2)])
        self.t_conv = nn.Conv1d(8, 8, 3, bias=False)
        self.register_buffer("y_embedding", torch.randn(3, 8))
        self.register_buffer("table", torch.empty(5, 4), persistent=False)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        self.table = torch.arange(20.0, device=self.embed.weight.device).reshape(5, 4)


def _source(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def _assert_same(module: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == reference.keys()
    for k, v in reference.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# --- hf:// parsing and resolving ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "repo_id", "path", "revision", "is_file"),
    [
        (
            "hf://Efficient-Large-Model/SANA-Streaming/dit/sana_streaming_ar.pth",
            "Efficient-Large-Model/SANA-Streaming",
            "dit/sana_streaming_ar.pth",
            None,
            True,
        ),
        (
            "hf://Efficient-Large-Model/gemma-2-2b-it",
            "Efficient-Large-Model/gemma-2-2b-it",
            None,
            None,
            False,
        ),
        (
            "hf://Efficient-Large-Model/gemma-2-2b-it/",
            "Efficient-Large-Model/gemma-2-2b-it",
            None,
            None,
            False,
        ),
        ("hf://Lightricks/LTX-2/vae", "Lightricks/LTX-2", "vae", None, False),
        ("hf://owner/repo@v1.2/a/b/model.safetensors", "owner/repo", "a/b/model.safetensors", "v1.2", True),
    ],
)
def test_parse_hf_uri(uri: str, repo_id: str, path: str | None, revision: str | None, is_file: bool) -> None:
    ref = W.parse_hf_uri(uri)
    assert (ref.repo_id, ref.path, ref.revision, ref.is_file) == (repo_id, path, revision, is_file)


@pytest.mark.parametrize("uri", ["hf://", "hf://owner", "hf://owner//x.pth", "hf://o/r/../x.pth", "s3://a/b"])
def test_parse_hf_uri_rejects(uri: str) -> None:
    with pytest.raises(ValueError):
        W.parse_hf_uri(uri)


def test_resolve_local_and_missing(tmp_path) -> None:
    f = tmp_path / "w.pth"
    f.write_bytes(b"")
    assert W.resolve(str(f)) == f
    with pytest.raises(W.WeightsNotFoundError, match="missing.pth"):
        W.resolve(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError):  # WeightsNotFoundError is a FileNotFoundError
        W.load_state_dict_file(tmp_path / "missing.safetensors")
    with pytest.raises(W.WeightsNotFoundError):
        W.load_model(TinyNet, tmp_path / "missing.pth")


def test_resolve_hub_offline_message() -> None:
    with pytest.raises(W.HubUnavailableError, match="HF_HUB_OFFLINE") as info:
        W.resolve("hf://sana-stream-test/no-such-repo/dit/x.pth", local_files_only=True)
    assert "local path" in str(info.value)
    with pytest.raises(W.WeightsNotFoundError):
        W.resolve("hf://sana-stream-test/no-such-repo", local_files_only=True)


# --- layouts ----------------------------------------------------------------------------------------------

_PREFIXES = ["", "model.", "module.", "model.module."]


@pytest.mark.parametrize("pos_embed", [False, True])
@pytest.mark.parametrize("prefix", _PREFIXES)
@pytest.mark.parametrize(
    ("suffix", "layout"),
    [(".pth", "flat"), (".pth", "state_dict"), (".pt", "generator"), (".safetensors", "flat")],
)
def test_layouts_load_bit_exactly(tmp_path, suffix: str, layout: str, prefix: str, pos_embed: bool) -> None:
    reference = _source().state_dict()
    state = dict(reference)
    if pos_embed:
        state["pos_embed"] = torch.zeros(1, 4, 8)
    path = W.save_checkpoint(state, tmp_path / f"ckpt{suffix}", layout=layout, prefix=prefix)  # type: ignore[arg-type]
    loaded = W.load_model(TinyNet, path)
    _assert_same(loaded, reference)
    assert torch.equal(loaded.table, torch.arange(20.0).reshape(5, 4))
    assert not any(t.is_meta for t in itertools.chain(loaded.parameters(), loaded.buffers()))
    assert not loaded.training


def test_training_output_layout(tmp_path) -> None:
    reference = _source().state_dict()
    other = _source(1).state_dict()
    trainer_output = {
        "generator": {f"model.{k}": v for k, v in reference.items()},
        "generator_ema": {f"model.{k}": v for k, v in other.items()},
        "critic": {"model.x": torch.zeros(1)},
        "step": 5000,
    }
    path = tmp_path / "model.pt"
    torch.save(trainer_output, path)
    _assert_same(W.load_model(TinyNet, path), reference)
    _assert_same(W.load_model(TinyNet, path, select="generator_ema"), other)
    with pytest.raises(W.CheckpointFormatError, match="no top-level 'nope'"):
        W.load_state_dict_file(path, select="nope")


def test_legacy_pth_and_folders(tmp_path) -> None:
    reference = _source().state_dict()
    legacy = tmp_path / "legacy.pth"
    torch.save(reference, legacy, _use_new_zipfile_serialization=False)  # mmap unsupported -> plain load
    _assert_same(W.load_model(TinyNet, legacy), reference)
    # a folder with exactly one weights file
    single = tmp_path / "single"
    W.save_checkpoint(reference, single / "model.safetensors")
    _assert_same(W.load_model(TinyNet, single), reference)
    # a sharded safetensors folder
    sharded = tmp_path / "sharded"
    keys = sorted(reference)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{i:05d}.safetensors"
        W.save_checkpoint({k: reference[k] for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same(W.load_model(TinyNet, sharded), reference)


def test_dtype_and_device(tmp_path) -> None:
    reference = _source().state_dict()
    path = W.save_checkpoint(reference, tmp_path / "w.safetensors")
    loaded = W.load_model(TinyNet, path, dtype=torch.bfloat16, device="cpu")
    _assert_same(loaded, {k: v.to(torch.bfloat16) for k, v in reference.items()})
    assert loaded.table.dtype == torch.float32  # the hook decides its own tables


# --- mismatches -------------------------------------------------------------------------------------------


def _meta_net() -> TinyNet:
    with torch.device("meta"):
        return TinyNet()


def test_wrong_shape_names_key_and_shapes() -> None:
    state = dict(_source().state_dict())
    state["t_conv.weight"] = torch.zeros(8, 8, 1)
    with pytest.raises(W.CheckpointMismatchError, match=r"t_conv\.weight expected \(8, 8, 3\) got \(8, 8, 1\)"):
        W.load_into(_meta_net(), state)
    with pytest.raises(W.CheckpointMismatchError):  # shapes are checked even when not strict
        W.load_into(_meta_net(), state, strict=False)


def test_missing_and_unexpected_keys_are_named() -> None:
    state = dict(_source().state_dict())
    del state["blocks.1.1.bias"]
    state["extra.weight"] = torch.zeros(2)
    with pytest.raises(W.CheckpointMismatchError) as info:
        W.load_into(_meta_net(), state)
    msg = str(info.value)
    assert "missing (1): blocks.1.1.bias" in msg and "unexpected (1): extra.weight" in msg
    assert info.value.missing == ["blocks.1.1.bias"] and info.value.unexpected == ["extra.weight"]
    # strict=False ignores unexpected keys (like the release) but a meta tensor without data still fails
    with pytest.raises(W.CheckpointMismatchError, match="missing"):
        W.load_into(_meta_net(), state, strict=False)
    state["blocks.1.1.bias"] = torch.zeros(8)
    W.load_into(_meta_net(), state, strict=False)


def test_long_key_lists_are_truncated() -> None:
    with torch.device("meta"):
        big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(100)])
    with pytest.raises(W.CheckpointMismatchError) as info:
        W.load_into(big, {})
    msg = str(info.value)
    assert "200 missing" in msg and "... and 180 more" in msg and len(msg) < 2000


def test_meta_leftovers_without_hook_fail() -> None:
    class NoHook(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("rope", torch.ones(3), persistent=False)

    with torch.device("meta"):
        m = NoHook()
    with pytest.raises(RuntimeError, match="rope"):
        W.load_into(m, {"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2)})


def test_normalize_errors(tmp_path) -> None:
    with pytest.raises(W.CheckpointFormatError, match="collide"):
        W.normalize_state_dict({"model.a": torch.zeros(1), "a": torch.zeros(1)})
    with pytest.raises(W.CheckpointFormatError, match="non-tensor"):
        W.normalize_state_dict({"a": torch.zeros(1), "step": 3})
    with pytest.raises(ValueError, match="flat"):
        W.save_checkpoint({"a": torch.zeros(1)}, tmp_path / "x.safetensors", layout="generator")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(W.CheckpointFormatError):
        W.load_state_dict_file(bad)


# --- the real tiny DiT, once engine/model/hybrid_dit.py exists --------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "layout", "prefix"),
    [
        (".pth", "flat", "module."),
        (".pth", "state_dict", ""),
        (".pth", "generator", "model."),
        (".safetensors", "flat", ""),
    ],
)
def test_tiny_dit_round_trip(tmp_path, suffix: str, layout: str, prefix: str) -> None:
    hybrid_dit = pytest.importorskip("engine.model.hybrid_dit")
    from engine.config import get_preset

    cfg = get_preset("tiny").dit
    torch.manual_seed(0)
    source = hybrid_dit.SanaStreamingDiT(cfg)
    reference = source.state_dict()
    state = dict(reference)
    state["pos_embed"] = torch.zeros(1, 4, cfg.hidden_size)
    path = W.save_checkpoint(state, tmp_path / f"dit{suffix}", layout=layout, prefix=prefix)  # type: ignore[arg-type]
    loaded = W.load_model(lambda: hybrid_dit.SanaStreamingDiT(cfg), path)
    _assert_same(loaded, reference)
    assert not any(t.is_meta for t in itertools.chain(loaded.parameters(), loaded.buffers()))
    for (name, a), (_, b) in zip(source.named_buffers(), loaded.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_resolve_hf_calls_the_hub(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    calls = []

    def fake_file(repo_id: str, filename: str, **kwargs) -> str:
        calls.append(("file", repo_id, filename, kwargs))
        return str(tmp_path / filename)

    def fake_snapshot(repo_id: str, **kwargs) -> str:
        calls.append(("snapshot", repo_id, kwargs.get("allow_patterns"), kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert W.resolve("hf://Efficient-Large-Model/SANA-Streaming/dit/sana_streaming_ar.pth") == (
        tmp_path / "dit/sana_streaming_ar.pth"
    )
    assert calls[-1][:3] == ("file", "Efficient-Large-Model/SANA-Streaming", "dit/sana_streaming_ar.pth")
    assert W.resolve("hf://Efficient-Large-Model/gemma-2-2b-it") == tmp_path
    assert calls[-1][:3] == ("snapshot", "Efficient-Large-Model/gemma-2-2b-it", None)
    assert W.resolve("hf://Lightricks/LTX-2@main/vae") == tmp_path / "vae"
    assert calls[-1][:3] == ("snapshot", "Lightricks/LTX-2", ["vae/*"])
    assert calls[-1][3]["revision"] == "main"
