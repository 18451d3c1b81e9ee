"""The snapshot message as text: commit, counts, left-out files, history commits, and its paths.

A 40 MB snapshot is read where it lies in the request body, in its JSON-encoded form: only the
footer, the block headers and the history are decoded. Where the blocks are comes from the regions
the proxy recorded when it built the snapshot (``SnapshotIndex``); a body it has no regions for (a
flow loaded from a file) is scanned for block header lines instead, and a line inside a file that
looks like one is then listed too (the section says so when the counts disagree).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..context.framing import MESSAGE_HEAD, TRIMMED_SNAPSHOT_PREFIX, decode_content, encoded_content
from ..context.snapshot import APPEND_PREAMBLE, PREAMBLE, Snapshot
from ..text import display, short_commit
from .format import count, inline

KEPT_INDEXES = 16
Regions = tuple[tuple[int, str | None], ...]

# A line of the snapshot that starts a block, in the JSON-encoded text: an encoded newline, the
# line's encoded characters (any byte but a backslash, or an escape other than \n), the next newline.
_ENCODED_BLOCK_LINE = re.compile(rb"\\n(<(?:file|symlink) path=(?:[^\\]|\\[^n])*)(?=\\n)")
# A file line whose path needs no escape, the common case: no need to decode it.
_ENCODED_PLAIN_FILE_LINE = re.compile(rb'<file path=\\"([^\\]*)\\">')
_ENCODED_SYMLINK_START = encoded_content("<symlink path=")
_ENCODED_FOOTER_START = b"\\n<snapshot_info>\\n"
_ENCODED_PREAMBLE = encoded_content(PREAMBLE)
_ENCODED_APPEND_PREAMBLE = encoded_content(APPEND_PREAMBLE)
_BASE_LINE_BYTES = 128  # append_preamble's first line: "Base commit: <id>\n"
_ENCODED_TRIMMED_PREFIX = encoded_content(TRIMMED_SNAPSHOT_PREFIX)
_ENCODED_HISTORY_START = b'</snapshot_info>\\n<commit id=\\"'
_FOOTER_END = "</snapshot_info>\n"
_FOOTER_COUNTS = re.compile(r"files included: (\d+), symbolic links: (\d+), bytes: (\d+)")
_LISTING_COUNT = re.compile(r"\((\d+)\)$")
_HISTORY_BLOCK = re.compile(
    r'^<commit id="([0-9a-f]+)"(?: parent="[0-9a-f]+")?>\n<message>\n(.*?)</message>\n(.*?)</commit>\n',
    re.DOTALL | re.MULTILINE,
)
_CHANGED_PATH = re.compile(
    r'^(?:diff --git a/(.*) b/|<(?:file|deleted|symlink|binary|submodule) path=("(?:[^"\\]|\\.)*"))', re.M
)


@dataclass(frozen=True)
class EncodedText:
    """Text in JSON-encoded form (the inside of a string literal), lying at ``buffer[start:end]``.

    A 40 MB snapshot is read where it lies in the request body: slicing it out would copy it.
    """

    buffer: bytes
    start: int
    end: int

    @classmethod
    def of(cls, text: str) -> EncodedText:
        encoded = json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "replace")
        return cls(encoded, 0, len(encoded))

    def startswith(self, prefix: bytes) -> bool:
        return self.buffer.startswith(prefix, self.start, self.end)

    def decode(self) -> str:
        return decode_content(self.buffer[self.start : self.end])


@dataclass(frozen=True)
class BlockIndex:
    """Where a snapshot's blocks start in its message (offsets in ``message_json``), as built."""

    size: int
    regions: Regions
    history_start: int | None


class SnapshotIndex:
    """The block regions of the last snapshots the proxy sent, by (commit, size); small, bounded."""

    def __init__(self, keep: int = KEPT_INDEXES) -> None:
        self._keep = keep
        self._indexes: OrderedDict[tuple[str | None, int], BlockIndex] = OrderedDict()

    def remember(self, snapshot: Snapshot) -> None:
        key = (snapshot.commit, snapshot.size)
        self._indexes[key] = BlockIndex(snapshot.size, snapshot.regions, snapshot.history_start)
        self._indexes.move_to_end(key)
        while len(self._indexes) > self._keep:
            self._indexes.popitem(last=False)

    def lookup(self, proxy_metadata: Mapping[str, Any]) -> BlockIndex | None:
        commit, size = proxy_metadata.get("commit"), proxy_metadata.get("snapshot_bytes")
        if not isinstance(size, int) or not (commit is None or isinstance(commit, str)):
            return None
        return self._indexes.get((commit, size))


@dataclass
class SnapshotSummary:
    """What the snapshot's ``<snapshot_info>`` footer says, and the paths of its blocks."""

    footer_found: bool = False
    commit: str | None = None
    file_count: int | None = None
    symlink_count: int | None = None
    block_bytes: int | None = None
    left_out: list[tuple[str, list[str]]] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)  # "path", or "path -> target" for a symlink
    scanned: bool = True  # entries found by scanning the text for header lines, not from recorded regions

    @property
    def left_out_count(self) -> int:
        """The files the footer lists, by the counts in its titles (a long listing names only the first)."""
        total = 0
        for title, items in self.left_out:
            counted = _LISTING_COUNT.search(title)
            total += int(counted.group(1)) if counted else len(items)
        return total


def summarise_snapshot(text: EncodedText, index: BlockIndex | None = None) -> SnapshotSummary:
    """Summarise a snapshot from its JSON-encoded text (the base part: no history blocks)."""
    summary = SnapshotSummary()
    buffer = text.buffer
    # From the preamble's last newline: its example block is not a block, the first real one follows.
    scan_from = text.start
    if text.startswith(_ENCODED_PREAMBLE):
        scan_from = text.start + len(_ENCODED_PREAMBLE) - 2
    else:
        at = buffer.find(
            _ENCODED_APPEND_PREAMBLE, text.start, text.start + _BASE_LINE_BYTES + len(_ENCODED_APPEND_PREAMBLE)
        )
        if at >= 0:
            scan_from = at + len(_ENCODED_APPEND_PREAMBLE) - 2
    footer_at = buffer.rfind(_ENCODED_FOOTER_START, scan_from, text.end)
    if footer_at >= 0 and not _escaped(buffer, footer_at):
        _read_footer(buffer[footer_at + 2 : text.end], summary)
    blocks_end = footer_at + 2 if summary.footer_found else text.end
    if index is not None:
        summary.entries = _entries_from_regions(text, index, blocks_end)
        summary.scanned = False
        return summary
    for match in _ENCODED_BLOCK_LINE.finditer(buffer, scan_from, blocks_end):
        if not _escaped(buffer, match.start()):
            entry = _block_entry(match.group(1))
            if entry is not None:
                summary.entries.append(entry)
    return summary


def _entries_from_regions(text: EncodedText, index: BlockIndex, blocks_end: int) -> list[str]:
    """The block paths, as recorded: a line inside a file that looks like a header is never one."""
    message_start = text.start - len(MESSAGE_HEAD)
    offsets = [offset for offset, _ in index.regions] + [index.size]
    entries = []
    for (offset, label), next_offset in zip(index.regions, offsets[1:], strict=True):
        start = message_start + offset
        if label is None or start >= blocks_end:
            continue  # the preamble, the footer, the history
        if text.buffer.startswith(_ENCODED_SYMLINK_START, start):
            line = text.buffer[start : message_start + next_offset].removesuffix(b"\\n")
            entries.append(_block_entry(line) or _display_path(label))
        else:
            entries.append(_display_path(label))
    return entries


def _escaped(encoded: bytes, index: int) -> bool:
    """True if the byte at ``index`` follows an odd run of backslashes (it is part of an escape)."""
    run = 0
    while index - run > 0 and encoded[index - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def _read_footer(encoded_footer: bytes, summary: SnapshotSummary) -> None:
    try:
        footer = decode_content(encoded_footer)
    except ValueError:
        return
    if not footer.endswith(_FOOTER_END):
        return
    summary.footer_found = True
    for line in footer.splitlines()[1:-1]:
        if line.startswith("commit: "):
            commit = line.removeprefix("commit: ")
            summary.commit = None if commit.startswith("none") else commit
        elif counts := _FOOTER_COUNTS.fullmatch(line):
            summary.file_count, summary.symlink_count, summary.block_bytes = map(int, counts.groups())
        elif line.startswith("  ") and summary.left_out:
            summary.left_out[-1][1].append(line[2:])
        elif line.endswith(":"):
            summary.left_out.append((line.removesuffix(":"), []))


def _block_entry(encoded_line: bytes) -> str | None:
    """The path of a ``<file path=P>`` line, or "path -> target" of a ``<symlink path=P target=T/>`` line."""
    if plain := _ENCODED_PLAIN_FILE_LINE.fullmatch(encoded_line):
        return _display_path(plain.group(1).decode("utf-8", "replace"))
    decoder = json.JSONDecoder()
    try:
        line = decode_content(encoded_line)
        if line.startswith("<file path=") and line.endswith(">"):
            path, end = decoder.raw_decode(line, len("<file path="))
            if end == len(line) - 1 and isinstance(path, str):
                return _display_path(path)
        elif line.startswith("<symlink path=") and line.endswith("/>"):
            path, end = decoder.raw_decode(line, len("<symlink path="))
            if line.startswith(" target=", end):
                target, end = decoder.raw_decode(line, end + len(" target="))
                if end == len(line) - 2 and isinstance(path, str) and isinstance(target, str):
                    return f"{_display_path(path)} -> {_display_path(target)}"
    except ValueError:
        pass
    return None


def _display_path(path: str) -> str:
    return display(path.encode("utf-8", "replace"))


def window_lines(proxy_metadata: Mapping[str, Any]) -> list[str]:
    """How the snapshot and the request were fitted to the model's window, as the proxy recorded it."""
    lines = []
    snapshot_fit, fit = proxy_metadata.get("snapshot_fit"), proxy_metadata.get("fit")
    if isinstance(snapshot_fit, Mapping) and snapshot_fit.get("cut_to_fit"):
        lines.append(
            f"cut to fit the window: {inline(snapshot_fit.get('planned_tokens'))} of the repository's "
            f"{inline(snapshot_fit.get('repository_tokens'))} tokens; "
            f"{inline(snapshot_fit.get('outlined_files'))} files outlined, "
            f"{inline(snapshot_fit.get('omitted_files'))} omitted "
            f"(counted by: {inline(snapshot_fit.get('counted_by'))})"
        )
    if isinstance(fit, Mapping):
        lines.append(
            f"window: {inline(fit.get('window_tokens'))} tokens ({inline(fit.get('window_source'))}); this request: "
            f"message 1 {inline(fit.get('context_tokens'))}, diff {inline(fit.get('diff_tokens'))}"
            f"{' (cut to fit)' if fit.get('diff_cut') else ''}, messages {inline(fit.get('messages_tokens'))}, "
            f"answer {inline(fit.get('answer_tokens'))} (counted by: {inline(fit.get('counted_by'))})"
        )
    return lines


def snapshot_section(
    position: int,
    text: EncodedText,
    message_bytes: int,
    proxy_metadata: Mapping[str, Any],
    index: BlockIndex | None = None,
) -> tuple[list[str], list[str]]:
    """The snapshot's section, and the section listing its paths (shown last: thousands of lines).

    A snapshot trimmed from memory shows its placeholder and what the proxy recorded when it was sent.
    """
    if text.startswith(_ENCODED_TRIMMED_PREFIX):
        lines = [f"=== messages[{position}] system · snapshot, trimmed from memory ===", text.decode()]
        sent = [
            f"{label} {inline(proxy_metadata[key])}"
            for key, label in (("commit", "commit"), ("snapshot_files", "files:"), ("snapshot_bytes", "bytes:"))
            if key in proxy_metadata
        ]
        if sent:
            lines.append("as sent: " + ", ".join(sent))
        return lines, []
    if index is not None and index.size != message_bytes:
        index = None  # not this message (an edited body): scan instead
    history_start = proxy_metadata.get("history_start")
    if index is not None:
        history_start = None if index.history_start is None else text.start - len(MESSAGE_HEAD) + index.history_start
    text, history = split_history(text, history_start)
    summary = summarise_snapshot(text, index)
    lines = [f"=== messages[{position}] system · snapshot · {message_bytes:,} bytes ==="]
    if not summary.footer_found:
        lines.append("no <snapshot_info> footer found: commit and left-out files unknown")
    else:
        lines.append(f"commit: {summary.commit or 'none (no commits yet)'}")
        lines.append(
            f"files: {count(summary.file_count)}, symbolic links: {count(summary.symlink_count)}, "
            f"bytes of file blocks: {count(summary.block_bytes)}"
        )
        lines.extend(window_lines(proxy_metadata))
        left_out = summary.left_out_count
        lines.append(f"left out: {left_out:,}" if left_out else "left out: none")
        for title, items in summary.left_out:
            lines.append(f"  {title}:")
            lines.extend(f"    {item}" for item in items)
        expected = (summary.file_count or 0) + (summary.symlink_count or 0)
        if summary.scanned and len(summary.entries) != expected:
            lines.append(
                f"note: {len(summary.entries):,} block headers found in the text, the footer counts "
                f"{expected:,} (a file may hold a line that looks like a block header)"
            )
    if history is not None:
        lines += _history_lines(history)
    lines.append(f"paths: {len(summary.entries):,}, listed at the end")
    return lines, [f"=== snapshot paths ({len(summary.entries):,}) ===", *summary.entries]


def split_history(text: EncodedText, history_start: object) -> tuple[EncodedText, str | None]:
    """The snapshot's base part and its history blocks (append-only layout), decoded; None without.

    ``history_start`` is where the blocks start in the buffer, as recorded; without it (an edited
    body), the first footer end followed by a commit block is taken.
    """
    if isinstance(history_start, int) and text.start < history_start < text.end:
        start = history_start
    else:
        found = text.buffer.find(_ENCODED_HISTORY_START, text.start, text.end)
        if found < 0:
            return text, None
        start = found + len(b"</snapshot_info>\\n")
    return EncodedText(text.buffer, text.start, start), decode_content(text.buffer[start : text.end])


def _history_lines(history: str) -> list[str]:
    """One line per commit block: id, subject, changed files (the patches are not repeated here)."""
    blocks = _HISTORY_BLOCK.findall(history)
    lines = [f"history since the base: {len(blocks)} commits, {len(history.encode()):,} bytes"]
    for commit, message, changes in blocks:
        subject = message.partition("\n")[0]
        paths = [plain or _display_path(json.loads(quoted)) for plain, quoted in _CHANGED_PATH.findall(changes)]
        shown = ", ".join(paths[:8]) + (f", ... {len(paths) - 8} more" if len(paths) > 8 else "")
        lines.append(f"  {short_commit(commit)} {subject}  [{shown or 'no files'}]")
    return lines
