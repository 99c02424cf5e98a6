"""engine.text on the tiny preset: chi prefix, BOS + last L-1 window, padding, limits, cache, saving."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import weights as weights_io
from engine.config import get_preset
from engine.text import (
    CHI_PROMPT,
    TINY_VOCAB_SIZE,
    PromptTooLongError,
    TextEncoder,
    build_tiny_tokenizer,
)

# Typed from reference/SANA_STREAMING.md §6, "Chi prompt": the 5 config lines; the last ends with one space.
REFERENCE_CHI_LINES = [
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:',  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
]

CFG = get_preset("tiny").text
L = CFG.text_len
PROMPTS = ["  a red fox in the snow, watercolor  ", "turn the scene into a neon night city"]


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return TextEncoder(CFG)


def _direct(enc: TextEncoder, ids: list[int]) -> torch.Tensor:
    """The decoder's last hidden state for one unpadded sequence: (T, hidden)."""
    with torch.no_grad():
        return enc.model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]


def test_chi_prompt_is_byte_exact() -> None:
    expected = "\n".join(REFERENCE_CHI_LINES)
    assert expected == CHI_PROMPT
    assert expected.encode("utf-8") == CHI_PROMPT.encode("utf-8")
    assert CHI_PROMPT.endswith("User Prompt: ") and not CHI_PROMPT.endswith("\n")
    assert CHI_PROMPT.count("\n") == 4


def test_tiny_tokenizer_behaves_like_gemma() -> None:
    tok = build_tiny_tokenizer()
    assert len(tok) == TINY_VOCAB_SIZE <= CFG.gemma_kwargs["vocab_size"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("hello world").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    # The chi prefix's trailing space fuses with the first prompt character, as "▁word" does in Gemma.
    n_chi = len(tok(CHI_PROMPT).input_ids)
    assert len(tok(CHI_PROMPT + "a").input_ids) == n_chi
    text = "naïve café ☕ \t tabs"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in tok(text).input_ids


def test_max_length_formula(enc: TextEncoder) -> None:
    n_chi = len(enc.tokenizer.encode(CHI_PROMPT))
    assert enc.prefix_len == n_chi
    assert enc.max_length == n_chi + L - 2
    assert enc.keep_index.tolist() == [0, *range(enc.max_length - (L - 1), enc.max_length)]


def test_window_is_bos_plus_prompt_tokens_padded_right(enc: TextEncoder) -> None:
    tok = enc.tokenizer
    prompt = PROMPTS[0]
    ids, mask = enc.tokenize([prompt])
    assert ids.shape == mask.shape == (1, enc.max_length)
    # Whole sequence: chi + stripped prompt, then right padding with pad id 0 and mask 0.
    full = tok(CHI_PROMPT + prompt.strip()).input_ids
    n = len(full)
    assert ids[0, :n].tolist() == full and mask[0, :n].eq(1).all()
    assert ids[0, n:].eq(tok.pad_token_id).all() and mask[0, n:].eq(0).all()
    # Kept window, computed from the pieces: BOS, then the prompt tokenised alone with its leading space.
    piece = tok(" " + prompt.strip(), add_special_tokens=False).input_ids
    pad = L - 1 - len(piece)
    assert ids[0, enc.keep_index].tolist() == [tok.bos_token_id, *piece, *[tok.pad_token_id] * pad]
    assert mask[0, enc.keep_index].tolist() == [1] * (1 + len(piece)) + [0] * pad


def test_embeddings_are_bos_and_window_rows(enc: TextEncoder) -> None:
    tok = enc.tokenizer
    embeds, mask = enc.encode([PROMPTS[0]])
    assert embeds.shape == (1, L, CFG.hidden_size) and embeds.dtype == torch.float32
    assert mask.shape == (1, L) and mask.dtype == torch.int64
    full = tok(CHI_PROMPT + PROMPTS[0].strip()).input_ids
    hidden = _direct(enc, full)  # (T, H), no padding at all
    n_prompt = len(full) - (enc.prefix_len - 1)
    expected = torch.cat([hidden[:1], hidden[enc.prefix_len - 1 :]])  # BOS + the prompt's rows
    torch.testing.assert_close(embeds[0, : 1 + n_prompt], expected, atol=1e-5, rtol=1e-5)
    # Causal decoder: the BOS row depends on BOS alone.
    torch.testing.assert_close(embeds[0, 0], _direct(enc, [tok.bos_token_id])[0], atol=1e-5, rtol=1e-5)
    assert mask[0].tolist() == [1] * (1 + n_prompt) + [0] * (L - 1 - n_prompt)


def test_batch_rows_match_single_prompts(enc: TextEncoder) -> None:
    enc.clear_cache()
    embeds, mask = enc.encode(PROMPTS)
    assert embeds.shape == (2, L, CFG.hidden_size)
    assert mask[0].sum() != mask[1].sum()
    for i, p in enumerate(PROMPTS):
        enc.clear_cache()
        e1, m1 = enc.encode([p])
        torch.testing.assert_close(embeds[i], e1[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(mask[i], m1[0])
        # mask is 1...1 0...0 (right padding)
        assert torch.equal(m1[0], torch.sort(m1[0], descending=True).values)


def test_encode_plain_keeps_first_L(enc: TextEncoder) -> None:
    tok = enc.tokenizer
    neg = "blurry, low quality, distorted "  # not stripped
    ids, mask = enc.tokenize([neg], plain=True)
    expected = tok(neg).input_ids
    assert ids.shape == (1, L)
    assert ids[0].tolist() == expected + [tok.pad_token_id] * (L - len(expected))
    embeds, emask = enc.encode_plain([neg])
    assert embeds.shape == (1, L, CFG.hidden_size)
    assert emask[0].tolist() == [1] * len(expected) + [0] * (L - len(expected))
    torch.testing.assert_close(embeds[0, : len(expected)], _direct(enc, expected), atol=1e-5, rtol=1e-5)
    null, null_mask = enc.null_embedding()
    assert null.shape == (1, L, CFG.hidden_size) and null_mask[0].tolist() == [1] + [0] * (L - 1)
    assert torch.equal(null, enc.encode_plain([""])[0])


def test_deterministic_and_rng_neutral(enc: TextEncoder) -> None:
    state = torch.random.get_rng_state()
    other = TextEncoder(CFG)
    assert torch.equal(state, torch.random.get_rng_state())
    enc.clear_cache()
    assert torch.equal(enc.encode(PROMPTS)[0], other.encode(PROMPTS)[0])
    assert torch.equal(enc.encode_plain(PROMPTS)[0], other.encode_plain(PROMPTS)[0])
    reseeded = TextEncoder(CFG, seed=1)
    assert not torch.allclose(enc.encode(PROMPTS)[0], reseeded.encode(PROMPTS)[0])


def test_prompt_too_long(enc: TextEncoder) -> None:
    tok = enc.tokenizer
    # "x" * n: " x" fuses into one token, then n - 1 single "x" tokens: n tokens after the prefix.
    assert enc.count_tokens("x" * (L - 1)) == (L - 1, L - 1)
    enc.encode(["x" * (L - 1)])
    with pytest.raises(PromptTooLongError, match=rf"has {L} tokens; the limit is {L - 1}") as info:
        enc.encode(["fine", "x" * L])
    assert (info.value.n_tokens, info.value.limit, info.value.index) == (L, L - 1, 1)
    assert isinstance(info.value, ValueError)
    # truncate=True: the reference behaviour, the prompt keeps its head and loses its tail.
    long_prompt = "a" * (L - 1) + "zzzz"
    ids, _ = enc.tokenize([long_prompt], truncate=True)
    window = ids[0, enc.keep_index].tolist()
    assert window == [tok.bos_token_id, *tok(" " + long_prompt, add_special_tokens=False).input_ids[: L - 1]]
    assert tok.convert_tokens_to_ids("z") not in window
    embeds, mask = enc.encode([long_prompt], truncate=True)
    assert mask.eq(1).all()
    with pytest.raises(PromptTooLongError):  # a cached truncated entry still refuses without truncate
        enc.encode([long_prompt])
    # plain prompts: L tokens including BOS.
    enc.encode_plain(["x" * (L - 1)])
    with pytest.raises(PromptTooLongError, match=rf"has {L + 1} tokens; the limit is {L}"):
        enc.encode_plain(["x" * L])


def test_cache_returns_identical_tensors() -> None:
    enc = TextEncoder(CFG, cache_size=2)
    e1, m1 = enc.encode([PROMPTS[0]])
    info = enc.cache_info()
    assert (info["misses"], info["hits"], info["size"]) == (1, 0, 1)
    e1_copy = e1.clone()
    e1 += 1.0  # callers get copies: mutating them leaves the cache intact
    e2, m2 = enc.encode([PROMPTS[0]])
    assert enc.cache_info()["hits"] == 1
    assert torch.equal(e2, e1_copy) and torch.equal(m2, m1)
    assert enc.prompt_key(PROMPTS[0]) == enc.prompt_key(PROMPTS[0].strip())
    assert enc.prompt_key("x") != enc.prompt_key("x", plain=True)
    # LRU: capacity 2, the least recently used prompt goes first.
    enc.encode(["b"])
    enc.encode([PROMPTS[0]])
    enc.encode(["c"])  # evicts "b"
    before = enc.cache_info()["misses"]
    enc.encode([PROMPTS[0]])
    assert enc.cache_info()["misses"] == before
    enc.encode(["b"])
    assert enc.cache_info()["misses"] == before + 1 and enc.cache_info()["size"] == 2
    # duplicates in one batch are computed once
    enc.clear_cache()
    e, _ = enc.encode(["dup", "dup"])
    assert torch.equal(e[0], e[1]) and enc.cache_info()["size"] == 1


def test_save_load_round_trip(enc: TextEncoder, tmp_path) -> None:
    folder = enc.save_pretrained(tmp_path / "tiny_text")
    loaded = TextEncoder(CFG, weights=str(folder), seed=7)  # the seed must not matter with weights
    assert loaded.model.config._attn_implementation == "eager"
    enc.clear_cache()
    for a, b in zip(enc.encode(PROMPTS), loaded.encode(PROMPTS), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(enc.null_embedding()[0], loaded.null_embedding()[0])
    assert torch.equal(enc.tokenize(PROMPTS)[0], loaded.tokenize(PROMPTS)[0])


def test_single_file_weights(enc: TextEncoder, tmp_path) -> None:
    # As a causal-LM checkpoint would hold them: "model."-prefixed keys plus a head that the encoder drops.
    state = dict(enc.model.state_dict())
    state["lm_head.weight"] = state["embed_tokens.weight"]
    path = weights_io.save_checkpoint(state, tmp_path / "text.pth", prefix="model.")
    loaded = TextEncoder(CFG, weights=path, seed=3)
    enc.clear_cache()
    assert torch.equal(enc.encode(PROMPTS)[0], loaded.encode(PROMPTS)[0])


def test_config_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="hf://"):
        TextEncoder(get_preset("sana-streaming-2b-ar").text)
    with pytest.raises(weights_io.WeightsNotFoundError):
        TextEncoder(CFG, weights=tmp_path / "missing")
    with pytest.raises(ValueError, match="hidden_size"):
        TextEncoder(dataclasses.replace(CFG, hidden_size=32))
    with pytest.raises(TypeError):
        TextEncoder(CFG).encode("not a list")  # type: ignore[arg-type]


def test_transformers_folder_and_hf_uri_route(enc: TextEncoder, tmp_path, monkeypatch) -> None:
    """Real-weights route (no gemma_kwargs): a ForCausalLM folder via AutoModel, hf:// through the hub."""
    import huggingface_hub
    from transformers import Gemma2ForCausalLM

    lm = Gemma2ForCausalLM(enc.model.config)
    lm.model.load_state_dict(enc.model.state_dict())
    folder = tmp_path / "gemma_like"
    lm.save_pretrained(folder)
    enc.tokenizer.save_pretrained(folder)
    real_like = dataclasses.replace(CFG, gemma_kwargs={})
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = TextEncoder(real_like, weights="hf://Efficient-Large-Model/gemma-2-2b-it")
    assert calls and calls[0][0] == "Efficient-Large-Model/gemma-2-2b-it"
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    assert type(loaded.model).__name__ == "Gemma2Model"
    enc.clear_cache()
    assert torch.equal(enc.encode(PROMPTS)[0], loaded.encode(PROMPTS)[0])
    assert torch.equal(enc.encode_plain(PROMPTS)[0], loaded.encode_plain(PROMPTS)[0])


def test_prompt_too_long_error_pickles():
    """Crosses process boundaries (Ray replicas) intact, so the gateway can map it to a status code."""
    import pickle

    err = pickle.loads(pickle.dumps(PromptTooLongError(400, 299, plain=False, index=1)))
    assert isinstance(err, PromptTooLongError)
    assert (err.n_tokens, err.limit, err.plain, err.index) == (400, 299, False, 1)
    assert "400 tokens" in str(err)
