from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scout_diff_cache.context.provider import ContextProvider
from scout_diff_cache.context.snapshot import SnapshotLimits
from scout_diff_cache.context.workdiff import DiffLimits
from scout_diff_cache.git.errors import GitError
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.git.watcher import ChangeMonitor
from scout_diff_cache.text import human_bytes
from support import Repo


def make_provider(repo: Repo, watch: bool = True) -> ContextProvider:
    git_repo = GitRepo(str(repo.path))
    monitor = ChangeMonitor(git_repo.toplevel, [git_repo.git_dir, git_repo.common_dir])
    if watch:
        monitor.start()
    path_filter = PathFilter.build((), True)
    return ContextProvider(
        git_repo, monitor, SnapshotLimits(10_000, 1_000_000, path_filter), DiffLimits(10_000, 100_000, path_filter)
    )


async def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_concurrent_requests_share_one_snapshot_build(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({f"src/f{i}.py": f"x = {i}\n" * 50 for i in range(200)})
    provider = make_provider(repo)
    try:
        contexts = await asyncio.gather(*(provider.current() for _ in range(32)))
        assert provider.snapshot_builds == 1
        assert len({c.snapshot.message_json for c in contexts}) == 1
        assert contexts[0].snapshot.file_count == 200
    finally:
        provider.monitor.stop()


async def test_state_is_reread_only_after_a_change(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.txt": "one\n"})
    provider = make_provider(repo)
    head_reads: list[str | None] = []
    read_head = provider.repo.head_commit

    def counting_head_commit() -> str | None:
        head_reads.append(read_head())
        return head_reads[-1]

    provider.repo.head_commit = counting_head_commit  # type: ignore[method-assign]
    try:
        await provider.current()
        reads = len(head_reads)
        for _ in range(20):
            await provider.current()
        assert len(head_reads) == reads, "an unchanged repo must not be re-read per request"

        (repo.path / "a.txt").write_text("two\n")
        await wait_for(lambda: provider.monitor.generation[0] > 0)
        context = await provider.current()
        assert "+two" in context.diff.text
        assert len(head_reads) == reads + 1
    finally:
        provider.monitor.stop()


async def test_a_commit_moves_the_snapshot_and_cleans_the_diff(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.txt": "one\n"})
    provider = make_provider(repo)
    try:
        first = await provider.current()
        repo.write({"a.txt": "two\n"})
        new_head = repo.commit_all("second")
        await wait_for(lambda: provider.monitor.generation[0] > 0)
        second = await provider.current()
        assert second.snapshot.commit == new_head != first.snapshot.commit
        assert "two" in second.snapshot.text
        assert "clean" in second.diff.text
        assert provider.snapshot_builds == 2
    finally:
        provider.monitor.stop()


async def test_without_a_watcher_edits_still_show_within_the_poll_interval(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.txt": "one\n"})
    provider = make_provider(repo, watch=False)
    assert not provider.monitor.watching
    await provider.current()
    (repo.path / "a.txt").write_text("changed\n")
    await asyncio.sleep(0.15)
    assert "+changed" in (await provider.current()).diff.text


async def test_git_ignored_bookkeeping_does_not_count_as_a_change(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.txt": "one\n"})
    provider = make_provider(repo)
    try:
        monitor = provider.monitor
        git_dir = str(provider.repo.git_dir)
        assert not monitor.is_relevant(git_dir + "/objects/ab/cdef")
        assert not monitor.is_relevant(git_dir + "/index.lock")
        assert not monitor.is_relevant(git_dir + "/logs/HEAD")
        assert monitor.is_relevant(git_dir + "/HEAD")
        assert monitor.is_relevant(git_dir + "/refs/heads/main")
        assert monitor.is_relevant(str(repo.path / "src" / "x.py"))
        # reading the repository (what serving requests does) produces no change events
        await provider.current()
        before = monitor.generation[0]
        for _ in range(3):
            provider.repo.run("diff-index", "HEAD")
            provider.repo.run("ls-files", "--others", "--exclude-standard")
        await asyncio.sleep(0.2)
        assert monitor.generation[0] == before
    finally:
        provider.monitor.stop()


async def test_a_failed_read_is_retried_by_the_next_request(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo({"a.txt": "one\n"})
    provider = make_provider(repo, watch=False)
    hidden = tmp_path / "hidden-git"
    (repo.path / ".git").rename(hidden)
    with pytest.raises(GitError):
        await provider.current()
    hidden.rename(repo.path / ".git")
    await asyncio.sleep(0.15)
    context = await provider.current()
    assert context.snapshot.file_count == 1


async def test_a_lock_file_in_the_work_tree_is_content_not_git_bookkeeping(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"Cargo.lock": "one\n", "poetry.lock": "one\n"})
    provider = make_provider(repo)
    try:
        monitor = provider.monitor
        assert monitor.is_relevant(str(provider.repo.toplevel / "Cargo.lock"))
        assert not monitor.is_relevant(str(provider.repo.git_dir / "refs" / "heads" / "main.lock"))
        before = monitor.generation[0]
        (repo.path / "poetry.lock").write_text("two\n")  # a plain write, no rename: only this path
        await wait_for(lambda: monitor.generation[0] > before)
    finally:
        provider.monitor.stop()


def inotify_masks() -> dict[int, list[int]]:
    """The event masks of this process's inotify watches, by inotify file descriptor (Linux)."""
    masks: dict[int, list[int]] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        masks[int(fd)] = [int(m, 16) for m in re.findall(r"^inotify wd:.* mask:([0-9a-f]+)", info, re.MULTILINE)]
    return masks


IN_ACCESS, IN_CLOSE_NOWRITE, IN_OPEN = 0x1, 0x10, 0x20


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="inotify (Linux) only")
async def test_reads_are_not_watched_and_watchdog_logs_nothing_per_event(make_repo: Callable[..., Repo]) -> None:
    """A burst of reads (an IDE, a build, our own git) must cost nothing: no read events, no log records.

    mitmproxy sets the root logger to DEBUG and hands every record to its event loop with one
    wake-up byte; per-event debug records from watchdog filled that pipe, and a SIGTERM arriving
    then was lost (see test_load.py for the end-to-end check).
    """
    repo = make_repo({f"src/f{i}.txt": f"{i}\n" for i in range(50)})
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name.startswith("watchdog"):
                records.append(record)

    root = logging.getLogger()
    handler, level = Collect(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # as mitmproxy sets it
    existing = set(inotify_masks())
    provider = make_provider(repo)
    try:
        masks = [m for fd, fd_masks in inotify_masks().items() if fd not in existing for m in fd_masks]
        assert len(masks) >= 3, masks  # the work tree, src/, .git and its subdirectories
        assert all(m & (IN_ACCESS | IN_CLOSE_NOWRITE | IN_OPEN) == 0 for m in masks), [hex(m) for m in masks]
        for _ in range(3):
            for path in repo.path.rglob("*"):
                if path.is_file():
                    path.read_bytes()
        await provider.current()  # git reads objects and the index
        (repo.path / "src" / "f1.txt").write_text("changed\n")
        await wait_for(lambda: provider.monitor.generation[0] > 0)
        await asyncio.sleep(0.1)
        assert not [r for r in records if r.levelno < logging.INFO], [r.getMessage() for r in records[:5]]
    finally:
        provider.monitor.stop()
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (41_700_000, "41.7 MB"), (3 * 10**9, "3.0 GB")]
)
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text
