"""Stop strings in streamed text: what may be emitted now, and where a stop string cuts it.

A generation streams text a token at a time, and a stop string may arrive split over several
tokens, so the end of the text that could still become a stop string is held back until the
next piece decides it. For each stop string a Knuth-Morris-Pratt automaton keeps the longest
prefix of it that ends the text so far, so each new character costs O(1) amortized per stop
string: with the request limits (16 stop strings of up to 256 characters) the naive check of
every prefix length cost up to 4,000 string slices per token, on the event loop.
"""

from __future__ import annotations

from runtime.text.detokenizer import REPLACEMENT


def _failure(pattern: str) -> list[int]:
    """KMP's failure function: for each prefix, the length of its longest proper border."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class _PrefixTracker:
    """The longest prefix of ``stop`` that is a suffix of the text fed so far."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self._fail = _failure(stop)
        self.matched = 0

    def feed(self, text: str) -> bool:
        """Advance over ``text``; whether the whole stop string occurred in it."""
        stop, fail, matched = self.stop, self._fail, self.matched
        found = False
        for ch in text:
            if matched == len(stop):
                matched = fail[matched - 1]
            while matched and stop[matched] != ch:
                matched = fail[matched - 1]
            if stop[matched] == ch:
                matched += 1
                found = found or matched == len(stop)
        self.matched = matched
        return found


class StopMatcher:
    """Holds back text that could still turn into a stop string.

    The generation ends at a stop string, so an unfinished character (U+FFFD) right before
    it is dropped, as at any other end (``StreamingDetokenizer.finish``): U+FFFDs right before
    a held stop prefix are held with it.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._trackers = [_PrefixTracker(s) for s in dict.fromkeys(stops) if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        buf = self._held + text
        keep = 0
        hit = False
        for tracker in self._trackers:
            hit = tracker.feed(text) or hit
            keep = max(keep, min(tracker.matched, len(tracker.stop) - 1))
        if hit:
            # The earliest stop string in the text cuts it (another may end later but start
            # sooner, so the position comes from ``find``, not from the first one completed).
            cut = min(i for i in (buf.find(t.stop) for t in self._trackers) if i >= 0)
            self._held = ""
            return buf[:cut].rstrip(REPLACEMENT), True
        if keep:
            keep = len(buf) - len(buf[: len(buf) - keep].rstrip(REPLACEMENT))
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
