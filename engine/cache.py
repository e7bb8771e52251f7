"""Bounded LRU caches that count their hits, misses and size for ``stats``."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRUCache:
    """At most ``max_bytes`` of values (as measured by ``size``), least recently used out."""

    def __init__(self, max_bytes: int, size: Callable[[Any], int] = sys.getsizeof) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def put(self, key: Hashable, value: Any) -> None:
        n = self._size(value)
        if n > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, n)
            self.bytes += n
            while self.bytes > self.max_bytes:
                _, (_, m) = self._data.popitem(last=False)
                self.bytes -= m

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

    def stats(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "entries": len(self._data), "bytes": self.bytes, "max_bytes": self.max_bytes,
            "hits": self.hits, "misses": self.misses,
            "hit_rate": round(self.hits / total, 4) if total else None,
        }
