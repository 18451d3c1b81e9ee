"""The codebase snapshot (system message 1): every tracked text file at a commit, as one string.

Layout, chosen for the upstream prefix cache (which reuses only the bytes before the first
difference): a constant preamble, then the file blocks in bytewise path order, then everything
commit-specific (the commit id, the lists of skipped and omitted files) at the very end.
Nothing depends on time, locale, absolute paths or the machine.

Total-size rule: blocks are taken in path order; the first block that would take the total past
``max_snapshot_bytes``, and every block after it, are omitted and listed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .exclusions import PathFilter
from .gitrepo import GitRepo, TreeEntry
from .text import decode_text, display, is_binary, quoted

SYMLINK_MODE = "120000"
SUBMODULE_KIND = "commit"

PREAMBLE = (
    "This is a snapshot of a git repository: the content of every text file tracked at its current "
    "commit, less excluded paths and files over the size limits. Each file appears as\n"
    '<file path="PATH">\nCONTENT\n</file>\n'
    "and each symbolic link as a <symlink> line naming its target. Files appear in bytewise path "
    "order. The commit id and the files that were left out, with the reason, are listed at the end. "
    "Uncommitted changes are given in the next system message as a patch against this commit; "
    "where they disagree, the patch is the current state.\n\n"
)


@dataclass(frozen=True)
class SnapshotLimits:
    """The settings a snapshot depends on; part of its cache key."""

    max_file_bytes: int
    max_snapshot_bytes: int
    path_filter: PathFilter


@dataclass(frozen=True)
class LeftOut:
    path: bytes
    size: int | None = None
    detail: str = ""


@dataclass
class SnapshotContent:
    """What goes into a snapshot, before rendering: included blocks and each kind of left-out file."""

    blocks: list[str] = field(default_factory=list)
    file_count: int = 0
    symlink_count: int = 0
    block_bytes: int = 0
    binary: list[LeftOut] = field(default_factory=list)
    too_large: list[LeftOut] = field(default_factory=list)
    excluded: list[LeftOut] = field(default_factory=list)
    over_total: list[LeftOut] = field(default_factory=list)
    submodules: list[LeftOut] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    commit: str | None
    text: str
    message_json: bytes
    file_count: int
    symlink_count: int
    skipped_count: int

    @property
    def size(self) -> int:
        return len(self.message_json)


def file_block(path: bytes, content: bytes) -> str:
    text = decode_text(content)
    if text and not text.endswith("\n"):
        text += "\n"
    return f"<file path={quoted(path)}>\n{text}</file>\n"


def symlink_block(path: bytes, target: bytes) -> str:
    return f"<symlink path={quoted(path)} target={quoted(target)}/>\n"


def system_message_json(text: str) -> bytes:
    """A chat message, JSON-encoded once: spliced as is into every request."""
    return json.dumps({"role": "system", "content": text}, ensure_ascii=False).encode("utf-8")


def select_entries(entries: Iterable[TreeEntry], limits: SnapshotLimits, content: SnapshotContent) -> list[TreeEntry]:
    """The entries worth reading, in bytewise path order; the others are recorded as left out."""
    wanted = []
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.kind == SUBMODULE_KIND:
            content.submodules.append(LeftOut(entry.path, detail=entry.oid))
        elif entry.kind != "blob":
            continue
        elif limits.path_filter.excludes(entry.path):
            content.excluded.append(LeftOut(entry.path, entry.size))
        elif entry.mode != SYMLINK_MODE and (entry.size or 0) > limits.max_file_bytes:
            content.too_large.append(LeftOut(entry.path, entry.size))
        else:
            wanted.append(entry)
    return wanted


def fill_blocks(
    entries: Sequence[TreeEntry],
    blobs: Iterable[bytes],
    limits: SnapshotLimits,
    content: SnapshotContent,
) -> None:
    """Render blobs into blocks until the total limit; the rest is listed as omitted (never read)."""
    blob_iter = iter(blobs)
    for index, entry in enumerate(entries):
        data = next(blob_iter)
        if entry.mode == SYMLINK_MODE:
            block = symlink_block(entry.path, data)
        elif is_binary(data):
            content.binary.append(LeftOut(entry.path, len(data)))
            continue
        else:
            block = file_block(entry.path, data)
        block_size = len(block.encode("utf-8"))
        if content.block_bytes + block_size > limits.max_snapshot_bytes:
            content.over_total.extend(LeftOut(e.path, e.size) for e in entries[index:])
            return
        content.blocks.append(block)
        content.block_bytes += block_size
        if entry.mode == SYMLINK_MODE:
            content.symlink_count += 1
        else:
            content.file_count += 1


def _listing(title: str, items: Sequence[LeftOut], describe: str) -> str:
    if not items:
        return ""
    lines = [f"{title} ({len(items)}):"]
    for item in items:
        extra = ""
        if describe == "size" and item.size is not None:
            extra = f" ({item.size} bytes)"
        elif describe == "detail" and item.detail:
            extra = f" @ {item.detail}"
        lines.append(f"  {display(item.path)}{extra}")
    return "\n".join(lines) + "\n"


def render_footer(commit: str | None, content: SnapshotContent, limits: SnapshotLimits) -> str:
    parts = [
        "<snapshot_info>\n",
        f"commit: {commit}\n" if commit else "commit: none (the repository has no commits yet)\n",
        f"files included: {content.file_count}, symbolic links: {content.symlink_count}, "
        + f"bytes: {content.block_bytes}\n",
        _listing("binary files, not included", content.binary, "size"),
        _listing(
            f"files over the per-file limit of {limits.max_file_bytes} bytes, not included",
            content.too_large,
            "size",
        ),
        _listing("files excluded by path pattern", content.excluded, ""),
        _listing(
            f"files omitted because the snapshot reached its limit of {limits.max_snapshot_bytes} bytes "
            "(every file from this one on, in path order)",
            content.over_total,
            "size",
        ),
        _listing("submodules, listed but not entered", content.submodules, "detail"),
        "</snapshot_info>\n",
    ]
    return "".join(parts)


def render_snapshot(commit: str | None, content: SnapshotContent, limits: SnapshotLimits) -> Snapshot:
    text = PREAMBLE + "".join(content.blocks) + render_footer(commit, content, limits)
    skipped = sum(
        len(x)
        for x in (
            content.binary,
            content.too_large,
            content.excluded,
            content.over_total,
            content.submodules,
        )
    )
    return Snapshot(
        commit=commit,
        text=text,
        message_json=system_message_json(text),
        file_count=content.file_count,
        symlink_count=content.symlink_count,
        skipped_count=skipped,
    )


def build_snapshot(repo: GitRepo, commit: str | None, limits: SnapshotLimits) -> Snapshot:
    """Read the commit's tree from the object database and render it (blocking; run it in a thread)."""
    content = SnapshotContent()
    if commit is not None:
        entries = select_entries(repo.ls_tree(commit), limits, content)
        blobs = repo.read_blobs([e.oid for e in entries])
        try:
            fill_blocks(entries, blobs, limits, content)
        finally:
            blobs.close()
    return render_snapshot(commit, content, limits)


_FILE_MARK = b'<file path=\\"'  # how a file block starts inside the JSON-encoded message
_SYMLINK_MARK = b'<symlink path=\\"'
_COMPARE_BLOCK = 1 << 20


def path_at(message_json: bytes, offset: int) -> str | None:
    """The path of the file or symlink block that holds byte ``offset`` of a snapshot message."""
    start = max(message_json.rfind(_FILE_MARK, 0, offset + 1), message_json.rfind(_SYMLINK_MARK, 0, offset + 1))
    if start < 0:
        return None
    literal_start = message_json.index(b"=", start) + 1
    end = message_json.find(b">", literal_start)
    literal = message_json[literal_start:end].removesuffix(b"/")
    for candidate in (literal, literal.rpartition(b" target=")[0]):  # a symlink's line ends with its target
        try:
            # The JSON-escaped form of quoted(path): unescape once for the literal, once for the path.
            value = json.loads(json.loads(b'"' + candidate + b'"'))
        except ValueError:
            continue
        if isinstance(value, str):
            return value
    return None


def common_prefix_length(a: bytes, b: bytes) -> int:
    """How many leading bytes ``a`` and ``b`` share (block compares, then a bisection: 40 MB in ms)."""
    limit = min(len(a), len(b))
    start = 0
    while start < limit and a[start : start + _COMPARE_BLOCK] == b[start : start + _COMPARE_BLOCK]:
        start += _COMPARE_BLOCK
    if start >= limit:
        return limit
    low, high = start, min(start + _COMPARE_BLOCK, limit)  # a[:low] == b[:low]; they differ before high
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low if a[low] != b[low] else high
