"""A bounded, thread-safe memo of results that depend only on some content, keyed by its digest.

Used for what a new commit should not redo for the files it did not change: token counts,
outlines, reference scans. Keys are 16-byte BLAKE2 digests (``ContentMemo.key``), so the memo
never holds the content itself.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable


class ContentMemo[V]:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: OrderedDict[bytes, V] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(data: bytes, salt: str = "") -> bytes:
        return hashlib.blake2b(data, digest_size=16, person=salt.encode()[:16]).digest()

    def known(self, keys: Iterable[bytes]) -> dict[bytes, V]:
        """The values of those ``keys`` that are known."""
        with self._lock:
            found = {key: self._values[key] for key in keys if key in self._values}
            for key in found:
                self._values.move_to_end(key)
            return found

    def put(self, key: bytes, value: V) -> None:
        with self._lock:
            self._values[key] = value
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)

    def get_or_make(self, key: bytes, make: Callable[[], V]) -> V:
        """The value for ``key``, made (outside the lock: two threads may both make it) if not known."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = make()
        self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
