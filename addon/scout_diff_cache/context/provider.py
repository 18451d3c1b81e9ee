"""The repository context for a request: the snapshot of HEAD's commit and the working diff against it.

Both are computed off the event loop and shared: a snapshot is built once per commit (concurrent
requests wait for the same build), and HEAD plus the diff are re-read only when the change
monitor's generation moved. HEAD and the diff are read together, the diff against HEAD's commit
id (not the symbolic ``HEAD``), so a request never pairs a snapshot with a diff of another commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

from ..git.repo import GitRepo
from ..git.watcher import ChangeMonitor, Generation
from ..text import human_bytes, short_commit
from .history import History, HistoryLimits
from .snapshot import APPEND_PREAMBLE, Snapshot, SnapshotLimits, build_snapshot, with_history
from .workdiff import DiffLimits, WorkingDiff, build_working_diff

logger = logging.getLogger(__name__)

KEPT_SNAPSHOTS = 2

SnapshotLookup = Literal["hit", "wait", "miss"]


class BuildObserver(Protocol):
    """Told about snapshot lookups and builds (the proxy's metrics)."""

    def snapshot_lookup(self, result: SnapshotLookup) -> None: ...

    def snapshot_built(self, snapshot: Snapshot, seconds: float) -> None: ...


class _Unobserved:
    def snapshot_lookup(self, result: SnapshotLookup) -> None:
        pass

    def snapshot_built(self, snapshot: Snapshot, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class RepoContext:
    snapshot: Snapshot
    diff: WorkingDiff


@dataclass(frozen=True)
class _WorkState:
    commit: str | None
    diff: WorkingDiff


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
    ) -> None:
        self.repo = repo
        # None: the per-commit layout (every commit is its own base, no history).
        self.history = History(repo, snapshot_limits, history_limits) if history_limits else None
        self.observer: BuildObserver = observer or _Unobserved()
        self.monitor = monitor
        self.snapshot_limits = snapshot_limits
        self.diff_limits = diff_limits
        self.snapshot_builds = 0
        self._state: tuple[Generation, _WorkState] | None = None
        self._state_task: tuple[Generation, asyncio.Task[_WorkState]] | None = None
        self._snapshots: OrderedDict[str | None, Snapshot] = OrderedDict()
        self._builds: dict[str | None, asyncio.Task[Snapshot]] = {}
        self._bases: OrderedDict[str, Snapshot] = OrderedDict()
        self._base_builds: dict[str, asyncio.Task[Snapshot]] = {}

    async def current(self) -> RepoContext:
        state = await self._work_state()
        return RepoContext(await self.snapshot(state.commit), state.diff)

    async def snapshot(self, commit: str | None) -> Snapshot:
        """The snapshot of ``commit``, built at most once however many requests ask at the same time."""
        if commit in self._snapshots:
            self._snapshots.move_to_end(commit)
            self.observer.snapshot_lookup("hit")
            return self._snapshots[commit]
        task = self._builds.get(commit)
        if task is None:
            self.observer.snapshot_lookup("miss")
            task = asyncio.create_task(self._build(commit), name=f"scout snapshot {commit}")
            self._builds[commit] = task
        else:
            self.observer.snapshot_lookup("wait")
        return await asyncio.shield(task)

    async def _build(self, commit: str | None) -> Snapshot:
        started = time.perf_counter()
        try:
            if self.history is None or commit is None:
                snapshot = await asyncio.to_thread(build_snapshot, self.repo, commit, self.snapshot_limits)
            else:
                snapshot = await self._with_history(commit)
        finally:
            del self._builds[commit]
        self.snapshot_builds += 1
        self.observer.snapshot_built(snapshot, time.perf_counter() - started)
        self._snapshots[commit] = snapshot
        while len(self._snapshots) > KEPT_SNAPSHOTS:
            self._snapshots.popitem(last=False)
        base = ""
        if snapshot.tail_commits:
            base = f", base {short_commit(snapshot.base_commit)} + {snapshot.tail_commits} commits"
        logger.info(
            "snapshot %s built in %.2f s: %d files, %d symlinks, %d left out, %s%s",
            short_commit(commit),
            time.perf_counter() - started,
            snapshot.file_count,
            snapshot.symlink_count,
            snapshot.skipped_count,
            human_bytes(snapshot.size),
            base,
        )
        return snapshot

    async def _with_history(self, head: str) -> Snapshot:
        """Append-only layout: the base snapshot (built once per base) and the blocks after it."""
        assert self.history is not None
        tail = await asyncio.to_thread(self.history.tail_for, head)
        base = await self._base(tail.base)
        if not tail.commits:
            return base
        return await asyncio.to_thread(with_history, base, head, list(zip(tail.commits, tail.blocks, strict=True)))

    async def _base(self, commit: str) -> Snapshot:
        if commit in self._bases:
            self._bases.move_to_end(commit)
            return self._bases[commit]
        task = self._base_builds.get(commit)
        if task is None:
            task = asyncio.create_task(self._build_base(commit), name=f"scout base snapshot {commit}")
            self._base_builds[commit] = task
        return await asyncio.shield(task)

    async def _build_base(self, commit: str) -> Snapshot:
        try:
            base = await asyncio.to_thread(build_snapshot, self.repo, commit, self.snapshot_limits, APPEND_PREAMBLE)
        finally:
            del self._base_builds[commit]
        self._bases[commit] = base
        while len(self._bases) > KEPT_SNAPSHOTS:
            self._bases.popitem(last=False)
        return base

    async def _work_state(self) -> _WorkState:
        if not (self.repo.toplevel.is_dir() and self.repo.git_dir.is_dir()):
            # Moving the watched directory itself raises no event the watcher counts; two stats
            # per request make a moved or deleted repository fail now, not at the next resync.
            self.monitor.note_change()
        generation = self.monitor.generation
        if self._state is not None and self._state[0] == generation:
            return self._state[1]
        if self._state_task is None or self._state_task[0] != generation:
            task = asyncio.create_task(self._read_state(generation), name="scout working state")
            self._state_task = (generation, task)
        return await asyncio.shield(self._state_task[1])

    async def _read_state(self, generation: Generation) -> _WorkState:
        try:
            state = await asyncio.to_thread(self._read_state_blocking)
        except BaseException:
            if self._state_task is not None and self._state_task[0] == generation:
                self._state_task = None  # let the next request try again
            raise
        self._state = (generation, state)
        return state

    def _read_state_blocking(self) -> _WorkState:
        commit = self.repo.head_commit()
        return _WorkState(commit, build_working_diff(self.repo, commit, self.diff_limits))
