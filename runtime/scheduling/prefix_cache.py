"""The prefix-cache index: which token prefixes have saved KV positions, and which to evict.

The engine keeps each entry's arrays by id (``Engine.remove(save_as=...)``); this index owns
everything else: the token key of every entry, its size in bytes, least-recently-used order
and the counters ``/metrics`` shows. A lookup returns the entry sharing the longest prefix
with a prompt, capped one short of the prompt (its last token must still be computed to get
logits). Inserting a key drops the entries it extends (a chat's previous turn is a prefix of
its next one), so a conversation holds one entry, not one per turn.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import attrs
import numpy as np


@attrs.define(eq=False)
class PrefixEntry:
    entry_id: int
    tokens: np.ndarray  # int32 key: the positions the engine saved
    nbytes: int

    def __len__(self) -> int:
        return len(self.tokens)


@attrs.define
class PrefixCounters:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    evictions: int = 0
    saved: int = 0


class PrefixIndex:
    """Entries by id in least-recently-used order (the oldest first)."""

    def __init__(self, bytes_per_token: int) -> None:
        self.bytes_per_token = bytes_per_token
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._ids = itertools.count(1)
        self.counters = PrefixCounters()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def new_id(self) -> int:
        return next(self._ids)

    def lookup(self, prompt: Sequence[int]) -> tuple[int, int] | None:
        """``(entry_id, length)`` of the longest usable cached prefix of ``prompt``, if any.

        A hit counts as a use (it becomes the most recently used entry).
        """
        self.counters.lookups += 1
        limit = len(prompt) - 1
        if limit <= 0 or not self._entries:
            return None
        query = np.asarray(prompt[:limit], dtype=np.int32)
        best: tuple[int, int] | None = None
        for entry in self._entries.values():
            n = min(len(entry), limit)
            if n == 0 or (best is not None and n <= best[1]):
                continue
            differ = np.flatnonzero(entry.tokens[:n] != query[:n])
            common = int(differ[0]) if differ.size else n
            if common > 0 and (best is None or common > best[1]):
                best = (entry.entry_id, common)
        if best is not None:
            self._entries.move_to_end(best[0])
            self.counters.hits += 1
            self.counters.reused_tokens += best[1]
        return best

    def insert(self, entry_id: int, tokens: Sequence[int]) -> list[int]:
        """Index saved positions under ``entry_id``; returns the ids it made redundant.

        Redundant: entries whose key is a prefix of ``tokens``. If an existing entry already
        extends ``tokens``, the new one is the redundant one and its id is returned.
        """
        key = np.asarray(tokens, dtype=np.int32)
        dropped: list[int] = []
        for entry in list(self._entries.values()):
            n = min(len(entry), len(key))
            if not np.array_equal(entry.tokens[:n], key[:n]):
                continue
            if len(entry) <= len(key):
                dropped.append(entry.entry_id)
                del self._entries[entry.entry_id]
            else:
                self._entries.move_to_end(entry.entry_id)
                return [*dropped, entry_id]
        self._entries[entry_id] = PrefixEntry(
            entry_id=entry_id, tokens=key, nbytes=len(key) * self.bytes_per_token
        )
        self.counters.saved += 1
        return dropped

    def evict_one(self, keep: frozenset[int] = frozenset()) -> int | None:
        """Remove the least recently used entry not in ``keep``; its id, or None."""
        for entry_id in self._entries:
            if entry_id not in keep:
                del self._entries[entry_id]
                self.counters.evictions += 1
                return entry_id
        return None

    def discard(self, entry_id: int) -> None:
        """Forget an entry the engine no longer holds (not counted as an eviction)."""
        self._entries.pop(entry_id, None)

    def clear(self) -> list[int]:
        ids = list(self._entries)
        self._entries.clear()
        return ids
