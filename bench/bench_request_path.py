"""Per-request cost of the rewrite: splicing pre-encoded bytes vs re-encoding the whole body.

Builds a real snapshot of a generated repository (default: 4000 files, about 40 MB), then times,
in one run, the three ways a request could be rewritten:

- splice: parse the client's small body, join the cached snapshot/diff JSON bytes in (ours);
- json:   json.loads the full upstream body and json.dumps it again (the naive rewrite);
- parse:  just json.loads of the full body (a lower bound for any rewrite that parses it).

Prints medians and the ratios json/splice and parse/splice (machines are noisy: compare ratios).
Usage: python bench/bench_request_path.py [--files N] [--file-kb K] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from scout_diff_cache.chat.request import assemble_body, parse_chat_request
from scout_diff_cache.context.framing import system_message_json
from scout_diff_cache.context.snapshot import SnapshotLimits, build_snapshot
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
    "PATH": "/usr/bin:/bin:/usr/local/bin",
}


def generate_repo(root: Path, files: int, file_kb: int) -> None:
    rng = random.Random(42)
    alphabet = string.ascii_letters + string.digits + "    ()[]{}=+-*/.,:;\"'"
    for index in range(files):
        path = root / f"pkg{index % 40:02d}" / f"module_{index:05d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        size = 0
        while size < file_kb * 1024:
            line = "".join(rng.choice(alphabet) for _ in range(rng.randint(10, 90)))
            lines.append(line)
            size += len(line) + 1
        path.write_text("\n".join(lines) + "\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
        subprocess.run(["git", *args], cwd=root, env=GIT_ENV, check=True)


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--file-kb", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scout-bench-") as tmp:
        root = Path(tmp)
        generate_repo(root, args.files, args.file_kb)
        repo = GitRepo(str(root))
        commit = repo.head_commit()
        limits = SnapshotLimits(524288, 1 << 30, PathFilter.build((), True))
        started = time.perf_counter()
        snapshot = build_snapshot(repo, commit, limits)
        build_seconds = time.perf_counter() - started

    diff_json = system_message_json("The working tree is clean.\n")
    client_body = json.dumps(
        {"model": "llama-4-scout", "stream": True, "messages": [{"role": "user", "content": "Where is X done?"}]}
    ).encode()
    spliced = assemble_body(parse_chat_request(client_body), [snapshot.message_json, diff_json]).body

    def splice() -> bytes:
        return assemble_body(parse_chat_request(client_body), [snapshot.message_json, diff_json]).body

    def reencode() -> bytes:
        body = json.loads(spliced)
        body["messages"][-1]["content"] += ""
        return json.dumps(body, ensure_ascii=False).encode()

    def parse_only() -> object:
        return json.loads(spliced)

    t_splice = median_seconds(splice, args.repeat)
    t_json = median_seconds(reencode, args.repeat)
    t_parse = median_seconds(parse_only, args.repeat)
    print(f"snapshot: {snapshot.file_count} files, {snapshot.size / 1e6:.1f} MB JSON, built in {build_seconds:.2f} s")
    print(
        f"median per request: splice {t_splice * 1000:.1f} ms, json re-encode {t_json * 1000:.1f} ms, "
        f"parse only {t_parse * 1000:.1f} ms"
    )
    print(f"ratio json/splice: {t_json / t_splice:.1f}x")
    print(f"ratio parse/splice: {t_parse / t_splice:.1f}x")


if __name__ == "__main__":
    main()
