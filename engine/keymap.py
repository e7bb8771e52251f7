"""KeyMap: a map from 64-bit keys to 64-bit values at ~16 bytes an entry.

A ``dict[int, int]`` costs ~100 bytes an entry (two int objects and a slot), which is
most of what a large capsule's lookup tables would weigh. Here the bulk lives in two
sorted numpy columns searched by bisection; recent sets go to a small dict that is merged
in once it holds a 32nd of the columns (so merges cost O(1) amortised per set). Values
are never removed, only replaced: callers map a key to the newest thing it named.

Reads may run in other threads while one thread writes: the columns are replaced as one
tuple and the recent dict is replaced, never cleared, so a reader sees an old state or a
new one, never a mix.
"""

from __future__ import annotations

import numpy as np

MERGE_MIN = 4096  # recent entries below which a merge is never worth it


def halves(digest: bytes) -> tuple[int, int]:
    """A 128-bit digest as two signed 64-bit keys: one to map by, one to check with."""
    return int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:16], "little", signed=True)


class KeyMap:
    def __init__(self) -> None:
        self._cols = (np.empty(0, np.int64), np.empty(0, np.int64))  # (sorted keys, values)
        self._recent: dict[int, int] = {}

    def get(self, key: int) -> int | None:
        v = self._recent.get(key)
        if v is not None:
            return v
        keys, values = self._cols
        i = int(keys.searchsorted(key))
        return int(values[i]) if i < len(keys) and keys[i] == key else None

    def set(self, key: int, value: int) -> None:
        recent = self._recent
        recent[key] = value
        if len(recent) >= max(MERGE_MIN, len(self._cols[0]) >> 5):
            self._merge(recent)

    def _merge(self, recent: dict[int, int]) -> None:
        keys, values = self._cols
        new_k = np.fromiter(recent.keys(), np.int64, len(recent))
        new_v = np.fromiter(recent.values(), np.int64, len(recent))
        order = new_k.argsort()
        new_k, new_v = new_k[order], new_v[order]
        at = keys.searchsorted(new_k)
        known = at < len(keys)
        known[known] = keys[at[known]] == new_k[known]
        values = values.copy()  # readers may hold the old columns
        values[at[known]] = new_v[known]
        fresh = ~known
        keys = np.insert(keys, at[fresh], new_k[fresh])
        values = np.insert(values, at[fresh], new_v[fresh])
        self._cols = (keys, values)
        self._recent = {}

    def nbytes(self) -> int:
        return self._cols[0].nbytes + self._cols[1].nbytes
