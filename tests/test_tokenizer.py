"""Tokenizer: special tokens, BOS rules, EOS priority, chat templates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import ModelLoadError, OptionsError
from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
from runtime.text.tokenizer import Tokenizer


@pytest.fixture(params=["bytelevel", "metaspace"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return Tokenizer.from_parts(train_tokenizer(request.param), tokenizer_config())


def test_round_trip_and_special_tokens_are_atomic(tok: Tokenizer) -> None:
    text = "Hello wörld 日本 😀"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    im_start, im_end = tok.encode("<|im_start|>"), tok.encode("<|im_end|>")
    assert len(im_start) == 1
    assert len(im_end) == 1
    assert ids[0] == im_start[0]
    assert ids[-1] == im_end[0]


def test_eos_priority_generation_config_then_config_then_tokenizer_config() -> None:
    js = train_tokenizer()
    cfg = tokenizer_config(eos_token="<|im_start|>")  # not an end-of-turn marker
    base = Tokenizer.from_parts(js, cfg)
    im_start = base.encode("<|im_start|>")[0]
    end_of_turn = {base.encode(t)[0] for t in ("<|endoftext|>", "<|im_end|>")}
    assert base.eos_ids == {im_start} | end_of_turn
    from_config = Tokenizer.from_parts(js, cfg, config={"eos_token_id": 5})
    assert from_config.eos_ids == {5} | end_of_turn
    from_gen = Tokenizer.from_parts(
        js, cfg, generation_config={"eos_token_id": [7, 8]}, config={"eos_token_id": 5}
    )
    assert from_gen.eos_ids == {7, 8} | end_of_turn


def test_bos_added_once_when_asked() -> None:
    js = train_tokenizer()
    tok = Tokenizer.from_parts(js, tokenizer_config(bos_token="<|im_start|>", add_bos_token=True))
    bos = tok.bos_id
    assert bos is not None
    assert tok.encode("hi")[0] == bos
    assert tok.encode("<|im_start|>hi").count(bos) == 1
    assert tok.encode("hi", add_bos=False)[0] != bos
    plain = Tokenizer.from_parts(js, tokenizer_config())
    assert plain.add_bos is False


def test_decode_rejects_unknown_ids(tok: Tokenizer) -> None:
    with pytest.raises(OptionsError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size + 5])
    with pytest.raises(OptionsError):
        tok.decode([-1])


def test_bad_tokenizer_json_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_parts("{not json", {})


def test_eos_from_token_objects_and_end_of_turn_markers() -> None:
    js = train_tokenizer()
    tok = Tokenizer.from_parts(
        js, tokenizer_config(eos_token={"content": "<|endoftext|>", "special": True})
    )
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|im_start|>")}
    assert tok.eos_ids == {ids["<|endoftext|>"], ids["<|im_end|>"]}
    assert ids["<|im_start|>"] not in tok.eos_ids
    assert tok.eos_token == "<|endoftext|>"
    # A config int works as well as a list; bools are not ids.
    assert Tokenizer.from_parts(js, {}, config={"eos_token_id": 9}).eos_ids >= {9}
    assert 1 not in Tokenizer.from_parts(js, {}, config={"eos_token_id": True}).eos_ids


def test_template_tokens_come_from_tokenizer_config(tok: Tokenizer) -> None:
    js = train_tokenizer()
    template = "{{ bos_token }}|{{ eos_token }}|{{ messages[0]['content'] }}"
    tok = Tokenizer.from_parts(
        js,
        tokenizer_config(bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=template),
        generation_config={"eos_token_id": [0, 2]},
    )
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<|im_start|>|<|im_end|>|x"
    )


def test_add_bos_follows_the_post_processor_when_config_is_silent() -> None:
    spec = json.loads(train_tokenizer("metaspace"))
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}
        },
    }
    js = json.dumps(spec)
    tok = Tokenizer.from_parts(js, {"bos_token": "<|endoftext|>"})
    assert tok.add_bos is True
    assert tok.encode("hi")[0] == tok.bos_id == 0
    assert tok.encode("hi").count(0) == 1  # the post-processor does not add a second
    assert (
        Tokenizer.from_parts(js, {"bos_token": "<|endoftext|>", "add_bos_token": False}).add_bos
        is False
    )


def test_piece_keeps_the_sentencepiece_space() -> None:
    tok = Tokenizer.from_parts(train_tokenizer("metaspace"), tokenizer_config())
    ids = tok.encode("The capital of France is Paris")
    pieces = [tok.piece(t) for t in ids]
    assert "".join(pieces).strip() == "The capital of France is Paris"
    assert any(p.startswith(" ") for p in pieces[1:])
    assert tok.piece(tok.token_to_id("<|im_end|>") or 0) == "<|im_end|>"
    with pytest.raises(OptionsError):
        tok.piece(tok.vocab_size)


def test_decode_accepts_numpy_ids_and_rejects_non_integers(tok: Tokenizer) -> None:
    ids = tok.encode("Hello")
    assert tok.decode(np.array(ids)) == "Hello"  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="integers"):
        tok.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(OptionsError, match="integers"):
        tok.decode([True])


def test_named_templates_use_the_default(tok: Tokenizer) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT {{ messages | length }}"},
    ]
    tok = Tokenizer.from_parts(train_tokenizer(), tokenizer_config(chat_template=templates))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT 1"


def test_fixture_is_deterministic_and_covers_multibyte_text() -> None:
    for kind in ("bytelevel", "metaspace"):
        first = train_tokenizer.__wrapped__(kind)
        assert first == train_tokenizer.__wrapped__(kind)
        tok = Tokenizer.from_parts(first, tokenizer_config())
        assert 1000 <= tok.vocab_size <= 2000
        for text in ("Café 日本語 😀 👍🏽", "Hello world"):
            assert tok.decode(tok.encode(text)).strip() == text
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer("wordpiece")
