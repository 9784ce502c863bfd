"""Streaming detokenization never emits half a character or a wrong space."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.tokenizer import Tokenizer
from tests.tokenizer_fixture import tokenizer_config, train_tokenizer

ALPHABET = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    st.sampled_from(list("日本語の東京こんにちは😀🚀é ñ ß Ω\n  ")),
)


@cache
def _tok(kind: str) -> Tokenizer:
    return Tokenizer.from_parts(train_tokenizer(kind), tokenizer_config())


def _stream(tok: Tokenizer, ids: list[int], context: list[int] | None = None) -> list[str]:
    d = tok.detokenizer(context or [])
    pieces = [d.add(t) for t in ids]
    pieces.append(d.finish())
    return pieces


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40))
def test_streamed_pieces_concatenate_to_decode_all(kind: str, text: str) -> None:
    tok = _tok(kind)
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == full
    for piece in pieces[:-1]:
        # Mid-stream pieces never end inside a character.
        assert not piece.endswith("\ufffd") or "\ufffd" in full


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_character_split_across_tokens_is_held_until_complete(kind: str) -> None:
    tok = _tok(kind)
    # A rare CJK character the small vocabulary must spell with several byte tokens.
    ids = tok.encode("鱻")
    assert len(ids) > 1
    d = tok.detokenizer()
    out = [d.add(t) for t in ids]
    assert out[:-1] == [""] * (len(ids) - 1)
    assert out[-1] == "鱻"
    assert d.finish() == ""


def test_prompt_context_keeps_the_first_leading_space() -> None:
    tok = _tok("metaspace")
    prompt = tok.encode("The capital of France is")
    ids = tok.encode("The capital of France is Paris")
    generated = ids[len(prompt) :]
    assert "".join(_stream(tok, generated, context=prompt)) == " Paris"


def test_incomplete_character_is_flushed_at_finish() -> None:
    tok = _tok("bytelevel")
    ids = tok.encode("鱻")
    d = tok.detokenizer()
    assert [d.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.finish() == tok.decode(ids[:-1])
