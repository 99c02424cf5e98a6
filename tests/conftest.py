"""Shared test fixtures: paths to the vendored reference data and small builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
REFERENCE = ROOT / "tests" / "reference"

torch.set_num_threads(2)


def golden_dit_config(variant: str):
    """DiTConfig of golden fixture A (streaming) or B (bidirectional), read from its config JSON."""
    from engine.config import DiTConfig

    kw = json.loads((GOLDEN / f"config_{variant}.json").read_text())["constructor_kwargs"]
    return DiTConfig(
        hidden_size=kw["hidden_size"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        head_dim=kw["linear_head_dim"],
        in_channels=kw["in_channels"],
        source_channels=kw["additional_inchannels"],
        caption_channels=kw["caption_channels"],
        text_len=kw["model_max_length"],
        mlp_ratio=kw["mlp_ratio"],
        softmax_ratio=kw["softmax_ratio"],
        streaming=kw["attn_type"] == "V2VStateCachedBiGDNAttention",
    )


@pytest.fixture(scope="session")
def golden_model():
    """Build and load the golden model A or B (float32, eval)."""
    from safetensors.torch import load_file

    from engine.model.hybrid_dit import SanaStreamingDiT

    cache: dict[str, SanaStreamingDiT] = {}

    def get(variant: str) -> SanaStreamingDiT:
        if variant not in cache:
            model = SanaStreamingDiT(golden_dit_config(variant)).eval()
            model.load_state_dict(load_file(GOLDEN / f"weights_{variant}.safetensors"), strict=True)
            cache[variant] = model
        return cache[variant]

    return get
