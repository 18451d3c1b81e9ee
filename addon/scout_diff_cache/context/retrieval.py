"""Retrieval: the left-out files a question needs, found per request and sent in full after message 1.

When message 1 had to leave files out or outline them to fit the window, a question about one of
them would otherwise get a guess. ``Retriever`` keeps a search index (``search.py``) of exactly
those files, as they are at HEAD: built once per base (per fitted message 1) in a worker thread,
while requests go out without retrieval and say so, then updated in O(changed files) when HEAD
moves. ``fit_retrieved`` takes the best files in full within the tokens the request has room for
and makes the one system message that carries them. Message 1 never changes because of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..git.errors import GitError
from ..git.repo import MODE_SYMLINK, GitRepo, read_all
from ..text import display, human_bytes, is_binary, path_text, short_commit
from .fit import BLOCK_SLACK_TOKENS, TEMPLATE_TOKENS, FitReport
from .framing import system_message_json
from .outline import language_of
from .search import SearchIndex, definitions
from .secrets import Redaction, SecretScanner, redaction_listing
from .snapshot import Snapshot, SnapshotLimits, file_block
from .tokens import BYTE_BOUND, TokenMeasure

logger = logging.getLogger(__name__)

TEXT_START = "Files retrieved for the latest question"
MAX_NAMED_LEFT_OUT = 10  # files found but with no room, named in the message


@dataclass(frozen=True)
class Found:
    """A file found for a question, with its content at the index's commit and why it was found."""

    path: bytes
    oid: str
    content: bytes
    reason: str


@dataclass(frozen=True)
class Lookup:
    """What the index gave for a question: ``status`` is "ready", "index building", "index failed: ..."."""

    status: str
    found: tuple[Found, ...] = ()
    commit: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class IndexState:
    """For /health: the index of the current message 1."""

    status: str  # "ready", "building", "failed: ...", "none" (nothing left out yet)
    files: int = 0
    bytes: int = 0
    build_seconds: float = 0.0
    commit: str | None = None


class Retriever:
    """The search index of the files the current message 1 leaves out (or outlines), kept current."""

    def __init__(self, repo: GitRepo, limits: SnapshotLimits) -> None:
        self.repo = repo
        self.limits = limits
        self._fit: FitReport | None = None  # the fitted base the index is for (identity)
        self._index: SearchIndex | None = None
        self._build: asyncio.Task[None] | None = None
        self._failed = ""
        self._ready = IndexState("none")  # what state() reports once the index is built
        self._lock = threading.Lock()  # searches and updates run in worker threads

    def state(self) -> IndexState:
        """Without waiting for a search or an update in progress (called on the event loop)."""
        if self._build is not None and not self._build.done():
            return IndexState("building")
        if self._failed:
            return IndexState(f"failed: {self._failed}")
        return self._ready

    async def lookup(self, snapshot: Snapshot, question: str, sent: Mapping[bytes, str] | None = None) -> Lookup:
        """The files for ``question`` at the snapshot's commit, best first; Lookup("index building") meanwhile.

        ``sent``: files the conversation already holds (path: blob id), found again only once changed.
        """
        fit = snapshot.fit
        assert fit is not None and fit.cut and snapshot.commit is not None
        if self._fit is not fit:
            self.start(snapshot)
        if self._build is not None and not self._build.done():
            return Lookup("index building")
        if self._failed:
            return Lookup(f"index failed: {self._failed}")
        assert self._index is not None
        return await asyncio.to_thread(self._search, self._index, fit, snapshot.commit, question, sent or {})

    def close(self) -> None:
        """Stop waiting for a build in progress (its thread finishes on its own; its index is dropped)."""
        if self._build is not None:
            self._build.cancel()

    def start(self, snapshot: Snapshot) -> None:
        """Build the index for this message 1 in the background (the previous one is dropped)."""
        fit = snapshot.fit
        if fit is None or not fit.cut or snapshot.commit is None or self._fit is fit:
            return
        self._fit, self._index, self._failed, self._ready = fit, None, "", IndexState("none")
        if self._build is not None:
            self._build.cancel()  # the thread finishes, its index is dropped
        self._build = asyncio.create_task(
            self._run_build(snapshot.commit, fit, in_full(snapshot)), name="scout search index"
        )

    async def _run_build(self, commit: str, fit: FitReport, full: set[str]) -> None:
        started = time.perf_counter()
        try:
            index = await asyncio.to_thread(build_index, self.repo, commit, fit, full)
        except Exception as e:  # a git failure, or a bug: requests go on without retrieval, saying why
            if self._fit is fit:
                self._failed = str(e) if isinstance(e, GitError) else f"{type(e).__name__}: {e}"
            logger.warning("the search index of the left-out files could not be built: %s", e, exc_info=True)
            return
        if self._fit is fit:
            seconds = time.perf_counter() - started
            self._index = index
            self._ready = IndexState("ready", len(index), index.indexed_bytes, seconds, commit)
            logger.info(
                "search index of the %d left-out files (%s) built in %.2f s: questions about them get them in full",
                len(index),
                human_bytes(index.indexed_bytes),
                seconds,
            )

    def _search(
        self, index: SearchIndex, fit: FitReport, commit: str, question: str, sent: Mapping[bytes, str]
    ) -> Lookup:
        started = time.perf_counter()
        with self._lock:
            if index.commit != commit:
                try:
                    update_index(self.repo, index, commit, candidates(fit), self.limits)
                except GitError as e:
                    return Lookup(f"index update failed: {e}")
                if self._index is index:
                    self._ready = dataclasses.replace(
                        self._ready, files=len(index), bytes=index.indexed_bytes, commit=commit
                    )
            skip = [path for path, oid in sent.items() if index.oid_of(path) == oid]
            found = tuple(Found(hit.path, *index.file(hit.path), hit.reason) for hit in index.search(question, skip))
        return Lookup("ready", found, commit, time.perf_counter() - started)


def candidates(fit: FitReport) -> set[bytes]:
    """The files message 1 left out or gave as outlines: what retrieval can add in full."""
    return {item.path for item in fit.omitted} | {item.path for item in fit.outlined}


def in_full(snapshot: Snapshot) -> set[str]:
    """The paths (as text) of the files message 1's base gives in full."""
    outlined = {path_text(item.path) for item in snapshot.fit.outlined} if snapshot.fit else set()
    end = snapshot.history_start if snapshot.history_start is not None else len(snapshot.message_json)
    return {path for offset, path in snapshot.regions if path is not None and offset < end} - outlined


def build_index(repo: GitRepo, commit: str, fit: FitReport, full: set[str]) -> SearchIndex:
    """Blocking: the index of ``fit``'s left-out files as they are at ``commit``.

    ``full``: the paths message 1 gives in full (``in_full``): what their source files define is no
    reason to retrieve a file. Both sets passed message 1's limits: no sizes are asked for.
    """
    wanted = candidates(fit)
    entries = [entry for entry in repo.ls_tree(commit, sizes=False) if entry.kind == "blob"]
    entries = [entry for entry in entries if entry.mode != MODE_SYMLINK]
    left_out = [entry for entry in entries if entry.path in wanted]
    defined: set[bytes] = set()
    sources = [entry for entry in entries if language_of(entry.path) is not None and path_text(entry.path) in full]
    for data in read_all(repo, [entry.oid for entry in sources]):
        if not is_binary(data):
            defined |= definitions(data)
    index = SearchIndex(commit, frozenset(defined))
    for entry, data in zip(left_out, read_all(repo, [entry.oid for entry in left_out]), strict=True):
        if not is_binary(data):
            index.add(entry.path, entry.oid, data)
    index.seal()
    return index


def update_index(repo: GitRepo, index: SearchIndex, commit: str, wanted: set[bytes], limits: SnapshotLimits) -> None:
    """Blocking: bring the index from its commit to ``commit``, re-reading only the changed left-out files."""
    changed = [change for change in repo.commit_changes(index.commit, commit) if change.path in wanted]
    for change in changed:
        index.remove(change.path)
    kept = [change for change in changed if change.status != "D" and change.new_mode != MODE_SYMLINK]
    for change, data in zip(kept, read_all(repo, [change.new_oid for change in kept]), strict=True):
        if not is_binary(data) and len(data) <= limits.max_file_bytes:
            index.add(change.path, change.new_oid, data)
    index.seal()
    index.commit = commit


@dataclass(frozen=True)
class Retrieved:
    """The files that go in, the system message that carries them, and what was found but had no room."""

    files: tuple[Found, ...]
    tokens: int
    counted_by: str
    left_out: tuple[tuple[Found, int], ...]
    message_json: bytes


def retrieval_text(
    commit: str, blocks: Sequence[str], left_out: Sequence[tuple[Found, int]], redactions: Sequence[Redaction] = ()
) -> str:
    lines = [
        f"{TEXT_START}: files of the repository that the snapshot (message 1) left out or gave only as "
        f"outlines, in full, as they are at commit {commit}. Changes given in the working diff or in later "
        "messages apply to them.\n\n"
    ]
    lines += blocks
    if left_out:
        named = ", ".join(f"{display(found.path)} ({tokens} tokens)" for found, tokens in left_out[:MAX_NAMED_LEFT_OUT])
        more = len(left_out) - MAX_NAMED_LEFT_OUT
        lines.append(
            f"\nAlso found for this question but left out for lack of room: {named}"
            + (f" and {more} more" if more > 0 else "")
            + ".\n"
        )
    lines.append(redaction_listing(redactions))
    return "".join(lines)


def fit_retrieved(
    found: Sequence[Found], room: int, measure: TokenMeasure, commit: str, secrets: SecretScanner | None = None
) -> Retrieved | None:
    """Blocking: the found files, best first, in full while they fit in ``room`` tokens; None if none does.

    A file too large for what is left is passed over (and named); smaller ones after it still go in.
    With ``secrets``, the files are redacted first and the message lists where.
    """
    redacted = [
        secrets.redact(item.path, item.content, oid=item.oid) if secrets else (item.content, ()) for item in found
    ]
    blocks = [file_block(item.path, content) for item, (content, _) in zip(found, redacted, strict=True)]
    every = [redaction for _, found_there in redacted for redaction in found_there]
    fixed = retrieval_text(short_commit(commit), [], [(item, 10**9) for item in found], every)
    overhead = TEMPLATE_TOKENS + BYTE_BOUND.count([fixed])[0]
    counts = measure.count(blocks)  # counted, not bounded: the room is small, an exact count fills it
    chosen, left_out, used = [], [], overhead
    for item, block, tokens in zip(found, blocks, counts, strict=True):
        if used + tokens + BLOCK_SLACK_TOKENS <= room:
            chosen.append((item, block, tokens))
            used += tokens + BLOCK_SLACK_TOKENS
        else:
            left_out.append((item, tokens))
    if not chosen:
        return None
    files = tuple(item for item, _, _ in chosen)  # best first, for the headers and the log
    chosen.sort(key=lambda choice: choice[0].path)  # path order: the same files give the same bytes
    sent = {item.path for item, _, _ in chosen}
    shown = [redaction for redaction in every if redaction.path in sent]
    text = retrieval_text(short_commit(commit), [block for _, block, _ in chosen], left_out, shown)
    # What it holds as counted (the allowances above only made sure it fits): the files and its own lines.
    tokens = (
        sum(tokens for _, _, tokens in chosen) + measure.count([retrieval_text(short_commit(commit), [], left_out)])[0]
    )
    return Retrieved(files, tokens, measure.name, tuple(left_out), system_message_json(text))
