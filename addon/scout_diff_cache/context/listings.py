"""Listings of left-out files that fit a budget: per file, else per folder, else per top-level folder.

Message 1 ends with what it left out. When the repository is cut to fit a window, those lists
must fit too (a 30k-file repository's paths alone would fill a 128k-token window), so they are
grouped, at the first level of detail whose text fits, the same on every machine.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..text import display, listing

LEVELS = ("file", "folder", "top-level folder", "count")
# (level of the window's own listings, level of the other left-out listings), most detailed first:
# what the window left out is named in full for as long as possible.
LEVEL_PAIRS = (
    ("file", "file"),
    ("file", "folder"),
    ("file", "top-level folder"),
    ("file", "count"),
    ("folder", "count"),
    ("top-level folder", "count"),
    ("count", "count"),
)


@dataclass(frozen=True)
class Listed:
    path: bytes
    detail: str = ""  # after the path, e.g. " (1234 bytes)"
    amount: int = 0  # summed per group, with ``unit``


def _group_key(path: bytes, level: str) -> str:
    text = display(path)
    if level == "folder":
        return (posixpath.dirname(text) or ".") + "/"
    return (text.split("/", 1)[0] + "/") if "/" in text else "./"


def render_listing(title: str, items: Sequence[Listed], level: str, unit: str = "") -> str:
    """``title`` over ``items`` at one level of ``LEVELS`` ("" for no items)."""
    if not items:
        return ""
    if level == "file":
        return listing(title, [f"{display(item.path)}{item.detail}" for item in items])
    if level == "count":
        total = f", {sum(item.amount for item in items)} {unit}" if unit else ""
        return f"{title} ({len(items)}{total}; too many to name here)\n"
    groups: dict[str, list[int]] = {}
    for item in items:
        row = groups.setdefault(_group_key(item.path, level), [0, 0])
        row[0] += 1
        row[1] += item.amount
    lines = [
        f"{key} ({files} file{'s' if files != 1 else ''}{f', {amount} {unit}' if unit else ''})"
        for key, (files, amount) in sorted(groups.items())
    ]
    return listing(f"{title}, by {level}", lines)


def fitting_text(render: Callable[[str, str], str], size: Callable[[str], int], limit: int) -> str:
    """``render(*levels)`` at the most detailed ``LEVEL_PAIRS`` whose ``size`` is within ``limit``."""
    text = ""
    for levels in LEVEL_PAIRS:
        text = render(*levels)
        if size(text) <= limit:
            return text
    return text
