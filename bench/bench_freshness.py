"""Freshness and cost of the working-diff state, on a generated repository (default 5000 files).

Measures, in one run:
- edit -> visible: time from writing a file to the first ContextProvider.current() whose diff
  shows the edit (the goal is about 200 ms);
- the per-request cost when nothing changed (cached state) against a forced re-read (what a
  `git status`-per-request design would pay every time), and their ratio.

Usage: python bench/bench_freshness.py [--files N] [--edits E]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from scout_diff_cache.context.provider import ContextProvider
from scout_diff_cache.context.snapshot import SnapshotLimits
from scout_diff_cache.context.workdiff import DiffLimits, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.git.watcher import ChangeMonitor

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    "PATH": "/usr/bin:/bin:/usr/local/bin",
}


def make_repo(root: Path, files: int) -> None:
    for index in range(files):
        path = root / f"dir{index % 50:02d}" / f"file{index:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"line one of {index}\nline two\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
        subprocess.run(["git", *args], cwd=root, env=GIT_ENV, check=True)


async def measure(root: Path, edits: int) -> None:
    repo = GitRepo(str(root))
    monitor = ChangeMonitor(repo.toplevel, [repo.git_dir, repo.common_dir])
    monitor.start()
    path_filter = PathFilter.build((), True)
    limits = DiffLimits(524288, 1048576, path_filter)
    provider = ContextProvider(repo, monitor, SnapshotLimits(524288, 1 << 30, path_filter), limits)
    try:
        await provider.current()
        latencies = []
        target = root / "dir07" / "file00007.txt"
        for edit in range(edits):
            marker = f"edit number {edit}"
            started = time.perf_counter()
            target.write_text(f"{marker}\n")
            while marker not in (await provider.current()).diff.text:
                await asyncio.sleep(0.001)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)

        cached = []
        for _ in range(200):
            started = time.perf_counter()
            await provider.current()
            cached.append(time.perf_counter() - started)
        reread = []
        head = repo.head_commit()
        for _ in range(10):
            started = time.perf_counter()
            await asyncio.to_thread(build_working_diff, repo, head, limits)
            reread.append(time.perf_counter() - started)
    finally:
        monitor.stop()

    print(
        f"edit -> visible: median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms over {edits} edits"
    )
    print(f"per request, unchanged repo: median {statistics.median(cached) * 1e6:.0f} us")
    print(f"per request, forced re-read: median {statistics.median(reread) * 1000:.1f} ms")
    print(f"ratio re-read/cached: {statistics.median(reread) / statistics.median(cached):.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--edits", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scout-bench-") as tmp:
        make_repo(Path(tmp), args.files)
        asyncio.run(measure(Path(tmp), args.edits))


if __name__ == "__main__":
    main()
