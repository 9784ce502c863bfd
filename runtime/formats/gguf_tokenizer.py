"""Rebuild an HF ``tokenizer.json`` (and ``tokenizer_config.json``) from GGUF tokenizer metadata.

Two GGUF tokenizer models exist for the supported architectures:

- ``gpt2``: byte-level BPE from ``tokenizer.ggml.tokens`` and ``.merges``; the split regex comes
  from ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer names);
- ``llama``: SentencePiece BPE from tokens and scores. llama.cpp merges the adjacent pair whose
  merged piece scores highest, which is BPE with merges ranked by that score; unknown characters
  fall back to ``<0xNN>`` byte tokens. Like llama.cpp, a space is prepended to every text segment
  (between special tokens) when ``tokenizer.ggml.add_space_prefix`` is on.

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens. A post-processor adds BOS (and EOS) when ``tokenizer.ggml.add_bos_token`` (and
``add_eos_token``) say so, as HF's own llama tokenizers do; the chat template and the special
token ids go to the rebuilt ``tokenizer_config.json`` and ``config.json`` entries.

A token is at most ``MAX_TOKEN_BYTES`` (1 KiB) of UTF-8. Real vocabularies stay far below
(SmolLM2's longest token is 162 bytes, byte-level BPE's longest are a few hundred); llama.cpp
has no limit of its own besides GGUF's 1 GiB per string, but deriving SentencePiece merges
costs the square of a piece's length, and the cap bounds that work for a hostile file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from runtime.errors import ModelLoadError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MAX_TOKEN_BYTES = 1024

# llama.cpp pre-tokenizer regexes (``llama-vocab.cpp``), as HF writes them in tokenizer.json.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Phi-4-mini's (o200k): words split before capitals, contractions kept with their word.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLIT = {
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2,
    "gpt-4o": _GPT4O,
}
_PRE_DIGITS = ("smollm", "starcoder", "refact")  # each digit alone, then GPT-2's regex
_PRE_GPT2 = ("default", "gpt2", "gpt-2")
SUPPORTED_PRE = tuple(sorted([*_PRE_SPLIT, *_PRE_DIGITS, *_PRE_GPT2]))


def _byte_level_pre(path: Path, pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _PRE_SPLIT:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLIT[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _PRE_DIGITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _PRE_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise ModelLoadError(
        f"{path}: unsupported tokenizer.ggml.pre {pre!r}; supported: {', '.join(SUPPORTED_PRE)}"
    )


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated piece keeps its first id, as llama.cpp's lookup
    return vocab


def _gpt2(path: Path, meta: dict[str, Any], tokens: list[str]) -> Tokenizer:
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges_raw, list):
        raise ModelLoadError(f"{path}: missing metadata tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        left, sep, right = str(m).partition(" ")
        if not sep:
            raise ModelLoadError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(_vocab(tokens), merges, fuse_unk=False))
    tok.pre_tokenizer = _byte_level_pre(path, str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    vocab = _vocab(tokens)
    ranked: list[tuple[float, int, int, int]] = []
    for i, piece in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(piece) < 2 or vocab[piece] != i:
            continue
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, _, left, right in ranked]


def _spm(path: Path, meta: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise ModelLoadError(f"{path}: tokenizer.ggml.scores missing or not one per token")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    bpe = models.BPE(
        _vocab(tokens),
        _spm_merges(tokens, [float(s) for s in scores], types),
        unk_token=unk,
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer, not a Metaspace pre-tokenizer: SentencePiece and llama.cpp prepend the
    # space even to text that starts with one, and Metaspace does not.
    spaces = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    steps: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _token_id(meta: dict[str, Any], key: str, n: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    return int(value) if isinstance(value, int) and 0 <= value < n else None


def build_tokenizer(
    path: Path, meta: dict[str, Any], vocab_size: int
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config, config.json token-id entries) from ``meta``."""
    try:
        return _build(path, meta, vocab_size)
    except ModelLoadError:
        raise
    except Exception as exc:  # tokenizers reports an inconsistent vocabulary as a bare Exception
        raise ModelLoadError(f"{path}: invalid tokenizer metadata ({exc})") from exc


def _build(
    path: Path, meta: dict[str, Any], vocab_size: int
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelLoadError(f"{path}: missing or invalid metadata tokenizer.ggml.tokens")
    if len(tokens) > vocab_size:
        raise ModelLoadError(
            f"{path}: {len(tokens)} tokens but the embedding has {vocab_size} rows"
        )
    n = len(tokens)
    for index, token in enumerate(tokens):
        if len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
            raise ModelLoadError(
                f"{path}: token {index} in tokenizer.ggml.tokens is {len(token.encode())} bytes "
                f"long (at most {MAX_TOKEN_BYTES})"
            )
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * n
    if not isinstance(types, list) or len(types) != n:
        raise ModelLoadError(f"{path}: tokenizer.ggml.token_type is not one per token")
    if kind == "gpt2":
        tok = _gpt2(path, meta, tokens)
    elif kind == "llama":
        tok = _spm(path, meta, tokens, types)
    else:
        raise ModelLoadError(
            f"{path}: unsupported tokenizer.ggml.model {kind!r}; supported: gpt2, llama"
        )
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == USER_DEFINED
        ]
    )
    bos, eos = _token_id(meta, "bos", n), _token_id(meta, "eos", n)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head = [tokens[bos]] if add_bos and bos is not None else []
        tail = [tokens[eos]] if add_eos and eos is not None else []
        single = [*head, "$A", *tail]
        pair = [*single, *head, "$B:1", *(f"{t}:1" for t in tail)]
        specials = [(t, tokens.index(t)) for t in dict.fromkeys([*head, *tail])]
        post: list[Any] = [
            processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        ]
        if kind == "gpt2":
            post.insert(0, processors.ByteLevel(trim_offsets=False))
        tok.post_processor = processors.Sequence(post)
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    for key in ("bos", "eos", "unknown", "padding"):
        i = _token_id(meta, key, n)
        if i is not None:
            name = {"unknown": "unk", "padding": "pad"}.get(key, key)
            config[f"{name}_token"] = tokens[i]
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    ids: dict[str, Any] = {}
    if bos is not None:
        ids["bos_token_id"] = bos
    stops = [i for k in ("eos", "eot", "eom") if (i := _token_id(meta, k, n)) is not None]
    stops = list(dict.fromkeys(stops))
    if stops:
        ids["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return tok.to_str(), config, ids
