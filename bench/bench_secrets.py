"""Secret redaction: the scanner's speed and what it costs a cold build of message 1 (issue 15).

On this Python's standard library as a repository (about 40 MB, as in ``bench_fit.py``) plus the
planted corpus of ``tests/secret_corpus.py``, or a clone of ``--repo PATH``, prints, measured in
this run:

- the scanner's speed over every text file, each scanned once by a fresh scanner, as a build
  calls it (Hyperscan's prefilter, then RE2 on the files that may hold a secret): MB/s (goal
  >= 100 MB/s);
- what it found, by kind: in the standard library these are its own test keys (PEM files under
  test/); every planted secret must be among them and none of the bait;
- a cold build of message 1 (no budget: every file read, rendered and encoded) with redaction
  on against off, alternated seven times: the median ratio of adjacent pairs (goal <= 1.1x).

Usage: .venv/bin/python bench/bench_secrets.py [--repo PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_fit import corpus_or_clone
from scout_diff_cache.context.secrets import SecretScanner
from scout_diff_cache.context.snapshot import SnapshotLimits, build_snapshot
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.settings import Settings
from scout_diff_cache.text import is_binary
from secret_corpus import BAIT, PLANTED, planted_files

GOAL_MB_PER_SECOND = 100
GOAL_BUILD_RATIO = 1.1
ROUNDS = 7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="a git repository to clone and plant the corpus into")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scout-bench-secrets-") as tmp:
        repo = corpus_or_clone(Path(tmp), args.repo)
        repo.write({f"planted/{path}": text for path, text in {**planted_files(), **BAIT}.items()})
        head = repo.commit_all("plant the secret corpus")
        git = GitRepo(str(repo.path))
        settings = Settings(git_repo_path=str(repo.path))
        path_filter = PathFilter.build((), settings.use_default_excludes)
        entries = [e for e in git.ls_tree(head) if e.kind == "blob" and not path_filter.excludes(e.path)]
        blobs = [(e, data) for e, data in zip(entries, git.read_blobs([e.oid for e in entries]), strict=True)]
        texts = [(entry.path, entry.oid, data) for entry, data in blobs if not is_binary(data)]
        total = sum(len(data) for _, _, data in texts)

        scanner = SecretScanner()
        started = time.perf_counter()
        found = [(path, redaction) for path, oid, data in texts for redaction in scanner.redact(path, data, oid=oid)[1]]
        seconds = time.perf_counter() - started
        rate = total / 1e6 / seconds
        print(
            f"repository {args.repo or 'stdlib corpus'} + the planted corpus at {head[:12]}: {len(texts):,} text files"
        )
        print(
            f"scanner: {total / 1e6:.1f} MB in {seconds:.2f} s = {rate:.0f} MB/s (goal >= {GOAL_MB_PER_SECOND} MB/s) "
            f"{'MET' if rate >= GOAL_MB_PER_SECOND else 'NOT MET'}"
        )
        planted_found = Counter(r.kind for path, r in found if path.startswith(b"planted/"))
        elsewhere = Counter(r.kind for path, r in found if not path.startswith(b"planted/"))
        bait = [path for path, _ in found if path.removeprefix(b"planted/").decode() in BAIT]
        expected = Counter(planted.kind for planted in PLANTED)
        print(
            f"planted: {sum(planted_found.values())} found of {len(PLANTED)} "
            f"({'all' if planted_found >= expected else 'NOT all'} kinds); bait redacted: {len(bait)}"
        )
        print(f"found in the rest of the repository: {dict(sorted(elsewhere.items())) or 'nothing'}")

        off = SnapshotLimits(settings.max_file_bytes, settings.max_snapshot_bytes, path_filter)
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(ROUNDS):
            # A fresh scanner for every build: its memo must not make the later builds free.
            for name, limits in (("off", off), ("on", dataclasses.replace(off, secrets=SecretScanner()))):
                started = time.perf_counter()
                snapshot = build_snapshot(git, head, limits)
                times[name].append(time.perf_counter() - started)
        # Adjacent builds share the machine's state (this VM's speed drifts by 30% within a minute):
        # the ratio of each on/off pair, and their median.
        ratios = sorted(on / off for on, off in zip(times["on"], times["off"], strict=True))
        ratio = statistics.median(ratios)
        print(
            f"cold build of message 1 ({snapshot.size / 1e6:.1f} MB, {snapshot.redacted} redacted): with redaction "
            f"vs without, median of {ROUNDS} adjacent pairs {ratio:.2f}x (pairs {ratios[0]:.2f}-{ratios[-1]:.2f}x; "
            f"best {min(times['on']):.2f} vs {min(times['off']):.2f} s) (goal <= {GOAL_BUILD_RATIO}x) "
            f"{'MET' if ratio <= GOAL_BUILD_RATIO else 'NOT MET'}"
        )


if __name__ == "__main__":
    main()
