"""Tokenizers trained in-process for tiny test models (no downloads).

``bytelevel`` is GPT-2 style byte-level BPE (SmolLM2, Qwen); ``metaspace`` is
SentencePiece-style BPE with byte fallback (Llama 2, Mistral). Both carry ChatML specials.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris.",
    "Once upon a time there was a little girl who loved to play in the sun.",
    "Numbers like 1234 and 3.14159 appear in text, as do dates such as 2026-11-25.",
    "Café, naïve, résumé, jalapeño, Ærøskøbing, Straße, smörgåsbord, crème brûlée.",
    "日本語のテキストも少し含めます。東京は日本の首都です。こんにちは世界。",
    "中文文本：北京是中国的首都。你好，世界！",
    "Emoji 😀🚀🎉 and symbols → ← ∑ √ ∞ € £ ¥ appear too.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Привет, мир! Ελληνικά γράμματα. עברית. العربية.",
] * 8


@cache
def train_tokenizer(kind: str = "bytelevel", vocab_size: int = 700) -> str:
    """The JSON text of a BPE tokenizer trained on ``CORPUS`` (deterministic)."""
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
        tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size + 256,
            special_tokens=[*SPECIALS, *byte_tokens],
            show_progress=False,
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return str(tok.to_str())


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_config(**overrides: Any) -> dict[str, Any]:
    return {
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        **overrides,
    }
