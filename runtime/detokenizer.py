"""Streaming detokenization: text for each new token, never half a character.

The detokenizer decodes a small window of recent tokens twice (with and without the newest
ones) and emits the difference. Decoding the window rather than single tokens keeps the
decoder's context-dependent rules right (SentencePiece drops the space of the *first* token
it decodes, byte-level BPE may split one character over several tokens). Text ending in
U+FFFD is held back until the character completes; ``finish`` flushes whatever is left.
Seeding the window with the last prompt tokens gives the first generated token its
leading space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context)[-4:]
        self._read = len(self._ids)  # ids[:read] have been emitted (or are context)
        self._emitted_prefix = self._decode(self._ids) if self._ids else ""

    def add(self, token: int) -> str:
        """Add one token; return the text that became final."""
        self._ids.append(token)
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT) or len(text) <= len(self._emitted_prefix):
            return ""
        return self._advance(text)

    def finish(self) -> str:
        """The text still held back (possibly an incomplete character), at the end."""
        text = self._decode(self._ids) if self._ids else ""
        if len(text) <= len(self._emitted_prefix):
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        piece = text[len(self._emitted_prefix) :]
        # The next window keeps the shortest tail of tokens that decodes cleanly on its own:
        # usually just the newest token, but a character spelled in byte tokens needs all of
        # them (a lone continuation byte decodes to U+FFFD and would poison the window).
        for start in range(len(self._ids) - 1, max(-1, len(self._ids) - 9), -1):
            tail_text = self._decode(self._ids[start:])
            if _REPLACEMENT not in tail_text:
                self._ids = self._ids[start:]
                self._emitted_prefix = tail_text
                break
        else:
            self._ids = []
            self._emitted_prefix = ""
        self._read = len(self._ids)
        return piece
