"""Secrets never reach the model: every file, patch and commit message is scanned before it is sent.

Each secret found (``secret_rules.py``) is replaced in place by ``[redacted KIND]``: a pure
function of the content, so message 1 keeps its bytes on every replica and restart and the
cache holds. A secret spanning lines (a PEM block) keeps its line count: the placeholder, then
empty lines (a patch line keeps its ``+``/``-`` prefix), so line numbers and hunk counts hold.

Vendor formats are taken as found; *generic* ones (a secret-looking name assigned a value) only
when the value looks random: long enough, at least two kinds of characters with a digit (or
three kinds), enough entropy, and not a placeholder (``<your-api-key>``, ``${TOKEN}``), a
hex digest (git ids, checksums) or a UUID. Allow-listed paths are not scanned; allow-listed
values are never redacted. Results are memoized per content, so a blob is scanned once.

Scanning: Hyperscan (where it runs) tells which files may hold a secret at all, and RE2 (every
rule in one automaton) finds the spans in those; worker threads scan ahead of the build.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import re2

from ..git.exclusions import PathFilter
from ..memo import ContentMemo
from ..text import display
from .secret_rules import GENERIC_KINDS, GENERIC_RULES, RULES, URL_KIND, VENDOR_RULES


def _hyperscan() -> Any:
    """The hyperscan module, or None: it is x86-64 only, and elsewhere RE2 scans every file itself."""
    try:
        return importlib.import_module("hyperscan")
    except ImportError:
        return None


hyperscan = _hyperscan()

PLACEHOLDER = "[redacted {kind}]"
COMMIT_MESSAGE = b"(commit message)"  # the "path" of a redaction in a commit's message
MAX_LISTED = 200  # redactions named at the end of a message; the rest are counted
_HEX = re.compile(rb"[0-9a-fA-F]+")
_DOTTED_NAME = re.compile(rb"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?")
_UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PLACEHOLDER_MARKERS = (
    b"example", b"your", b"placeholder", b"changeme", b"change_me", b"dummy", b"sample", b"redacted",
    b"xxxx", b"****", b"....", b"todo", b"fixme", b"<", b">", b"${", b"{{", b"%(", b"$(",
)  # fmt: skip
MIN_ENTROPY_BITS = 3.0  # per character
SCAN_BATCH = 32  # files per scanning task
SCAN_THREADS = 2  # tasks scanning at once, ahead of the build that uses them
AUTOMATON_BYTES = 64 << 20  # RE2's memory for one rule set: its DFA stays cached (8 MB default: 1.5x slower)
_HUNK = re.compile(rb"@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")


class Prefilter:
    """Which files can hold a secret at all: Hyperscan runs every rule at once, about 1 GB/s (SIMD),
    and only files with a match anywhere go to RE2 for the exact spans (in a repository, a few
    percent). A rule it cannot compile (a user's pattern in syntax it lacks) turns it off."""

    def __init__(self, engine: Any, patterns: Sequence[str]) -> None:
        self._engine = engine  # the hyperscan module
        expressions, flags = [], []
        for pattern in patterns:
            modifiers = re.match(r"\(\?([ims]+)\)", pattern)
            flag = engine.HS_FLAG_SINGLEMATCH
            for letter in modifiers.group(1) if modifiers else "":
                flag |= {"i": engine.HS_FLAG_CASELESS, "m": engine.HS_FLAG_MULTILINE}.get(letter, 0)
                flag |= engine.HS_FLAG_DOTALL if letter == "s" else 0
            expressions.append(pattern[modifiers.end() if modifiers else 0 :].encode())
            flags.append(flag)
        self._database = engine.Database()
        self._database.compile(expressions=expressions, ids=list(range(len(expressions))), flags=flags)
        self._scratch = threading.local()  # one scratch space per thread

    def may_hold(self, data: bytes) -> bool:
        scratch = getattr(self._scratch, "space", None)
        if scratch is None:
            scratch = self._scratch.space = self._engine.Scratch(self._database)
        found = []

        def matched(*_: object) -> bool:
            found.append(True)
            return True  # stop at the first match

        with contextlib.suppress(self._engine.ScanTerminated):
            self._database.scan(data, match_event_handler=matched, scratch=scratch)
        return bool(found)


@functools.lru_cache(maxsize=8)
def prefilter(patterns: tuple[str, ...]) -> Prefilter | None:
    """The prefilter for these rules, compiled once per process (0.05-0.08 s; it is thread-safe)."""
    engine = hyperscan
    if engine is None:
        return None
    try:
        return Prefilter(engine, patterns)
    except engine.error:  # a pattern Hyperscan does not take: RE2 scans every file
        return None


class SecretPatternError(ValueError):
    """An extra pattern is not valid RE2 or has more than one group."""


@dataclass(frozen=True)
class Redaction:
    """One secret replaced: where (path, line) and what kind; never its value."""

    path: bytes
    line: int
    kind: str


def entropy_bits(value: bytes) -> float:
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def looks_random(value: bytes) -> bool:
    """Whether a value assigned to a secret-looking name is likely a real secret."""
    lowered = value.lower()
    if len(value) < 8 or any(marker in lowered for marker in _PLACEHOLDER_MARKERS) or value[:1] in b"$%*[(":
        return False
    if _HEX.fullmatch(value) or _UUID.fullmatch(value):
        return False  # git object ids, checksums, digests, UUIDs
    if b"://" in value or _DOTTED_NAME.fullmatch(value):
        return False  # a URL (its password has its own rule) or code (settings.SECRET_KEY)
    kinds = [
        any(65 <= b <= 90 for b in value),
        any(97 <= b <= 122 for b in value),
        any(48 <= b <= 57 for b in value),
        any(not (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122) for b in value),
    ]
    if not (kinds[2] and sum(kinds) >= 2) and sum(kinds) < 3:
        return False
    return entropy_bits(value) >= MIN_ENTROPY_BITS


def _compiled(rules: Sequence[tuple[str, str]]) -> Any:
    options = re2.Options()
    options.max_mem = AUTOMATON_BYTES
    return re2.compile("|".join(f"(?:{pattern})" for _, pattern in rules).encode(), options)


class SecretScanner:
    """Finds and replaces secrets; equal scanners (same settings) compare and hash equal."""

    def __init__(
        self, allow_paths: Sequence[str] = (), allow_values: Sequence[str] = (), extra_patterns: Sequence[str] = ()
    ) -> None:
        self.key = (tuple(allow_paths), tuple(allow_values), tuple(extra_patterns))
        custom = [(f"custom-{index + 1}", _one_group(pattern)) for index, pattern in enumerate(extra_patterns)]
        # Every rule in one automaton (the user's apart: their groups are theirs). A generic value that
        # is rejected is searched again for a vendor secret or a URL password inside it.
        self._sets: list[tuple[list[str], Any]] = [([kind for kind, _ in RULES], _compiled(RULES))]
        if custom:
            self._sets.append(([kind for kind, _ in custom], _compiled(custom)))
        self._prefilter = prefilter(tuple(pattern for _, pattern in (*RULES, *custom)))
        inner = [*VENDOR_RULES, *(rule for rule in GENERIC_RULES if rule[0] == URL_KIND)]
        self._inner = ([kind for kind, _ in inner], _compiled(inner))
        self._allow_values = frozenset(value.encode() for value in allow_values)
        self._allow_paths = PathFilter(tuple(allow_paths)) if allow_paths else None
        self._memo: ContentMemo[tuple[bytes, tuple[tuple[int, str], ...]]] = ContentMemo(65536)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretScanner) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def redact(
        self, path: bytes, data: bytes, patch: bool = False, oid: str | None = None
    ) -> tuple[bytes, tuple[Redaction, ...]]:
        """``data`` with every secret replaced, and where they were (lines of ``data``).

        ``oid``: git's id of ``data`` when it is a blob, so the memo needs no hash of its own.
        """
        if self._allow_paths is not None and self._allow_paths.excludes(path):
            return data, ()
        if oid is not None and not patch:
            key = b"blob " + oid.encode()
        else:
            key = ContentMemo.key(data + (b"\0patch" if patch else b""))
        redacted, found = self._memo.get_or_make(key, lambda: self._scan(data, patch))
        return redacted, tuple(Redaction(path, line, kind) for line, kind in found)

    def redact_patch(self, path: bytes, patch: bytes) -> tuple[bytes, tuple[Redaction, ...]]:
        """A patch redacted, each redaction at its line in the file (in the old file for a removed line)."""
        redacted, found = self.redact(path, patch, patch=True)
        if not found:
            return redacted, found
        lines = file_lines(patch)
        return redacted, tuple(Redaction(r.path, lines.get(r.line, r.line), r.kind) for r in found)

    def _scan(self, data: bytes, patch: bool) -> tuple[bytes, tuple[tuple[int, str], ...]]:
        if self._prefilter is not None and not self._prefilter.may_hold(data):
            return data, ()
        spans: list[tuple[int, int, str]] = []
        for kinds, regex in self._sets:
            for match in regex.finditer(data):
                found = self._accepted(data, match, kinds)
                if found is not None and not any(found[0] < end and start < found[1] for start, end, _ in spans):
                    spans.append(found)
        if not spans:
            return data, ()
        spans.sort()
        pieces, found_at, position = [], [], 0
        for start, end, kind in spans:
            pieces += [data[position:start], _replacement(data[start:end], kind, patch)]
            found_at.append((data.count(b"\n", 0, start) + 1, kind))
            position = end
        pieces.append(data[position:])
        return b"".join(pieces), tuple(found_at)

    def _accepted(self, data: bytes, match: Any, kinds: list[str]) -> tuple[int, int, str] | None:
        """The span to redact and its kind; a generic value holding a vendor secret is that vendor's."""
        group = match.lastindex
        if group is None:
            return None
        start, end = match.span(group)
        value, kind = data[start:end], kinds[group - 1]
        if kind in GENERIC_KINDS:  # a vendor token as a password or an assigned value is that vendor's
            inner_kinds, inner_regex = self._inner
            inner = inner_regex.search(value)
            if inner is not None and inner.lastindex is not None:
                inner_start, inner_end = inner.span(inner.lastindex)
                start, end, kind = start + inner_start, start + inner_end, inner_kinds[inner.lastindex - 1]
                value = data[start:end]
        if kind in GENERIC_KINDS and not looks_random(value):
            return None
        return None if value in self._allow_values else (start, end, kind)


def scan_ahead[T, R](redact: Callable[[T, bytes], R], items: Iterable[tuple[T, bytes]]) -> Generator[R]:
    """``redact`` over the items, in order, run ahead in worker threads, SCAN_BATCH items a task.

    RE2 lets go of the GIL while it scans: a snapshot build reads, decodes and encodes the next
    files meanwhile. Batches keep the pool's own cost per file small.
    """

    def run(batch: list[tuple[T, bytes]]) -> list[R]:
        return [redact(item, data) for item, data in batch]

    with ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="scout-secrets") as pool:
        pending: deque[Future[list[R]]] = deque()
        try:
            batch: list[tuple[T, bytes]] = []
            for item in items:
                batch.append(item)
                if len(batch) == SCAN_BATCH:
                    pending.append(pool.submit(run, batch))
                    batch = []
                if len(pending) > SCAN_THREADS:
                    yield from pending.popleft().result()
            if batch:
                pending.append(pool.submit(run, batch))
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _one_group(pattern: str) -> str:
    quiet = re2.Options()
    quiet.log_errors = False  # the error is raised, with its reason; RE2 would also print it to stderr
    try:
        groups = re2.compile(pattern.encode(), quiet).groups
    except re2.error as e:
        raise SecretPatternError(f"{pattern!r} is not a valid RE2 pattern: {e}") from None
    if groups > 1:
        raise SecretPatternError(f"{pattern!r} has {groups} groups; give one (the part to redact) or none")
    return pattern if groups == 1 else f"({pattern})"


def _replacement(secret: bytes, kind: str, patch: bool) -> bytes:
    """The placeholder, then one empty line per line the secret spanned (in a patch, its prefix kept)."""
    rest = secret.split(b"\n")[1:]
    kept = [line[:1] if patch and line[:1] in (b"+", b"-", b" ") else b"" for line in rest]
    return b"\n".join([PLACEHOLDER.format(kind=kind).encode(), *kept])


def file_lines(patch: bytes) -> dict[int, int]:
    """Patch line number -> the file's line number (the old file's for a removed line)."""
    mapping: dict[int, int] = {}
    old = new = 0
    for number, line in enumerate(patch.split(b"\n"), 1):
        hunk = _HUNK.match(line)
        if hunk:
            old, new = int(hunk.group(1)), int(hunk.group(2))
        elif line[:1] == b"-" and not line.startswith(b"--- "):
            mapping[number], old = old, old + 1
        elif line[:1] in (b"+", b" ") and not line.startswith(b"+++ "):
            mapping[number], old, new = new, old + (line[:1] == b" "), new + 1
    return mapping


def redaction_listing(redactions: Iterable[Redaction]) -> str:
    """The lines that end a message in which secrets were redacted ("" when none were)."""
    found = sorted(set(redactions), key=lambda r: (r.path, r.line, r.kind))
    if not found:
        return ""
    lines = [f"{display(r.path)}:{r.line} {r.kind}" for r in found[:MAX_LISTED]]
    if len(found) > MAX_LISTED:
        lines.append(f"and {len(found) - MAX_LISTED} more")
    return (
        f'<redacted_secrets count="{len(found)}">\nSecrets found in this message were replaced by '
        "[redacted KIND] (path:line kind; the values are never sent):\n" + "\n".join(lines) + "\n</redacted_secrets>\n"
    )
