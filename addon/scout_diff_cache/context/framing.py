"""How context messages are framed: one system message, JSON-encoded once, spliced into request bodies.

``system_message_json(text)`` is ``MESSAGE_HEAD + encoded_content(text) + MESSAGE_END``. JSON
escaping is per character, so a message's content can be encoded in pieces and joined, each
piece's offset known (``encode_regions``), and a message can be found again in a body by its
framing (``holds_message``) and read where it lies (``decode_content``) without parsing the body.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from itertools import pairwise

import orjson

MESSAGE_HEAD = b'{"role": "system", "content": "'
MESSAGE_END = b'"}'
# A stored flow whose snapshot was trimmed from memory has a system message starting with this.
TRIMMED_SNAPSHOT_PREFIX = "[scout-diff-cache: snapshot"


def encoded_content(text: str) -> bytes:
    """``text`` as the inside of a JSON string literal, as it appears in a context message.

    The bytes ``json.dumps(text, ensure_ascii=False)`` gives, at C speed; a string orjson refuses
    (a lone surrogate) goes through the json module, which refuses it as before.
    """
    try:
        return orjson.dumps(text)[1:-1]
    except orjson.JSONEncodeError:
        return json.dumps(text, ensure_ascii=False).encode("utf-8")[1:-1]


def decode_content(encoded: bytes) -> str:
    """The text of an encoded slice (the inside of a JSON string) that starts and ends between escapes.

    Raises ValueError if it is not one.
    """
    text: str = json.loads('"' + encoded.decode("utf-8", "replace") + '"')
    return text


def system_message_json(text: str) -> bytes:
    """A chat message, JSON-encoded once: spliced as is into every request."""
    return MESSAGE_HEAD + encoded_content(text) + MESSAGE_END


def encode_regions(
    pieces: Iterable[tuple[str, str | None]], start: int
) -> tuple[list[bytes], list[tuple[int, str | None]]]:
    """Encode labelled pieces of a message's content; their bytes and where each starts."""
    encoded, regions = [], []
    offset = start
    for text, label in pieces:
        data = encoded_content(text)
        encoded.append(data)
        regions.append((offset, label))
        offset += len(data)
    return encoded, regions


def holds_message(body: bytes, start: int, end: int) -> bool:
    """Whether ``body[start:end]`` is a context message, an element of the ``messages`` array."""
    return (
        0 < start < end < len(body)
        and body.startswith(MESSAGE_HEAD, start)
        and body.endswith(MESSAGE_END, start, end)
        and body[start - 1 : start] in (b"[", b",")
        and body[end : end + 1] in (b"]", b",")
    )


def message_content_span(body: bytes, start: int, end: int) -> tuple[int, int] | None:
    """Where the encoded content of the context message at ``body[start:end]`` lies; None if it is not one."""
    if end - start < len(MESSAGE_HEAD) + len(MESSAGE_END):
        return None
    if not (body.startswith(MESSAGE_HEAD, start, end) and body.endswith(MESSAGE_END, start, end)):
        return None
    return start + len(MESSAGE_HEAD), end - len(MESSAGE_END)


def strip_context(body: bytes, spans: Sequence[Sequence[int]]) -> bytes:
    """The body without the context messages at ``spans``: the client's messages and fields.

    For replays of stored flows (trimmed or not): the result is what the client sent, except that
    ``model`` is as sent upstream. Raises ValueError when a span does not hold a context message.
    """
    ordered = sorted((int(start), int(end)) for start, end in spans)
    for (_, previous_end), (start, _) in pairwise(ordered):
        if start < previous_end:
            raise ValueError(f"context spans overlap: {ordered}")
    for start, end in ordered:
        if not holds_message(body, start, end):
            raise ValueError(f"body[{start}:{end}] is not a context message in 'messages'")
    result = bytearray(body)
    for start, end in reversed(ordered):  # right to left: the earlier spans' offsets stay valid
        if result[end : end + 1] == b",":
            del result[start : end + 1]
        elif result[start - 1 : start] == b",":
            del result[start - 1 : end]
        else:  # the array's only element
            del result[start:end]
    return bytes(result)
