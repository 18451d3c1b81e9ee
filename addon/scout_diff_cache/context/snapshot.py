"""The codebase snapshot (system message 1): every tracked text file at a commit, as one string.

Layout, chosen for the upstream prefix cache (which reuses only the bytes before the first
difference): a constant preamble, then the file blocks in bytewise path order, then everything
commit-specific (the commit id, the lists of skipped and omitted files) at the very end.
Nothing depends on time, locale, absolute paths or the machine.

Total-size rule: blocks are taken in path order; the first block that would take the total past
``max_snapshot_bytes``, and every block after it, are omitted and listed.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field

from ..git.exclusions import PathFilter
from ..git.repo import KIND_SUBMODULE, MODE_SYMLINK, GitRepo, TreeEntry
from ..text import decode_utf8, is_binary, path_text, quoted
from .fit import FitReport, WindowBudget
from .footer import fit_to_window, render_footer
from .framing import MESSAGE_END, MESSAGE_HEAD, encode_regions
from .secrets import Redaction, SecretScanner, scan_ahead
from .tokens import utf8_length

PREAMBLE = (
    "This is a snapshot of a git repository: the content of every text file tracked at its current "
    "commit, less excluded paths and files over the size limits. Each file appears as\n"
    '<file path="PATH">\nCONTENT\n</file>\n'
    "and each symbolic link as a <symlink> line naming its target. Files appear in bytewise path "
    "order. The commit id and the files that were left out, with the reason, are listed at the end. "
    "Uncommitted changes are given in the next system message as a patch against this commit; "
    "where they disagree, the patch is the current state.\n\n"
)

# The append-only layout (history.py): the same snapshot, of a base commit, then the history after it.
# Message 1 starts with append_preamble(base): a line naming the base, then this text.
APPEND_PREAMBLE = (
    "This is a snapshot of a git repository at a base commit: the content of every text file tracked "
    "at that commit, less excluded paths and files over the size limits. Each file appears as\n"
    '<file path="PATH">\nCONTENT\n</file>\n'
    "and each symbolic link as a <symlink> line naming its target. Files appear in bytewise path "
    "order. The base commit id and the files that were left out, with the reason, follow the files. "
    'After them comes the history since the base: one <commit id="..." parent="..."> block per commit, '
    "oldest first, along the first-parent chain, with the commit message and the commit's changes "
    "(a patch against its parent, or the full new text of each changed file). Base plus history is "
    "the repository at its current commit; later blocks win. The next system message names the "
    "current commit and gives the uncommitted changes against it.\n\n"
)


BASE_LINE_START = "Base commit: "


def append_preamble(base: str | None) -> str:
    """The append layout's preamble, its first line naming the base commit.

    A prefix cache keeps the whole base either way (it changes only when the base moves), but
    routers that hash only the start of a prompt to guess where it is cached (llm-d's approximate
    prefix scorer reads about the first 16 KB) must see two repositories, or two bases of one,
    differ from the first bytes on.
    """
    return f"{BASE_LINE_START}{base or 'none (no commits yet)'}\n" + APPEND_PREAMBLE


def prefix_key_of(message_json: bytes) -> str:
    """x-scout-prefix-key: 16 hex digits of SHA-256 over the base's bytes (about 30 ms for 40 MB).

    Equal exactly when two requests start with the same base bytes: the same repository content,
    base and settings, on any replica; what a router hashes to send them to the replica that has
    that prefix cached.
    """
    return hashlib.sha256(message_json).hexdigest()[:16]


@dataclass(frozen=True)
class SnapshotLimits:
    """The settings a snapshot depends on; part of its cache key."""

    max_file_bytes: int
    max_snapshot_bytes: int
    path_filter: PathFilter
    secrets: SecretScanner | None = None  # None: nothing is redacted (REDACT_SECRETS=false)


@dataclass(frozen=True)
class LeftOut:
    path: bytes
    size: int | None = None
    detail: str = ""


@dataclass
class SnapshotContent:
    """What goes into a snapshot, before rendering: included blocks and each kind of left-out file."""

    blocks: list[str] = field(default_factory=list)
    block_paths: list[bytes] = field(default_factory=list)
    file_count: int = 0
    symlink_count: int = 0
    block_bytes: int = 0
    binary: list[LeftOut] = field(default_factory=list)
    too_large: list[LeftOut] = field(default_factory=list)
    excluded: list[LeftOut] = field(default_factory=list)
    over_total: list[LeftOut] = field(default_factory=list)
    submodules: list[LeftOut] = field(default_factory=list)
    outline_count: int = 0
    fit: FitReport | None = None  # how the files were fitted to the window, when a budget was given
    redactions: list[Redaction] = field(default_factory=list)  # secrets replaced in the blocks

    def redactions_shown(self) -> list[Redaction]:
        """The redactions in files the snapshot gives (in full or outlined), for its footer."""
        shown = set(self.block_paths)
        return [redaction for redaction in self.redactions if redaction.path in shown]

    def add_block(self, path: bytes, block: str, size: int, symlink: bool = False) -> None:
        self.blocks.append(block)
        self.block_paths.append(path)
        self.block_bytes += size
        if symlink:
            self.symlink_count += 1
        else:
            self.file_count += 1


@dataclass(frozen=True)
class Snapshot:
    """Message 1, kept only as the JSON bytes spliced into requests (the text is decoded on demand)."""

    commit: str | None
    message_json: bytes
    file_count: int
    symlink_count: int
    skipped_count: int
    base_commit: str | None = None  # append-only layout: the base the history starts from
    tail_commits: int = 0  # append-only layout: commits after the base
    # Where each part starts in message_json, and what it is: a path, "commit <id>", or None
    # (preamble, footer). For saying where a cache ended or two snapshots part.
    regions: tuple[tuple[int, str | None], ...] = ()
    history_start: int | None = None  # append-only layout: where the commit blocks start in message_json
    history_chars: int = 0  # append-only layout: the length of the commit blocks at the end of text
    fit: FitReport | None = None  # the base's fit to the window (None: built without a budget)
    outline_count: int = 0  # files given as outlines to fit the window
    tail_tokens: int = 0  # append-only layout: the history blocks' tokens, as the budget counted them
    redacted: int = 0  # secrets replaced in it (listed at the end of the base and of each commit block)
    prefix_key: str = ""  # prefix_key_of the base's message (the history appended after it does not change it)

    @property
    def planned_tokens(self) -> int | None:
        """Message 1's tokens as planned (an upper estimate unless counted exactly); None without a budget."""
        return None if self.fit is None else self.fit.planned_tokens + self.tail_tokens

    @property
    def text(self) -> str:
        """The message's content (decoded from message_json: 0.2 s for 40 MB; not kept twice in memory)."""
        content = json.loads(self.message_json)["content"]
        assert isinstance(content, str)
        return content

    @property
    def base_text(self) -> str:
        """The text without the history blocks: the base snapshot, its footer last."""
        text = self.text
        return text[: len(text) - self.history_chars]

    @property
    def size(self) -> int:
        return len(self.message_json)


def file_block(path: bytes, content: bytes) -> str:
    text = decode_utf8(content)
    if text and not text.endswith("\n"):
        text += "\n"
    return f"<file path={quoted(path)}>\n{text}</file>\n"


def symlink_block(path: bytes, target: bytes) -> str:
    return f"<symlink path={quoted(path)} target={quoted(target)}/>\n"


def select_entries(entries: Iterable[TreeEntry], limits: SnapshotLimits, content: SnapshotContent) -> list[TreeEntry]:
    """The entries worth reading, in bytewise path order; the others are recorded as left out."""
    wanted = []
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.kind == KIND_SUBMODULE:
            content.submodules.append(LeftOut(entry.path, detail=entry.oid))
        elif entry.kind != "blob":
            continue
        elif limits.path_filter.excludes(entry.path):
            content.excluded.append(LeftOut(entry.path, entry.size))
        elif entry.mode != MODE_SYMLINK and (entry.size or 0) > limits.max_file_bytes:
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
    """Render blobs into blocks until the total limit; the rest is listed as omitted (never read, but
    for the few the secret scanner had read ahead)."""
    prepared = _redacted(entries, blobs, limits.secrets)
    try:
        for index, (entry, data, found) in enumerate(prepared):
            if entry.mode == MODE_SYMLINK:
                block = symlink_block(entry.path, data)
            elif is_binary(data):
                content.binary.append(LeftOut(entry.path, len(data)))
                continue
            else:
                content.redactions.extend(found)
                block = file_block(entry.path, data)
            block_size = utf8_length(block)  # decoded with replacement: never a lone surrogate
            if content.block_bytes + block_size > limits.max_snapshot_bytes:
                content.over_total.extend(LeftOut(e.path, e.size) for e in entries[index:])
                return
            content.add_block(entry.path, block, block_size, symlink=entry.mode == MODE_SYMLINK)
    finally:
        prepared.close()


def _redacted(
    entries: Sequence[TreeEntry], blobs: Iterable[bytes], secrets: SecretScanner | None
) -> Generator[tuple[TreeEntry, bytes, tuple[Redaction, ...]]]:
    """Each entry with its blob, redacted when it is a text file; scanned ahead by ``scan_ahead``."""

    def redact(entry: TreeEntry, data: bytes) -> tuple[bytes, tuple[Redaction, ...]]:
        if secrets is None or entry.mode == MODE_SYMLINK or is_binary(data):
            return data, ()
        return secrets.redact(entry.path, data, oid=entry.oid)

    if secrets is None:
        for entry, data in zip(entries, blobs, strict=False):
            yield entry, data, ()
        return
    scanned = scan_ahead(redact, zip(entries, blobs, strict=False))
    try:
        for entry, (data, found) in zip(entries, scanned, strict=False):
            yield entry, data, found
    finally:
        scanned.close()


def render_snapshot(
    commit: str | None,
    content: SnapshotContent,
    limits: SnapshotLimits,
    preamble: str = PREAMBLE,
    footer: str | None = None,
) -> Snapshot:
    footer = render_footer(commit, content, limits) if footer is None else footer
    pieces = [
        (preamble, None),
        *((block, path_text(path)) for block, path in zip(content.blocks, content.block_paths, strict=True)),
        (footer, None),
    ]
    encoded, regions = encode_regions(pieces, len(MESSAGE_HEAD))
    message_json = b"".join([MESSAGE_HEAD, *encoded, MESSAGE_END])
    skipped = sum(
        len(x)
        for x in (
            content.binary,
            content.too_large,
            content.excluded,
            content.over_total,
            content.submodules,
        )
    ) + (len(content.fit.omitted) if content.fit else 0)
    return Snapshot(
        commit=commit,
        message_json=message_json,
        file_count=content.file_count,
        symlink_count=content.symlink_count,
        skipped_count=skipped,
        base_commit=commit,
        regions=tuple(regions),
        fit=content.fit,
        outline_count=content.outline_count,
        redacted=len(content.redactions_shown()),
        prefix_key=prefix_key_of(message_json),
    )


def build_snapshot(
    repo: GitRepo,
    commit: str | None,
    limits: SnapshotLimits,
    preamble: str = PREAMBLE,
    budget: WindowBudget | None = None,
) -> Snapshot:
    """Read the commit's tree from the object database and render it, fitted to ``budget`` if given.

    Blocking (run it in a thread); with an exact measure it asks the upstream's tokenizer.
    """
    content = SnapshotContent()
    if commit is not None:
        entries = select_entries(repo.ls_tree(commit), limits, content)
        blobs = repo.read_blobs([e.oid for e in entries])
        try:
            fill_blocks(entries, blobs, limits, content)
        finally:
            blobs.close()
    footer = fit_to_window(commit, content, limits, preamble, budget) if budget is not None else None
    return render_snapshot(commit, content, limits, preamble, footer)


def with_history(
    base: Snapshot, head: str, tail_blocks: Sequence[tuple[str, str]], tail_tokens: int = 0, tail_redacted: int = 0
) -> Snapshot:
    """The base snapshot with the history blocks ((commit, block) pairs) appended, its JSON extended."""
    assert base.message_json.endswith(MESSAGE_END)
    start = len(base.message_json) - len(MESSAGE_END)
    encoded, regions = encode_regions(((block, f"commit {commit}") for commit, block in tail_blocks), start)
    history = "".join(block for _, block in tail_blocks)
    return Snapshot(
        commit=head,
        message_json=b"".join([memoryview(base.message_json)[:start], *encoded, MESSAGE_END]),  # one copy, not two
        file_count=base.file_count,
        symlink_count=base.symlink_count,
        skipped_count=base.skipped_count,
        base_commit=base.commit,
        tail_commits=len(tail_blocks),
        regions=base.regions + tuple(regions),
        history_start=start,
        history_chars=len(history),
        fit=base.fit,
        outline_count=base.outline_count,
        tail_tokens=tail_tokens,
        redacted=base.redacted + tail_redacted,
        prefix_key=base.prefix_key,
    )


def path_at(snapshot: Snapshot, offset: int) -> str | None:
    """What holds byte ``offset`` of the snapshot's message: a path, "commit <id>", or None."""
    index = bisect.bisect_right(snapshot.regions, offset, key=lambda region: region[0]) - 1
    if index < 0 or offset >= len(snapshot.message_json) - len(MESSAGE_END):
        return None
    return snapshot.regions[index][1]


_COMPARE_BLOCK = 1 << 20


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
