"""Formatting helpers for the mitmweb text views: one line per value, clipped, with thousands separators."""

from __future__ import annotations

import json

CLIP_CHARS = 200


def inline(value: object) -> str:
    """A field value on one line: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def clip(text: str) -> str:
    return text if len(text) <= CLIP_CHARS else f"{text[:CLIP_CHARS]}... ({len(text):,} characters)"


def count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def number(value: object) -> str:
    return f"{value:,}" if type(value) is int else inline(value)


def share(part: object, whole: object) -> str:
    if type(part) is int and type(whole) is int and whole > 0:
        return f" ({part / whole:.1%} of the prompt)"
    return ""
