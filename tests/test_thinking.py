"""Splitting a thinking model's ``<think>`` block from its content, cut anywhere; thinking in the
chat history."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.messages import ChatMessage, GenerateRequest
from actors.pipeline import prepare
from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
from runtime.text.thinking import ThinkingSplitter, prompt_opens_thinking, supports_thinking
from runtime.text.tokenizer import Tokenizer

CASES = [
    # (generated text, opened by the prompt, thinking, content)
    ("<think>\nLet me see.\n</think>\n\nParis.", False, "Let me see.", "Paris."),
    ("  <think>a < b </think>c</think>", False, "a < b", "c</think>"),
    ("<think></think>Hi", False, "", "Hi"),
    ("<think>\n\n</think>\n\nHi <think>x</think>", False, "", "Hi <think>x</think>"),
    ("Just content <think>x</think>", False, "", "Just content <think>x</think>"),
    ("<thinking>no</thinking>", False, "", "<thinking>no</thinking>"),
    ("\nreasoning\n</think>\nanswer", True, "reasoning", "answer"),
    ("<think>cut short by the budget", False, "cut short by the budget", ""),
    ("<thi", False, "", "<thi"),
    ("", False, "", ""),
]


def split(pieces: list[str], inside: bool = False) -> tuple[str, str]:
    splitter = ThinkingSplitter(inside=inside)
    thinking, content = [], []
    for piece in pieces:
        t, c = splitter.feed(piece)
        thinking.append(t)
        content.append(c)
    t, c = splitter.finish()
    return "".join([*thinking, t]), "".join([*content, c])


@pytest.mark.parametrize(("text", "inside", "thinking", "content"), CASES)
def test_whole_text(text: str, inside: bool, thinking: str, content: str) -> None:
    assert split([text], inside) == (thinking, content)


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), data=st.data())
def test_cut_at_any_token_boundaries(case: tuple[str, bool, str, str], data: st.DataObject) -> None:
    text, inside, thinking, content = case
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=len(text) + 1)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert split(pieces, inside) == (thinking, content)


def test_one_character_at_a_time_streams_content_without_waiting_for_the_end() -> None:
    splitter = ThinkingSplitter()
    out = [splitter.feed(ch) for ch in "<think>ab</think>cd"]
    assert [t for t, _ in out if t] == ["a", "b"]
    assert [c for _, c in out if c] == ["c", "d"]  # content is not held to the end
    assert splitter.in_content


def test_capability_and_open_prompt() -> None:
    assert supports_thinking("{% if enable_thinking is defined %}{% endif %}")
    assert supports_thinking("{{ '<think>' }}")
    assert not supports_thinking("{{ messages }}")
    assert not supports_thinking(None)
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_an_earlier_replys_thinking_reaches_the_template_as_reasoning_content() -> None:
    tok = Tokenizer.from_parts(
        train_tokenizer(),
        tokenizer_config(
            chat_template="{% for m in messages %}[{{ m.reasoning_content }}]{% endfor %}"
        ),
    )
    history = (
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content="Hello", extra={"thinking": "greet back"}),
        ChatMessage(role="user", content="bye"),
    )
    prepared = prepare(GenerateRequest(messages=history), tok, 256)
    assert tok.decode(list(prepared.prompt)) == "[][greet back][]"
