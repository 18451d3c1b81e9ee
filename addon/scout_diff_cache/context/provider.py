"""The repository context for a request: the snapshot of HEAD's commit and the working diff against it.

Both are computed off the event loop and shared: a snapshot is built once per commit (concurrent
requests wait for the same build), and HEAD plus the diff are re-read only when the change
monitor's generation moved. HEAD and the diff are read together, the diff against HEAD's commit
id (not the symbolic ``HEAD``), so a request never pairs a snapshot with a diff of another commit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

from ..git.repo import GitRepo
from ..git.watcher import ChangeMonitor, Generation
from ..text import human_bytes, short_commit
from .fit import WindowBudget
from .history import History, HistoryLimits, tail_share
from .repobuilds import RepositoryBuilds
from .snapshot import PREAMBLE, Snapshot, SnapshotLimits, append_preamble, build_snapshot, with_history
from .workdiff import DiffLimits, WorkingDiff, build_working_diff

logger = logging.getLogger(__name__)

KEPT_SNAPSHOTS = 2

SnapshotLookup = Literal["hit", "wait", "miss"]
# A snapshot's cache key: its commit and its budget's key (None: built without one).
_Key = tuple[str | None, tuple[int, str, tuple[str, ...]] | None]


def fit_summary(snapshot: Snapshot) -> str:
    """For the log: how message 1 was fitted to the window ("" when it was built without a budget)."""
    fit = snapshot.fit
    if fit is None:
        return ""
    if not fit.cut:
        return f"; fits the window: {snapshot.planned_tokens} of {fit.budget} tokens ({fit.measure})"
    return (
        f"; cut to fit {fit.budget} tokens: {snapshot.file_count} files in full, {snapshot.outline_count} outlined, "
        f"{len(fit.omitted)} omitted, of {fit.repository_tokens} tokens ({fit.measure})"
    )


class BuildObserver(Protocol):
    """Told about snapshot lookups and builds (the proxy's metrics)."""

    def snapshot_lookup(self, result: SnapshotLookup) -> None: ...

    def snapshot_built(self, snapshot: Snapshot, seconds: float) -> None: ...


class _Unobserved:
    def snapshot_lookup(self, result: SnapshotLookup) -> None:
        pass

    def snapshot_built(self, snapshot: Snapshot, seconds: float) -> None:
        pass


def _consume_error(task: asyncio.Future[Snapshot]) -> None:
    """A build no request waits for any more: its error was (or will be) reported to those that asked."""
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class RepoContext:
    snapshot: Snapshot
    diff: WorkingDiff


@dataclass(frozen=True)
class _WorkState:
    commit: str | None
    diff: WorkingDiff


@dataclass(frozen=True)
class _StateRead:
    """A read of the working state in flight; ``head`` is known before the diff is."""

    generation: Generation
    head: asyncio.Future[str | None]
    task: asyncio.Task[_WorkState]


class ContextProvider:
    def __init__(
        self,
        repo: GitRepo,
        monitor: ChangeMonitor,
        snapshot_limits: SnapshotLimits,
        diff_limits: DiffLimits,
        *,
        observer: BuildObserver | None = None,
        history_limits: HistoryLimits | None = None,
        builds: RepositoryBuilds | None = None,
    ) -> None:
        self.repo = repo
        self.builds = builds  # bases, blocks and depths kept on disk across restarts (None: BUILD_CACHE_DIR=off)
        # None: the per-commit layout (every commit is its own base, no history).
        self.history = History(repo, snapshot_limits, history_limits, builds) if history_limits else None
        self.observer: BuildObserver = observer or _Unobserved()
        self.monitor = monitor
        self.snapshot_limits = snapshot_limits
        self.diff_limits = diff_limits
        self.snapshot_builds = 0
        self._state: tuple[Generation, _WorkState] | None = None
        self._state_task: _StateRead | None = None
        self._snapshots: OrderedDict[_Key, Snapshot] = OrderedDict()
        self._builds: dict[_Key, asyncio.Task[Snapshot]] = {}
        self._bases: OrderedDict[_Key, Snapshot] = OrderedDict()
        self._base_builds: dict[_Key, asyncio.Task[Snapshot]] = {}

    async def current(self, budget: WindowBudget | None = None) -> RepoContext:
        """HEAD's message 1 (fitted to ``budget``, message 1's share of the window) and the working diff.

        When the working state must be read again, message 1 for the HEAD read first is looked up
        (or built) meanwhile: a cold start reads the diff and builds the snapshot at the same time.
        """
        known = self._known_state()
        if known is not None:
            return RepoContext(await self.snapshot(known.commit, budget), known.diff)
        read = self._state_read()
        head = await asyncio.shield(read.head)
        early = asyncio.ensure_future(self.snapshot(head, budget)) if head is not None else None
        try:
            state = await asyncio.shield(read.task)
        finally:
            if early is not None and not early.done():
                early.add_done_callback(_consume_error)
        if early is not None and state.commit == head:
            return RepoContext(await early, state.diff)
        return RepoContext(await self.snapshot(state.commit, budget), state.diff)

    async def snapshot(self, commit: str | None, budget: WindowBudget | None = None) -> Snapshot:
        """The snapshot of ``commit``, built at most once however many requests ask at the same time."""
        key = (commit, budget.key if budget else None)
        if key in self._snapshots:
            self._snapshots.move_to_end(key)
            self.observer.snapshot_lookup("hit")
            return self._snapshots[key]
        task = self._builds.get(key)
        if task is None:
            self.observer.snapshot_lookup("miss")
            task = asyncio.create_task(self._build(commit, budget, key), name=f"scout snapshot {commit}")
            self._builds[key] = task
        else:
            self.observer.snapshot_lookup("wait")
        return await asyncio.shield(task)

    async def _build(self, commit: str | None, budget: WindowBudget | None, key: _Key) -> Snapshot:
        started = time.perf_counter()
        try:
            if commit is None:
                snapshot = await asyncio.to_thread(
                    build_snapshot, self.repo, None, self.snapshot_limits, PREAMBLE, budget
                )
            elif self.history is None:
                snapshot = await asyncio.to_thread(self._read_or_build, commit, PREAMBLE, budget)
            else:
                snapshot = await self._with_history(commit, budget)
        finally:
            del self._builds[key]
        self.snapshot_builds += 1
        self.observer.snapshot_built(snapshot, time.perf_counter() - started)
        self._snapshots[key] = snapshot
        while len(self._snapshots) > KEPT_SNAPSHOTS:
            self._snapshots.popitem(last=False)
        base = ""
        if snapshot.tail_commits:
            base = f", base {short_commit(snapshot.base_commit)} + {snapshot.tail_commits} commits"
        logger.info(
            "snapshot %s built in %.2f s: %d files, %d symlinks, %d left out, %s%s%s",
            short_commit(commit),
            time.perf_counter() - started,
            snapshot.file_count,
            snapshot.symlink_count,
            snapshot.skipped_count,
            human_bytes(snapshot.size),
            base,
            fit_summary(snapshot),
        )
        return snapshot

    async def _with_history(self, head: str, budget: WindowBudget | None) -> Snapshot:
        """Append-only layout: the base snapshot (built once per base) and the blocks after it."""
        assert self.history is not None
        base_budget = tail_share(budget, self.history.limits)[0] if budget is not None else None
        # The base tried first is built while the tail's blocks are rendered; it is the one
        # used unless the tail is too large for it (then it stays cached for the next HEADs).
        candidate = await asyncio.to_thread(self.history.first_candidate, head)
        early = asyncio.ensure_future(self._base(candidate, base_budget))
        try:
            tail = await asyncio.to_thread(self.history.tail_for, head, budget)
        finally:
            if not early.done():
                early.add_done_callback(_consume_error)
        base = await (early if tail.base == candidate else self._base(tail.base, base_budget))
        if not tail.commits:
            return base
        blocks = list(zip(tail.commits, tail.blocks, strict=True))
        return await asyncio.to_thread(with_history, base, head, blocks, tail.tokens, tail.redacted)

    async def _base(self, commit: str, budget: WindowBudget | None) -> Snapshot:
        key = (commit, budget.key if budget else None)
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key]
        task = self._base_builds.get(key)
        if task is None:
            task = asyncio.create_task(self._build_base(commit, budget, key), name=f"scout base snapshot {commit}")
            self._base_builds[key] = task
        return await asyncio.shield(task)

    async def _build_base(self, commit: str, budget: WindowBudget | None, key: _Key) -> Snapshot:
        try:
            base = await asyncio.to_thread(self._read_or_build, commit, append_preamble(commit), budget)
        finally:
            del self._base_builds[key]
        self._bases[key] = base
        while len(self._bases) > KEPT_SNAPSHOTS:
            self._bases.popitem(last=False)
        return base

    def _read_or_build(self, commit: str, preamble: str, budget: WindowBudget | None) -> Snapshot:
        build = functools.partial(build_snapshot, self.repo, commit, self.snapshot_limits, preamble, budget)
        return build() if self.builds is None else self.builds.snapshot(commit, preamble, budget, build)

    def _known_state(self) -> _WorkState | None:
        """The working state already read for the monitor's current generation, if any."""
        if not (self.repo.toplevel.is_dir() and self.repo.git_dir.is_dir()):
            # Moving the watched directory itself raises no event the watcher counts; two stats
            # per request make a moved or deleted repository fail now, not at the next resync.
            self.monitor.note_change()
        if self._state is not None and self._state[0] == self.monitor.generation:
            return self._state[1]
        return None

    async def _work_state(self) -> _WorkState:
        known = self._known_state()
        if known is not None:
            return known
        return await asyncio.shield(self._state_read().task)

    def _state_read(self) -> _StateRead:
        """The read of HEAD and the diff for the monitor's generation, started if it was not."""
        generation = self.monitor.generation
        if self._state_task is None or self._state_task.generation != generation:
            head: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._read_state(generation, head), name="scout working state")
            self._state_task = _StateRead(generation, head, task)
        return self._state_task

    async def _read_state(self, generation: Generation, head: asyncio.Future[str | None]) -> _WorkState:
        try:
            commit = await asyncio.to_thread(self.repo.head_commit)
            head.set_result(commit)
            diff = await asyncio.to_thread(build_working_diff, self.repo, commit, self.diff_limits)
        except BaseException:
            if not head.done():
                head.set_result(None)  # unknown: nothing is built early; the error comes from this task
            if self._state_task is not None and self._state_task.generation == generation:
                self._state_task = None  # let the next request try again
            raise
        state = _WorkState(commit, diff)
        self._state = (generation, state)
        return state
