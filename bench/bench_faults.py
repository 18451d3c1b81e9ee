"""Upstream-fault figures through a real mitmdump, in one run (loopback only).

- 504 timing: for several UPSTREAM_TIMEOUT_MS values, how far after the deadline the 504
  arrives (error in ms and as a ratio of the deadline);
- client disconnect mid-stream -> upstream connection closed: latency over N runs;
- refused upstream: time to the 503 envelope.

Usage: python bench/bench_faults.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import Repo, free_port, run_proxy
from test_upstream_faults import CHAT, CHAT_BODY, faulty_upstream, stream_then_leave


def timeout_errors(work: Path, repo: Repo, deadlines_ms: list[int]) -> list[tuple[int, float]]:
    results = []
    with faulty_upstream() as upstream:
        upstream.mode = "stall"
        for deadline in deadlines_ms:
            env = {"GIT_REPO_PATH": str(repo.path), "UPSTREAM_TIMEOUT_MS": str(deadline)}
            with run_proxy(upstream.url, work / f"timeout{deadline}", env) as proxy:
                proxy.post(CHAT, CHAT_BODY)  # warm: snapshot built, probe path hot
                started = time.monotonic()
                result = proxy.post(CHAT, CHAT_BODY)
                elapsed = time.monotonic() - started
                assert result.status == 504, result.body
                results.append((deadline, elapsed * 1000 - deadline))
    return results


def disconnect_latencies(work: Path, repo: Repo, runs: int) -> list[float]:
    latencies = []
    with (
        faulty_upstream() as upstream,
        run_proxy(upstream.url, work / "disconnect", {"GIT_REPO_PATH": str(repo.path)}) as proxy,
    ):
        upstream.mode = "stream_until_client_leaves"
        for _ in range(runs):
            upstream.closed_at.clear()
            left_at = stream_then_leave(proxy.port)
            while not upstream.closed_at:
                time.sleep(0.0005)
            latencies.append((upstream.closed_at[0] - left_at) * 1000)
    return latencies


def refused_latency(work: Path, repo: Repo) -> float:
    with run_proxy(f"http://127.0.0.1:{free_port()}", work / "refused", {"GIT_REPO_PATH": str(repo.path)}) as proxy:
        proxy.post(CHAT, CHAT_BODY)
        started = time.monotonic()
        result = proxy.post(CHAT, CHAT_BODY)
        assert result.status == 503, result.body
        return (time.monotonic() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scout-bench-") as tmp:
        work = Path(tmp)
        repo = Repo.create(work / "repo", {"a.py": "x = 1\n" * 1000})
        for deadline, error in timeout_errors(work, repo, [300, 600, 1000]):
            print(f"504 at deadline {deadline} ms: +{error:.1f} ms late (ratio {(deadline + error) / deadline:.3f})")
        latencies = disconnect_latencies(work, repo, args.runs)
        print(
            f"client disconnect -> upstream closed: median {statistics.median(latencies):.1f} ms, "
            f"max {max(latencies):.1f} ms over {len(latencies)} runs"
        )
        print(f"refused upstream -> 503 envelope: {refused_latency(work, repo):.1f} ms")


if __name__ == "__main__":
    main()
