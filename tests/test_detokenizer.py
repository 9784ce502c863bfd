"""Streaming detokenization never emits half a character or a wrong space."""

from __future__ import annotations

from functools import cache

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
from runtime.text.detokenizer import StreamingDetokenizer
from runtime.text.tokenizer import Tokenizer

KINDS = ["bytelevel", "metaspace"]
ALPHABET = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    st.sampled_from(list("日本語の東京こんにちは😀🚀👍🏽é ñ ß Ω\n  鱻𠀋")),
)


@cache
def _tok(kind: str) -> Tokenizer:
    return Tokenizer.from_parts(train_tokenizer(kind), tokenizer_config())


def _byte_token(tok: Tokenizer, byte: int) -> int:
    found = tok.token_to_id(f"<0x{byte:02X}>")
    assert found is not None
    return found


def _stream(tok: Tokenizer, ids: list[int], context: list[int] | None = None) -> list[str]:
    d = tok.detokenizer(context or [])
    pieces = [d.add(t) for t in ids]
    pieces.append(d.finish())
    return pieces


def _check_stream(tok: Tokenizer, context: list[int], ids: list[int]) -> None:
    pieces = _stream(tok, ids, context)
    before = tok.decode(context)
    full = tok.decode(context + ids)
    assert full.startswith(before)
    expected = full[len(before) :]
    joined = "".join(pieces)
    # The end may lose U+FFFDs (an unfinished character is dropped at finish), nothing else.
    assert expected.startswith(joined)
    assert set(expected[len(joined) :]) <= {"\ufffd"}
    if not full.endswith("\ufffd"):
        assert joined == expected
    offset = 0
    for piece in pieces:
        # A U+FFFD streamed out is one the whole decode has at that very place.
        for i, ch in enumerate(piece):
            if ch == "\ufffd":
                assert expected[offset + i] == "\ufffd"
        offset += len(piece)
    for piece in pieces[:-1]:
        # Mid-stream pieces never end inside a character.
        assert not piece.endswith("\ufffd") or "\ufffd" in expected


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40), prompt=st.text(alphabet=ALPHABET, max_size=8))
def test_streamed_pieces_concatenate_to_decode_all(kind: str, text: str, prompt: str) -> None:
    tok = _tok(kind)
    _check_stream(tok, tok.encode(prompt), tok.encode(text))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_byte_level_ids_stream_exactly(data: st.DataObject) -> None:
    # Any id sequence, stray continuation bytes and half characters included: byte-level
    # decoding is lossy UTF-8 over the concatenated bytes, which streams exactly.
    tok = _tok("bytelevel")
    ids = data.draw(
        st.lists(st.one_of(st.integers(0, 260), st.integers(0, tok.vocab_size - 1)), max_size=60)
    )
    context = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=4))
    _check_stream(tok, tok.encode(tok.decode(context)), ids)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_metaspace_ids_stream_exactly(data: st.DataObject) -> None:
    # Byte-fallback runs valid as produced by encode (one character's bytes), mixed with
    # arbitrary ordinary tokens.
    tok = _tok("metaspace")
    byte_ids = {_byte_token(tok, b) for b in range(256)}
    ordinary = [i for i in range(tok.vocab_size) if i not in byte_ids]
    parts = data.draw(
        st.lists(
            st.one_of(
                st.sampled_from(ordinary).map(lambda i: [i]),
                st.sampled_from(list("鱻𠀋😀éß€日")).map(tok.encode),
            ),
            max_size=30,
        )
    )
    _check_stream(tok, tok.encode("Hi"), [i for part in parts for i in part])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the ByteLevel alphabet)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_token_tokenizer(pieces: list[bytes]) -> Tokenizer:
    """A byte-level tokenizer whose vocabulary is the 256 bytes plus ``pieces``."""
    spell = _bytes_to_unicode()
    vocab = {spell[b]: b for b in range(256)}
    for piece in pieces:
        vocab["".join(spell[b] for b in piece)] = len(vocab)
    raw = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    return Tokenizer.from_parts(raw.to_str(), {})


def test_ollama_utf8_vectors_byte_level() -> None:
    # Ollama's flush vectors: E3 81 | 93 E3 | 82 93 spell "こん" split inside characters.
    tok = _byte_token_tokenizer([b"\xe3\x81", b"\x93\xe3", b"\x82\x93"])
    d = tok.detokenizer()
    assert d.add(256) == ""
    assert d.add(257) == "こ"
    assert d.add(258) == "ん"
    assert d.finish() == ""


def test_ollama_utf8_vectors_byte_fallback() -> None:
    tok = _tok("metaspace")
    byte = {b: _byte_token(tok, b) for b in (0xE3, 0x81, 0x82, 0x93)}
    d = tok.detokenizer(tok.encode("Hi"))
    out = [d.add(byte[b]) for b in (0xE3, 0x81, 0x93, 0xE3, 0x82, 0x93)]
    assert out == ["", "", "こ", "", "", "ん"]
    assert d.finish() == ""


@pytest.mark.parametrize("kind", KINDS)
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


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_context_keeps_the_first_leading_space(kind: str) -> None:
    tok = _tok(kind)
    prompt = tok.encode("The capital of France is")
    ids = tok.encode("The capital of France is Paris")
    assert ids[: len(prompt)] == prompt
    generated = ids[len(prompt) :]
    assert "".join(_stream(tok, generated, context=prompt)) == " Paris"
    if kind == "metaspace":
        # Without context SentencePiece drops it, as decode(generated) does.
        assert "".join(_stream(tok, generated)) == "Paris"


@pytest.mark.parametrize("kind", KINDS)
def test_incomplete_character_at_the_end_is_dropped(kind: str) -> None:
    # Cut inside a character (max_tokens, EOS, stop): its bytes are dropped as Ollama does,
    # never sent as U+FFFD; the text before it is kept.
    tok = _tok(kind)
    ids = tok.encode("Hi 鱻")
    head = tok.encode("Hi ")
    assert ids[: len(head)] == head
    assert len(ids) - len(head) > 1
    assert "\ufffd" in tok.decode(ids[:-1])
    d = tok.detokenizer()
    out = [d.add(t) for t in ids[:-1]]
    out.append(d.finish())
    assert "".join(out) == tok.decode(head)
    assert "\ufffd" not in "".join(out)


@pytest.mark.parametrize("kind", KINDS)
def test_window_and_work_stay_bounded(kind: str) -> None:
    # Normal text and a long run of stray bytes that never completes a character.
    tok = _tok(kind)
    spelling = "<0x80>" if kind == "metaspace" else _bytes_to_unicode()[0x80]
    stray = tok.token_to_id(spelling)
    assert stray is not None
    ids = tok.encode("Hello world, 日本語 😀 " * 20) + [stray] * 300 + tok.encode(" the end")
    calls = 0

    def counting(batch: list[int]) -> str:
        nonlocal calls
        calls += 1
        return tok.decode(batch)

    d = StreamingDetokenizer(counting)
    widest = 0
    pieces = []
    for t in ids:
        pieces.append(d.add(t))
        widest = max(widest, d.window)
    pieces.append(d.finish())
    assert widest <= 20
    assert calls <= 12 * len(ids)
    if kind == "bytelevel":
        assert "".join(pieces) == tok.decode(ids)
    else:
        assert "".join(pieces).endswith(" the end")
