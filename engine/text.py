"""Text encoder: prompts -> gemma-2-2b-it last hidden states, exactly as SANA-Streaming conditions its DiT.

Scope (reference §6):
    - `TextEncoder.encode`: user prompts with the "chi" system prefix. The tokenizer sees CHI_PROMPT + the
      stripped prompt, padded right and truncated to `max_length = len(tok.encode(CHI_PROMPT)) + L - 2`;
      the output keeps position 0 (BOS) and the last L - 1 positions, which start exactly at the first
      prompt token because the prefix's trailing space merges into it. Output = the decoder's last hidden
      state after the final RMSNorm, float32.
    - `TextEncoder.encode_plain`: negative / unconditional prompts: no prefix, max_length L, all L kept.
    - An LRU cache keyed by prompt hash (sessions share prompts), and `PromptTooLongError` for prompts that
      would lose tokens to truncation (the reference silently drops the prompt's tail; `truncate=True`
      does the same).
    - Real weights: a transformers Gemma-2 folder (tokenizer beside it) or `hf://owner/repo`. Tiny presets
      (`TextConfig.gemma_kwargs`): a small Gemma-2 built in code (seeded random init unless weights are
      given) and an offline byte-level tokenizer that mimics Gemma's BOS and space handling;
      `save_pretrained` writes both so a trained tiny encoder can ship as a folder.

Attention implementation: Gemma-2 runs with `attn_implementation="eager"`, pinned explicitly. Gemma-2 was
trained with attention-logit soft-capping (`cap * tanh(logits / cap)`, cap 50); transformers applies it
only in the eager path (and flash-attn / flex), while SDPA silently drops it. The release passes no
implementation with transformers 4.57.1 pinned; transformers has defaulted Gemma-2 to eager since 4.45
(huggingface/transformers PR 32865, because of the soft-capping) and the installed 5.x refuses SDPA for
Gemma-2 outright, so eager is both the trained behaviour and the most likely reference behaviour (not
verified against 4.57.1 itself). The cost is negligible: eager materialises (B, 8, T, T) scores for
T ~ 400 tokens once per new prompt. Pinning it keeps a transformers upgrade from silently changing the
embeddings.

Precision: the model runs in `dtype` (bf16 on accelerators, like the release) without autocast; outputs are
cast to float32 (the release's prepared encoder returns fp32 as well; the DiT casts back to bf16).

Non-goals: prompt enhancement / generation with the LM head, other text encoders, tokenizer training.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pathlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine import weights as weights_io
from engine.config import TextConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHI_PROMPT_LINES: tuple[str, ...] = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable '
    "for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
"""The release's `text_encoder.chi_prompt` lines (inference yamls), verbatim; the last ends with a space."""

CHI_PROMPT: str = "\n".join(CHI_PROMPT_LINES)
"""The prefix put before every user prompt: the 5 lines joined by one newline, no trailing newline."""

GEMMA_ATTN_IMPLEMENTATION = "eager"
"""See the module docstring: the only transformers path that applies Gemma-2's attention soft-capping."""

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
_HUB_PATTERNS_BIN = ["*.json", "*.bin", "*.model", "*.txt"]

# Tiny tokenizer: Gemma's special ids, byte-level pieces, and "space + printable ASCII" merges so that, like
# Gemma's "▁word" pieces, the CHI prefix's trailing space fuses with the first prompt character.
TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")
"""Ids 0..3, the same ids gemma-2-2b-it uses for pad / eos / bos / unk."""
TINY_VOCAB_SIZE = len(TINY_SPECIAL_TOKENS) + 256 + (0x7F - 0x21)
"""4 specials + 256 bytes + 94 merged "space + printable ASCII" pieces = 354."""


class PromptTooLongError(ValueError):
    """A prompt with more tokens than the DiT's text window holds (it would be truncated)."""

    def __init__(self, n_tokens: int, limit: int, *, plain: bool, index: int = 0) -> None:
        self.n_tokens = n_tokens
        self.limit = limit
        self.index = index
        self.plain = plain
        what = "prompt" if plain else "prompt (after the system prefix)"
        super().__init__(
            f"{what} #{index} has {n_tokens} tokens; the limit is {limit}. Shorten it, or pass truncate=True "
            f"to keep its first {limit} tokens and drop the rest as the reference does."
        )

    def __reduce__(self):  # picklable across processes (Ray), despite the keyword-only argument
        return _prompt_too_long, (self.n_tokens, self.limit, self.plain, self.index)


def _prompt_too_long(n_tokens: int, limit: int, plain: bool, index: int) -> PromptTooLongError:
    return PromptTooLongError(n_tokens, limit, plain=plain, index=index)


# --- the tiny offline tokenizer and model ---------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """For each byte 0..255, the printable character the ByteLevel pre-tokenizer writes for it.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68 are assigned U+0100.. in byte
    order (so the space 0x20 becomes 'Ġ', U+0120).
    """
    visible = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out: list[str] = []
    extra = 0
    for b in range(256):
        if b in visible:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + extra))
            extra += 1
    return out


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A Gemma-like tokenizer built fully offline: BOS prepended, no EOS, pad id 0, right padding.

    Vocabulary (354): the 4 specials at Gemma's ids, one piece per byte (id 4 + byte), then one merged piece
    per "space + printable ASCII character". Every string is encodable (no unknown tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet()), "byte symbol table out of sync"
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    for s in symbols:
        vocab[s] = len(vocab)
    space = symbols[0x20]
    merges = [(space, symbols[b]) for b in range(0x21, 0x7F)]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == TINY_VOCAB_SIZE
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    bos_id = vocab["<bos>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        add_bos_token=True,
        add_eos_token=False,
    )


def build_tiny_gemma(cfg: TextConfig, *, seed: int = 0) -> nn.Module:
    """A `Gemma2Model` (decoder only) from `cfg.gemma_kwargs`, randomly initialised from `seed`.

    The global RNG is left untouched (the init runs under `torch.random.fork_rng`).
    """
    from transformers import Gemma2Config, Gemma2Model

    if not cfg.gemma_kwargs:
        raise ValueError("TextConfig.gemma_kwargs is empty: only tiny presets build a Gemma-2 in code")
    config = Gemma2Config(**cfg.gemma_kwargs, attn_implementation=GEMMA_ATTN_IMPLEMENTATION)
    if config.hidden_size != cfg.hidden_size:
        raise ValueError(f"gemma_kwargs hidden_size {config.hidden_size} != TextConfig.hidden_size {cfg.hidden_size}")
    if config.vocab_size < TINY_VOCAB_SIZE:
        raise ValueError(f"gemma_kwargs vocab_size {config.vocab_size} < the tiny tokenizer's {TINY_VOCAB_SIZE}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2Model(config)
    return model.eval()


# --- loading ------------------------------------------------------------------------------------------------


def _load_components(
    cfg: TextConfig, weights: str | os.PathLike[str] | None, dtype: torch.dtype, seed: int
) -> tuple[PreTrainedTokenizerBase, nn.Module]:
    tiny = bool(cfg.gemma_kwargs)
    if weights is None:
        if not tiny:
            raise ValueError(
                "the gemma-2-2b-it text encoder needs weights: hf://Efficient-Large-Model/gemma-2-2b-it or a "
                "local transformers folder (model + tokenizer)"
            )
        model = build_tiny_gemma(cfg, seed=seed)
        # Cast parameters only: buffers (inv_freq, embed_scale) stay fp32, as from_pretrained leaves them.
        for param in model.parameters():
            param.data = param.data.to(dtype)
        return build_tiny_tokenizer(), model
    path = weights_io.resolve(weights, allow_patterns=_HUB_PATTERNS)
    if os.fspath(weights).startswith("hf://") and path.is_dir() and not any(path.glob("*.safetensors")):
        path = weights_io.resolve(weights, allow_patterns=_HUB_PATTERNS_BIN)  # repo without safetensors
    if path.is_file():
        if not tiny:
            raise ValueError(f"{weights}: a single weights file needs a tiny preset; Gemma-2 loads from a folder")
        model = build_tiny_gemma(cfg, seed=seed)
        state = {k: v for k, v in weights_io.load_state_dict_file(path).items() if not k.startswith("lm_head.")}
        weights_io.load_into(model, state, dtype=dtype)
        return build_tiny_tokenizer(), model
    from transformers import AutoModel, AutoTokenizer

    has_tokenizer = any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model"))
    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif tiny:
        tokenizer = build_tiny_tokenizer()
    else:
        raise weights_io.WeightsNotFoundError(f"{path}: no tokenizer.json / tokenizer.model beside the model")
    # AutoModel gives the bare decoder (Gemma2Model) for decoder-only and ForCausalLM checkpoints alike: the
    # same module and weights as the release's AutoModelForCausalLM(...).get_decoder(), minus the LM head.
    model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=GEMMA_ATTN_IMPLEMENTATION)
    return tokenizer, model


@dataclass(frozen=True)
class _Entry:
    embeds: torch.Tensor  # (L, hidden) float32
    mask: torch.Tensor  # (L,) int64
    n_tokens: int
    """Tokens counted against `limit`, before any truncation."""
    limit: int


class TextEncoder:
    """Prompt -> (embeddings (B, L, hidden) float32, mask (B, L) int64) for the DiT's cross-attention.

    Args:
        cfg: text_len L, hidden size, whether to use the chi prefix, tiny-model kwargs.
        weights: None (tiny presets: random init from `seed`), `hf://owner/repo`, a local transformers folder
            (model + tokenizer, e.g. written by `save_pretrained`), or for tiny presets a single weights file.
        device, dtype: where and in what precision the Gemma-2 decoder runs (outputs are float32).
        cache_size: prompts kept in the LRU cache (about 2.8 MB each at the real size).
        seed: random-init seed for tiny presets without weights.
    """

    def __init__(
        self,
        cfg: TextConfig,
        weights: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        cache_size: int = 32,
        seed: int = 0,
    ) -> None:
        if cfg.text_len < 2:
            raise ValueError(f"text_len must be >= 2 (BOS + one token), got {cfg.text_len}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        tokenizer, model = _load_components(cfg, weights, dtype, seed)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._check_components()
        L = cfg.text_len
        self.prefix_len = len(self.tokenizer(CHI_PROMPT).input_ids)
        """Tokens of the chi prefix alone, BOS included."""
        self.max_length = self.prefix_len + L - 2 if cfg.use_chi_prompt else L
        """Padded/truncated length of a chi-prefixed prompt (reference: len(tok.encode(chi)) + L - 2)."""
        self.keep_index = torch.tensor([0, *range(self.max_length - (L - 1), self.max_length)])
        """(L,) positions kept from a chi-prefixed sequence: BOS + the last L - 1."""
        limit = self.model.config.max_position_embeddings
        if self.max_length > limit:
            raise ValueError(f"max_length {self.max_length} exceeds the model's {limit} positions")
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def _check_components(self) -> None:
        config = self.model.config
        if config.hidden_size != self.cfg.hidden_size:
            raise ValueError(
                f"text encoder hidden size {config.hidden_size} != TextConfig.hidden_size {self.cfg.hidden_size}"
            )
        if config._attn_implementation != GEMMA_ATTN_IMPLEMENTATION:
            raise RuntimeError(f"Gemma-2 attention is {config._attn_implementation!r}, expected eager")
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens, model vocab {config.vocab_size}")
        ids = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        if bos is None or ids[0] != bos or ids[-1] == self.tokenizer.eos_token_id:
            raise ValueError(f"tokenizer must prepend BOS and append no EOS like Gemma's; 'a' -> {ids}")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token")

    # --- tokenization ------------------------------------------------------------------------------------

    def prompt_key(self, prompt: str, *, plain: bool = False) -> str:
        """Stable hash of what gets encoded (sha256 hex): the cache key and the session's embedding key."""
        text, kind = self._text(prompt, plain)
        return hashlib.sha256(f"{kind}\x00{text}".encode()).hexdigest()

    def _text(self, prompt: str, plain: bool) -> tuple[str, str]:
        if plain:
            return prompt, "plain"
        if not self.cfg.use_chi_prompt:
            return prompt.strip(), "nochi"
        return CHI_PROMPT + prompt.strip(), "chi"

    def _geometry(self, plain: bool) -> tuple[int, int]:
        """(max_length, tokens before the counted part) for a kind of prompt."""
        if plain or not self.cfg.use_chi_prompt:
            return self.cfg.text_len, 0
        return self.max_length, self.prefix_len - 1

    def tokenize(
        self, prompts: list[str], *, plain: bool = False, truncate: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids, attention_mask), both (B, max_length) int64 on the CPU, padded right.

        `plain=False`: chi prefix + stripped prompt, max_length = `self.max_length`; `plain=True`: the prompt
        as is, max_length = L. Raises `PromptTooLongError` unless `truncate`.
        """
        ids, mask, _ = self._tokenize(self._check_prompts(prompts), plain, truncate)
        return ids, mask

    def _tokenize(
        self, prompts: list[str], plain: bool, truncate: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        texts = [self._text(p, plain)[0] for p in prompts]
        max_length, offset = self._geometry(plain)
        limit = max_length - offset
        counts = [len(ids) - offset for ids in self.tokenizer(texts).input_ids]
        if not truncate:
            for i, n in enumerate(counts):
                if n > limit:
                    raise PromptTooLongError(n, limit, plain=plain, index=i)
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return batch.input_ids, batch.attention_mask.long(), counts

    @staticmethod
    def _check_prompts(prompts: list[str]) -> list[str]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of str")
        return list(prompts)

    def count_tokens(self, prompt: str, *, plain: bool = False) -> tuple[int, int]:
        """(tokens the prompt takes in the DiT's text window, the limit), e.g. to check before a session."""
        max_length, offset = self._geometry(plain)
        n = len(self.tokenizer(self._text(prompt, plain)[0]).input_ids) - offset
        return n, max_length - offset

    # --- encoding ----------------------------------------------------------------------------------------

    def encode(self, prompts: list[str], *, truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """User prompts -> (embeds (B, L, hidden) float32, mask (B, L) int64), on `self.device`.

        With the chi prefix: BOS + the last L - 1 positions of the max_length window (the prompt's tokens,
        then padding with mask 0). Raises `PromptTooLongError` if a prompt exceeds L - 1 tokens, unless
        `truncate` (then its tail is dropped, as in the reference).
        """
        return self._encode(self._check_prompts(prompts), plain=False, truncate=truncate)

    def encode_plain(self, prompts: list[str], *, truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative / unconditional prompts: no prefix, not stripped, max_length L, all L positions kept.

        Returns (embeds (B, L, hidden) float32, mask (B, L) int64). Over L tokens (BOS included) raises
        `PromptTooLongError` unless `truncate`.
        """
        return self._encode(self._check_prompts(prompts), plain=True, truncate=truncate)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's encoding, `encode_plain([""])`: ((1, L, hidden), (1, L))."""
        return self.encode_plain([""])

    def _encode(self, prompts: list[str], *, plain: bool, truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        L, H = self.cfg.text_len, self.cfg.hidden_size
        if not prompts:
            return (
                torch.empty(0, L, H, device=self.device),
                torch.empty(0, L, dtype=torch.long, device=self.device),
            )
        keys = [self.prompt_key(p, plain=plain) for p in prompts]
        found: dict[str, _Entry] = {}
        with self._lock:
            for key in keys:
                entry = self._cache.get(key)
                if entry is not None:
                    self._cache.move_to_end(key)
                    found[key] = entry
        for i, key in enumerate(keys):
            entry = found.get(key)
            if entry is not None and not truncate and entry.n_tokens > entry.limit:
                raise PromptTooLongError(entry.n_tokens, entry.limit, plain=plain, index=i)
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in found}
        if todo:
            fresh = self._forward(list(todo.values()), plain=plain, truncate=truncate)
            found.update(zip(todo, fresh, strict=True))
        with self._lock:
            self._hits += len(keys) - len(todo)
            self._misses += len(todo)
            for key in todo:
                self._cache[key] = found[key]
                self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        embeds = torch.stack([found[k].embeds for k in keys])  # (B, L, H)
        mask = torch.stack([found[k].mask for k in keys])  # (B, L)
        return embeds, mask

    def _forward(self, prompts: list[str], *, plain: bool, truncate: bool) -> list[_Entry]:
        ids, mask, counts = self._tokenize(prompts, plain, truncate)  # (B, T), (B, T)
        with torch.no_grad():
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H), after the final norm
        if not plain and self.cfg.use_chi_prompt:
            keep = self.keep_index
            hidden = hidden.index_select(1, keep.to(self.device))  # (B, L, H)
            mask = mask.index_select(1, keep)  # (B, L)
        hidden = hidden.float()
        mask = mask.to(self.device)
        max_length, offset = self._geometry(plain)
        limit = max_length - offset
        return [_Entry(hidden[i].clone(), mask[i].clone(), counts[i], limit) for i in range(len(prompts))]

    # --- cache and persistence ---------------------------------------------------------------------------

    def cache_info(self) -> dict[str, int]:
        """{'hits', 'misses', 'size', 'capacity'} of the prompt cache."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "size": len(self._cache),
                "capacity": self.cache_size,
            }

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def save_pretrained(self, folder: str | os.PathLike[str]) -> pathlib.Path:
        """Write the decoder (config.json + model.safetensors) and the tokenizer to `folder`.

        `TextEncoder(cfg, weights=folder)` loads it back; the folder is a plain transformers folder.
        """
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return folder
