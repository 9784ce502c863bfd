"""Tokenizers trained in-process for tiny test models (no downloads).

``bytelevel`` is GPT-2 style byte-level BPE (SmolLM2, Qwen); ``metaspace`` is
SentencePiece-style BPE with byte fallback (Llama 2, Mistral): ``<0xNN>`` tokens in the model
vocabulary spell any character the merges do not cover. Both carry ChatML special tokens.
Training is deterministic (same JSON on every call) and takes a few milliseconds.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["CHAT_TEMPLATE", "CORPUS", "SPECIALS", "tokenizer_config", "train_tokenizer"]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Varied enough for ~1000 merges; covers 2-, 3- and 4-byte UTF-8 characters.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris.",
    "Once upon a time there was a little girl who loved to play in the sun with her friends.",
    "She found a shiny red ball in the garden and ran home to show her mother.",
    "Hello! How are you today? I am fine, thank you. What would you like to know?",
    "Machine learning models predict the next token from the previous ones.",
    "Water boils at 100 degrees Celsius; ice melts at zero. Light travels fast.",
    "Numbers like 1234 and 3.14159 appear in text, as do dates such as 2026-11-25.",
    "In 1969, astronauts walked on the Moon. Mars is the fourth planet from the Sun.",
    "Café, naïve, résumé, jalapeño, Ærøskøbing, Straße, smörgåsbord, crème brûlée.",
    "Le petit chat dort sur la chaise. Où est la bibliothèque? Très bien, merci!",
    "Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München.",
    "El niño come una manzana. ¿Dónde está la estación? ¡Qué día tan bonito!",
    "日本語のテキストも少し含めます。東京は日本の首都です。こんにちは世界。",
    "今日はいい天気ですね。猫が好きです。ありがとうございます。",
    "中文文本：北京是中国的首都。你好，世界！我喜欢学习新的语言。",
    "한국어 문장도 있습니다. 안녕하세요, 세계! 서울은 한국의 수도입니다.",
    "Emoji 😀🚀🎉 and symbols → ← ∑ √ ∞ € £ ¥ appear too. 👍🏽 ❤️ 🇫🇷",
    "Привет, мир! Ελληνικά γράμματα. עברית. العربية. हिन्दी भाषा.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(f'{i} is even')\n",
    '{"name": "tiny", "layers": 2, "vocab": [1, 2, 3], "ok": true}',
    "<html><body><p>Hello, world!</p></body></html>",
    "Question: What is 2 + 2? Answer: 4. Question: Why is the sky blue? Answer: scattering.",
]


def _bytelevel(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def _metaspace(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
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
        vocab_size=vocab_size + len(byte_tokens),
        special_tokens=[*SPECIALS, *byte_tokens],
        show_progress=False,
    )
    return tok, trainer


@cache
def train_tokenizer(kind: str = "bytelevel", vocab_size: int = 1200) -> str:
    """The JSON text of a BPE tokenizer of ``kind`` trained on ``CORPUS`` (deterministic)."""
    if kind == "bytelevel":
        tok, trainer = _bytelevel(vocab_size)
    elif kind == "metaspace":
        tok, trainer = _metaspace(vocab_size)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (bytelevel or metaspace)")
    tok.train_from_iterator(CORPUS, trainer=trainer)
    spec = json.loads(tok.to_str())
    # The trainer registers the byte tokens as special added tokens; in a SentencePiece
    # conversion they are ordinary vocabulary entries (not matched in text, not "special").
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIALS]
    return json.dumps(spec, ensure_ascii=False)


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_config(**overrides: Any) -> dict[str, Any]:
    """A ``tokenizer_config.json`` for the trained tokenizers; ``overrides`` replace keys."""
    return {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        **overrides,
    }
