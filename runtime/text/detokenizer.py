"""Streaming detokenization: the text each new token makes final, never half a character.

The detokenizer decodes a short window of recent tokens with the tokenizer's own decoder and
emits what the newest tokens added. Decoding a window rather than single tokens keeps the
decoder's context-dependent rules right: SentencePiece strips the space of the *first* token
it decodes, and byte-level BPE may spell one character over several tokens. Text that ends in
U+FFFD, or that no longer starts with what was already emitted, is held back until the
character completes; ``finish`` flushes what is left, except a character the generation
ended in the middle of: that is dropped, as Ollama does, never sent as U+FFFD. Seeding the window with the last prompt
tokens gives the first generated token its leading space.

After each emission the window shrinks to the shortest tail of tokens that decodes cleanly
on its own, so each step decodes a handful of tokens whatever the length of the output. A
run of tokens that never completes a character (a model emitting stray bytes) is released
after ``MAX_HOLD`` tokens, so the window stays bounded then too.

The concatenation of the pieces equals ``decode(all ids)``, less that incomplete end, for byte-level decoders (lossy
UTF-8 is local) and for SentencePiece byte fallback whenever each run of byte tokens is valid
UTF-8, as ``encode`` produces. Byte fallback renders a run that turns invalid later as
U+FFFD *from its start*; text already streamed from such a run cannot be taken back.
Through ``decode`` a U+FFFD the model spelled in full cannot be told from an unfinished
character, so one at the very end of a generation is dropped too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
MAX_HOLD = 8  # tokens held at most: a UTF-8 character is at most 4 bytes, so 4 would do
MAX_TAIL = 8  # tokens searched for a clean tail (a byte-spelled character needs up to 4)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces; see the module docstring."""

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context)[-MAX_TAIL:]
        self._prefix = ""  # text of the window already emitted (or prompt context)
        self._held = 0  # tokens added since the last emission
        if self._ids:
            self._retain_clean_tail(self._decode(self._ids))

    def add(self, token: int) -> str:
        """Add one token; return the text that became final (often ``""`` mid-character)."""
        self._ids.append(token)
        self._held += 1
        text = self._decode(self._ids)
        if not text.startswith(self._prefix):
            if self._held <= MAX_HOLD:
                return ""
            # The decoder re-rendered text already streamed (a byte-fallback run that turned
            # invalid). That cannot be taken back: stream the new tokens on their own.
            fresh = self._ids[len(self._ids) - self._held :]
            piece = self._decode(fresh)
            self._ids = fresh
            self._retain_clean_tail(piece)
            return piece
        settled = text.rstrip(REPLACEMENT)
        if len(settled) == len(text):
            piece = text[len(self._prefix) :]
            self._retain_clean_tail(text)
            return piece
        # The trailing U+FFFDs may be a character still arriving; the text before them is
        # final under both lossy UTF-8 and byte fallback (which blanks a whole byte run).
        end = max(len(self._prefix), len(settled))
        if self._held > MAX_HOLD:
            # Lossy UTF-8 turns only the last incomplete sequence into the final U+FFFD.
            end = len(text) - 1
        piece = text[len(self._prefix) : end]
        self._prefix = text[:end]
        if self._held > MAX_HOLD:
            self._release_last(text)
        return piece

    def finish(self) -> str:
        """The text still held back at the end, less the incomplete character it may end in
        (the bytes of a character the generation stopped inside: never sent as U+FFFD)."""
        if not self._held:
            return ""
        text = self._decode(self._ids)
        if text.startswith(self._prefix):
            piece = text[len(self._prefix) :]
        else:
            piece = self._decode(self._ids[len(self._ids) - self._held :])
        self._ids, self._prefix, self._held = [], "", 0
        return piece.rstrip(REPLACEMENT)

    @property
    def window(self) -> int:
        """Tokens currently kept for context (bounded; exposed for tests)."""
        return len(self._ids)

    def _emit(self, text: str, end: int) -> str:
        piece = text[len(self._prefix) : end]
        self._retain_clean_tail(text)
        return piece

    def _retain_clean_tail(self, text: str) -> None:
        """Keep the shortest tail of tokens that decodes without U+FFFD on its own.

        A lone continuation byte decodes to U+FFFD, and under byte fallback it would poison
        the next run of byte tokens, so a character spelled in byte tokens is kept whole.
        """
        self._held = 0
        for start in range(len(self._ids) - 1, max(-1, len(self._ids) - 1 - MAX_TAIL), -1):
            tail_text = self._decode(self._ids[start:])
            if REPLACEMENT not in tail_text:
                self._ids = self._ids[start:]
                self._prefix = tail_text
                return
        # No clean tail (the recent text has stray bytes): the last token alone is context.
        self._ids = self._ids[-1:]
        self._prefix = self._decode(self._ids) if self._ids else ""
        if not text.endswith(self._prefix):
            self._ids, self._prefix = [], ""

    def _release_last(self, text: str) -> None:
        """After streaming all but the final U+FFFD, keep the few tokens that spell it."""
        settled = len(text) - 1
        for start in range(len(self._ids) - 1, max(0, len(self._ids) - 1 - MAX_TAIL), -1):
            head = self._decode(self._ids[:start])
            tail = self._decode(self._ids[start:])
            if head + tail == text and len(head) <= settled:
                self._ids = self._ids[start:]
                self._prefix = tail[: settled - len(head)]
                self._held = 1
                return
        # No token boundary splits the text cleanly: keep the window, all but U+FFFD read.
        self._prefix = text[:settled]
        self._held = 1
