"""Tokenizer: special tokens, BOS rules, EOS priority, chat templates."""

from __future__ import annotations

import pytest

from runtime.chat_template import TemplateError, render
from runtime.errors import ModelLoadError, OptionsError
from runtime.tokenizer import Tokenizer
from tests.tokenizer_fixture import tokenizer_config, train_tokenizer


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


def test_chat_template_renders_messages_and_generation_prompt(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert not no_prompt.endswith("assistant\n")


def test_template_helpers_and_errors() -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first!') }}{% endif %}"
        "{{ bos_token }}{{ messages | tojson }}{% for m in messages %}{% if loop.index > 1 %}"
        "{% break %}{% endif %}{{ m.content }}{% endfor %}"
    )
    out = render(template, [{"role": "system", "content": "é"}], bos_token="<s>")
    assert out.startswith('<s>[{"role": "system", "content": "é"}]é')
    with pytest.raises(TemplateError, match="system first!"):
        render(template, [{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="invalid chat template"):
        render("{% for %}", [{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="role"):
        render(None, [{"content": "x"}])


def test_missing_template_falls_back_to_chatml() -> None:
    tok = Tokenizer.from_parts(train_tokenizer(), tokenizer_config(chat_template=None))
    assert tok.chat_template is None
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]).startswith(
        "<|im_start|>user\nHi<|im_end|>"
    )
