"""Small pure helpers shared by every layer: binary detection, UTF-8 decoding, paths, sizes, commit ids."""

from __future__ import annotations

import json

BINARY_SNIFF_BYTES = 8000
SHORT_COMMIT_CHARS = 7  # git's own default abbreviation
# A listing of paths longer than this names the first ones and counts the rest.
MAX_LISTED_PATHS = 1000


def is_binary(data: bytes) -> bool:
    """git's own rule: a NUL byte in the first 8000 bytes means binary."""
    return b"\0" in data[:BINARY_SNIFF_BYTES]


def decode_utf8(data: bytes) -> str:
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


def listing(title: str, lines: list[str]) -> str:
    """``title (N):`` and one indented line per item, at most MAX_LISTED_PATHS of them, the rest counted."""
    if not lines:
        return ""
    shown = lines[:MAX_LISTED_PATHS]
    out = [f"{title} ({len(lines)}):", *(f"  {line}" for line in shown)]
    if len(lines) > len(shown):
        out.append(f"  ... and {len(lines) - len(shown)} more not named here")
    return "\n".join(out) + "\n"


def short_commit(commit: str | None) -> str:
    """A commit id for logs and comments; 'unborn' while HEAD has no commit."""
    return commit[:SHORT_COMMIT_CHARS] if commit else "unborn"


def human_bytes(size: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as in the mitmweb comment)."""
    if size < 1000:
        return f"{size} B"
    scaled = float(size)
    for unit in ("KB", "MB"):
        scaled /= 1000
        if scaled < 1000:
            return f"{scaled:.1f} {unit}"
    return f"{scaled / 1000:.1f} GB"
