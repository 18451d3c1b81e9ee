"""Small pure helpers shared by the snapshot and the diff: binary detection, decoding, path display."""

from __future__ import annotations

import json

BINARY_SNIFF_BYTES = 8000


def is_binary(data: bytes) -> bool:
    """git's own rule: a NUL byte in the first 8000 bytes means binary."""
    return b"\0" in data[:BINARY_SNIFF_BYTES]


def decode_text(data: bytes) -> str:
    """Deterministic decoding: UTF-8, invalid sequences become U+FFFD."""
    return data.decode("utf-8", errors="replace")


def path_text(path: bytes) -> str:
    """A repository path (bytes, as git stores it) as text; undecodable bytes become U+FFFD."""
    return path.decode("utf-8", errors="replace")


def path_key(path: bytes) -> str:
    """A path as str for pattern matching; lossless (surrogateescape), never shown to anyone."""
    return path.decode("utf-8", errors="surrogateescape")


def quoted(path: bytes) -> str:
    """A path as a JSON string literal: unambiguous even with quotes, newlines or tabs in it."""
    return json.dumps(path_text(path), ensure_ascii=False)


def display(path: bytes) -> str:
    """A path for a listing line: as is when it is plain, JSON-quoted when it could be misread."""
    text = path_text(path)
    if text and text == text.strip() and text.isprintable() and '"' not in text:
        return text
    return quoted(path)
