"""Chat templates: HF Jinja semantics, helpers, errors, the ChatML fallback."""

from __future__ import annotations

import pytest

from runtime.errors import OptionsError
from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
from runtime.text.chat_template import CHATML, TemplateError, render
from runtime.text.tokenizer import Tokenizer

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(params=["bytelevel", "metaspace"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return Tokenizer.from_parts(train_tokenizer(request.param), tokenizer_config())


def test_renders_messages_and_generation_prompt(tok: Tokenizer) -> None:
    assert (
        tok.apply_chat_template(USER) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(USER, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nHi<|im_end|>\n"
    # The rendered special tokens encode as single ids.
    ids = tok.encode(tok.apply_chat_template(USER))
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_whitespace_control_matches_transformers() -> None:
    # trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before.
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render(template, USER * 2) == "[Hi]\n[Hi]\n"


def test_helpers_raise_exception_tojson_loop_controls() -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first!') }}{% endif %}"
        "{{ bos_token }}{{ messages | tojson }}{% for m in messages %}{% if loop.index > 1 %}"
        "{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "<{{ m.content }}>{% endfor %}"
    )
    messages = [{"role": "system", "content": "é"}, {"role": "user", "content": "u"}]
    out = render(template, messages, bos_token="<s>")
    assert out == '<s>[{"role": "system", "content": "é"}, {"role": "user", "content": "u"}]é<u>'
    with pytest.raises(TemplateError, match="system first!"):
        render(template, USER)
    assert issubclass(TemplateError, OptionsError)  # maps to 400 like any bad option


def test_generation_blocks_render_their_body() -> None:
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "[{{ m.content }}]{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert render(template, messages) == "q[a]"


def test_tojson_options_tools_and_extra_variables() -> None:
    template = (
        "{{ tools | tojson(indent=1) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=True) }}"
        "|{{ enable_thinking }}|{{ strftime_now('%Y') | length }}"
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = render(template, USER, tools=tools, enable_thinking=False)
    first, second, third, fourth = out.split("|")
    assert '\n  "type": "function"' in first
    assert second == '{"a": 2, "b": 1}'
    assert third == "False"
    assert fourth == "4"
    assert render("{{ tools is none }}", USER) == "True"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for %}", "invalid chat template"),
        ("{{ messages[5]['content'] }}", "chat template failed"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ ''.__class__.__mro__ }}", "chat template failed"),  # the sandbox refuses
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "chat template failed"),
    ],
)
def test_template_errors_are_options_errors(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        render(template, USER)


def test_messages_need_a_string_role() -> None:
    with pytest.raises(TemplateError, match="role"):
        render(None, [{"content": "x"}])
    with pytest.raises(TemplateError, match="role"):
        render(None, ["hello"])  # type: ignore[list-item]


def test_missing_template_falls_back_to_chatml() -> None:
    tok = Tokenizer.from_parts(train_tokenizer(), tokenizer_config(chat_template=None))
    assert tok.chat_template is None
    assert tok.apply_chat_template(USER) == render(CHATML, USER)
    assert tok.apply_chat_template(USER).startswith("<|im_start|>user\nHi<|im_end|>")
    # Content that is not text (an assistant turn carrying only tool calls) renders empty.
    assert render(None, [{"role": "assistant", "content": None}], add_generation_prompt=False) == (
        "<|im_start|>assistant\n<|im_end|>\n"
    )
