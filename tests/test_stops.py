"""StopMatcher (runtime/text/stops.py) against the plain definition, on random streams."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.text.detokenizer import REPLACEMENT
from runtime.text.stops import StopMatcher

_ALPHABET = st.sampled_from(["a", "b", "c", REPLACEMENT])


class _Reference:
    """The plain definition (every prefix length of every stop string checked each time)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)].rstrip(REPLACEMENT), True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        if keep:
            keep = len(buf) - len(buf[: len(buf) - keep].rstrip(REPLACEMENT))
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(_ALPHABET, max_size=5), min_size=1, max_size=4).map(tuple),
    pieces=st.lists(st.text(_ALPHABET, max_size=4), max_size=12),
)
def test_the_matcher_gives_what_the_plain_definition_gives(
    stops: tuple[str, ...], pieces: list[str]
) -> None:
    matcher, reference = StopMatcher(stops), _Reference(stops)
    for piece in pieces:
        got = matcher.feed(piece)
        assert got == reference.feed(piece)
        if got[1]:
            return
    assert matcher.flush() == reference.held
    # Nothing emitted ever contained a stop string.
    assert not any(s and s in "".join(pieces) for s in stops)


def test_held_text_is_only_what_could_still_become_a_stop() -> None:
    matcher = StopMatcher(("aab",))
    assert matcher.feed("aaa") == ("a", False)  # "aa" may still become "aab"
    assert matcher.feed("a") == ("a", False)
    assert matcher.feed("b!") == ("", True)


def test_a_long_stop_string_is_held_across_many_pieces() -> None:
    stop = "x" * 255 + "y"
    matcher = StopMatcher((stop,))
    emitted = "".join(matcher.feed("x")[0] for _ in range(1000))
    assert emitted == "x" * (1000 - 255)
    assert matcher.feed("y") == ("", True)
