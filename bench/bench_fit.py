"""Fitting a repository to real context windows: what goes in, and what planning costs (issue 12).

For windows of 128k, 1M and 3.6M tokens (``--windows``), on a real repository (``--repo PATH``,
read through git plumbing only) or, by default, a corpus made of this Python's standard library
(code, tests, docs and data: about 40 MB, committed to a temp repository removed after), prints:

- the repository's tokens, message 1's share and the tokens planned for it;
- files in full, outlined and omitted, and the tokens of each tier in full / outlined / omitted;
- the time to plan cold (a fresh build with the budget), against the same build without a budget
  and against ``git archive HEAD > /dev/null``;
- the time to plan again after a new commit that edits one file (the per-commit layout rebuilds
  message 1; outlines and reference scans are cached per file content): goal, the re-plan costs
  no more than the build without a budget, so planning is O(changed files).

Tokens are estimated (BYTES_PER_TOKEN, as the proxy does without the model server's tokenizer):
no server is needed. ``--tokenize-url URL`` counts with a running model server's own tokenizer
instead (vLLM, SGLang or llama.cpp ``POST /tokenize``; ``--tokenize-model`` for vLLM's
``UPSTREAM_MODEL``), as the proxy does: one request per file block, 8 at a time, cached per block,
so the first window's cold plan includes counting every block and the later ones do not.

Usage: .venv/bin/python bench/bench_fit.py [--repo PATH] [--windows N ...] [--tokenize-url URL]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from scout_diff_cache.context.fit import clear_caches
from scout_diff_cache.context.snapshot import PREAMBLE, Snapshot, SnapshotLimits, build_snapshot
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.observe.tokenizer import TokenizerEndpoint, UpstreamTokenizer, probe_tokenizer
from scout_diff_cache.preview import plan_lines
from scout_diff_cache.settings import Settings
from scout_diff_cache.wiring import estimate, window_budget
from support import Repo

WINDOWS = (131072, 1048576, 3670016)


def stdlib_corpus(root: Path) -> Repo:
    """This Python's standard library (less site-packages and compiled files) as one commit."""
    source = Path(sysconfig.get_paths()["stdlib"])
    target = root / "stdlib"
    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns("site-packages", "__pycache__", "*.pyc", "*.so", "config-*")
    )
    repo = Repo(target)
    subprocess.run(["git", "init", "-q", str(target)], check=True)
    repo.commit_all("the standard library")
    return repo


def corpus_or_clone(root: Path, given: Path | None) -> Repo:
    """The stdlib corpus, or a clone of ``given`` (a benchmark commits into it, never into the original)."""
    return stdlib_corpus(root) if given is None else clone_of(given, root / "clone")


def clone_of(given: Path, target: Path) -> Repo:
    """A full copy of ``given`` at ``target``: the benchmark's commits never reach the original."""
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(given), str(target)], check=True)
    return Repo(target)


def tokenizer(url: str, model: str | None) -> UpstreamTokenizer:
    endpoint = TokenizerEndpoint(url.rstrip("/"), model, None, True)
    probe = probe_tokenizer(endpoint)
    if probe is None:
        raise SystemExit(f"{url} offers no POST /tokenize this proxy knows")
    return UpstreamTokenizer(endpoint, probe.kind, probe.probe_tokens)


def timed(action: object, *args: object) -> tuple[float, object]:
    started = time.perf_counter()
    result = action(*args)  # type: ignore[operator]
    return time.perf_counter() - started, result


def git_archive_seconds(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["git", "-C", str(path), "archive", "HEAD"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def report(window: int, snapshot: Snapshot, share: int) -> None:
    print(f"\n=== window {window:,} tokens: message 1's share {share:,} ===")
    print("\n".join(plan_lines(snapshot)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="a git repository to read (default: the stdlib corpus)")
    parser.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    parser.add_argument("--tokenize-url", help="count with this model server's tokenizer (scheme://host:port)")
    parser.add_argument("--tokenize-model", help="the model name its tokenizer takes (vLLM: UPSTREAM_MODEL)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scout-bench-fit-") as tmp:
        if args.repo is None:
            repo = stdlib_corpus(Path(tmp))
            path = repo.path
        else:
            path = args.repo.resolve()
            # A new commit is made in a clone, never in the repository given.
            subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(path), f"{tmp}/clone"], check=True)
            repo = Repo(Path(tmp) / "clone")
        settings = Settings(git_repo_path=str(path))
        limits = SnapshotLimits(
            settings.max_file_bytes, settings.max_snapshot_bytes, PathFilter.build((), settings.use_default_excludes)
        )
        git_repo = GitRepo(str(repo.path))
        head = git_repo.head_commit()
        archive = git_archive_seconds(repo.path)
        plain_seconds, plain = timed(build_snapshot, git_repo, head, limits)
        assert isinstance(plain, Snapshot)
        print(f"repository: {path} at {head}")
        print(
            f"git archive HEAD > /dev/null: {archive:.2f} s; message 1 without a budget: {plain_seconds:.2f} s, "
            f"{plain.size / 1e6:.1f} MB, {plain.file_count:,} files"
        )
        edited = sorted(p for p in (repo.path).rglob("*.py") if ".git" not in p.parts)[len(plain.regions) // 2]
        measure = estimate(settings) if args.tokenize_url is None else tokenizer(args.tokenize_url, args.tokenize_model)
        for window in args.windows:
            budget = window_budget(settings, window, measure)
            clear_caches()
            cold, snapshot = timed(build_snapshot, git_repo, head, limits, PREAMBLE, budget)
            assert isinstance(snapshot, Snapshot)
            report(window, snapshot, budget.tokens)
            edited.write_text(edited.read_text() + f"\n# edited for window {window}\n")
            commit = repo.commit_all(f"edit for window {window}")
            again, _ = timed(build_snapshot, git_repo, commit, limits, PREAMBLE, budget)
            plain_again, _ = timed(build_snapshot, git_repo, commit, limits)
            print(
                f"plan cold {cold:.2f} s = {cold / archive:.1f}x git archive, {cold / plain_seconds:.2f}x the "
                f"build without a budget"
            )
            print(
                f"after a one-file commit {again:.2f} s = {again / plain_again:.2f}x the build without a budget "
                f"(goal <= 1.3x: O(changed files)) {'MET' if again <= 1.3 * plain_again else 'NOT MET'}"
            )


if __name__ == "__main__":
    main()
