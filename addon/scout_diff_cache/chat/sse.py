"""Server-sent events, as the chat completions stream uses them: split a byte stream into events.

Events keep their original bytes (blank-line terminator included), so a filter that passes an
event on sends exactly what the upstream sent. Line ends may be CRLF, LF or CR (the SSE spec).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# A line end followed by another: the blank line that ends an event.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")


class SseSplitter:
    """Feed chunks as they arrive; get back each complete event's raw bytes in order.

    Linear in the bytes fed: each search resumes where the last one stopped (less the three bytes
    a line end can span), and the pending bytes are appended to, never copied whole per chunk.
    """

    # The longest event end, "\r\n\r\n", can start this many bytes before new data.
    _OVERLAP = 3

    def __init__(self) -> None:
        self._pending = bytearray()
        self._searched = 0  # no event end starts before this offset in _pending

    def feed(self, chunk: bytes) -> list[bytes]:
        self._pending += chunk
        events = []
        start = 0
        position = max(self._searched - self._OVERLAP, 0)
        while match := _EVENT_END.search(self._pending, position):
            if match.end() == len(self._pending) and self._pending.endswith(b"\r"):
                break  # a CR at the very end may be the first half of a CRLF still on its way
            events.append(bytes(self._pending[start : match.end()]))
            start = position = match.end()
        if start:
            del self._pending[:start]
        self._searched = len(self._pending)
        return events

    def release(self, keep: int = _OVERLAP) -> bytes:
        """Hand over the pending bytes of the unfinished event but the last ``keep`` (which an event end may need)."""
        cut = max(len(self._pending) - keep, 0)
        released = bytes(self._pending[:cut])
        del self._pending[:cut]
        self._searched = len(self._pending)
        return released

    def flush(self) -> bytes:
        """What is left when the stream ends: an unterminated last event, or nothing."""
        rest = bytes(self._pending)
        self._pending.clear()
        self._searched = 0
        return rest

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)


def event_data(raw_event: bytes) -> str | None:
    """The event's data (its ``data:`` lines joined by newlines), or None if it has no data field."""
    lines = [line for line in _LINE_END.split(raw_event) if line.startswith(b"data")]
    values = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if name != b"data":
            continue
        values.append(value[1:] if value.startswith(b" ") else value if colon else b"")
    if not values:
        return None
    return b"\n".join(values).decode("utf-8", "replace")


def iter_event_data(body: bytes) -> Iterator[str]:
    """The data of every event in a complete stream body, the unterminated last one included."""
    splitter = SseSplitter()
    events = splitter.feed(body)
    rest = splitter.flush()
    if rest.strip():
        events.append(rest)
    for event in events:
        data = event_data(event)
        if data is not None:
            yield data
