"""Soak: mitmdump's memory over many chat requests with a multi-megabyte snapshot, and the latency cost.

Generates a repository (default 400 files, about 4.5 MB of snapshot), starts a recording upstream
and mitmdump running the addon, both on 127.0.0.1 (the helpers of tests/support.py), and sends
``--requests`` small non-streaming chat requests from ``--clients`` threads. It prints mitmdump's
RSS (children included) every ``--interval`` requests and the ratio final / after the warm-up.
Then it sends ``--baseline-requests`` through the same kind of proxy with INJECT_CONTEXT=false (a
pass-through) and straight to the upstream, and prints latency median and p95 of each with the
ratios injecting / pass-through and injecting / direct. Machines differ: compare ratios, not
milliseconds. Every process it starts is stopped before it returns, on errors and Ctrl-C too.

Usage: .venv/bin/python bench/bench_soak.py [--requests N] [--clients C] [--files F] [--file-bytes B]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import (
    Repo,
    Upstream,
    generated_files,
    http_request,
    process_tree_rss,
    run_proxy,
    run_upstream,
)

CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "llama-4-scout", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {"content-type": "application/json"}


def timed_requests(base_url: str, count: int, clients: int, upstream: Upstream) -> list[float]:
    """Send ``count`` chat requests from ``clients`` threads; their latencies in seconds (all must be 200)."""

    def one(_: int) -> float:
        started = time.perf_counter()
        result = http_request("POST", base_url + CHAT, BODY, HEADERS)
        elapsed = time.perf_counter() - started
        if result.status != 200:
            raise RuntimeError(f"HTTP {result.status}: {result.body[:300]!r}")
        return elapsed

    pool = ThreadPoolExecutor(clients)
    try:
        latencies = list(pool.map(one, range(count)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, do not send the rest of the batch
    upstream.recorded.clear()  # the upstream keeps every body it received: multi-megabyte each
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def describe(name: str, latencies: list[float]) -> str:
    return (
        f"  {name:<13} median {statistics.median(latencies) * 1000:7.1f} ms   "
        f"p95 {percentile(latencies, 0.95) * 1000:7.1f} ms   ({len(latencies)} requests)"
    )


def in_batches(total: int, size: int, action: Callable[[int], None]) -> None:
    done = 0
    while done < total:
        step = min(size, total - done)
        action(step)
        done += step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="measured requests after the warm-up")
    parser.add_argument("--warmup", type=int, default=100, help="requests before the RSS baseline")
    parser.add_argument("--interval", type=int, default=100, help="print RSS every this many requests")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--files", type=int, default=400, help="files in the generated repository")
    parser.add_argument("--file-bytes", type=int, default=11_000, help="approximate size of each file")
    parser.add_argument("--baseline-requests", type=int, default=300, help="requests per latency baseline")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the with-blocks below stop mitmdump and the upstream.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    # Hermetic git for the generated repository: no user or system config (signing, hooks, templates).
    os.environ["GIT_CONFIG_GLOBAL"] = os.devnull
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
    with tempfile.TemporaryDirectory(prefix="scout-soak-") as tmp:
        root = Path(tmp)
        print(f"generating {args.files} files of about {args.file_bytes} bytes ...", flush=True)
        repo = Repo.create(root / "repo", generated_files(args.files, args.file_bytes))
        env = {"GIT_REPO_PATH": str(repo.path)}
        with run_upstream() as upstream:
            with run_proxy(upstream.url, root / "proxy", env) as proxy:
                health = http_request("GET", proxy.base_url + "/health").json()
                snapshot = health["snapshot"]
                print(
                    f"snapshot: {snapshot['bytes'] / 1e6:.1f} MB, {snapshot['files']} files; "
                    f"mitmdump pid {proxy.process.pid}, RSS {process_tree_rss(proxy.process.pid) / 1e6:.0f} MB"
                )
                latencies: list[float] = []

                def warm_batch(count: int) -> None:
                    timed_requests(proxy.base_url, count, args.clients, upstream)

                in_batches(args.warmup, args.interval, warm_batch)
                warm = process_tree_rss(proxy.process.pid)
                print(f"after warm-up ({args.warmup} requests): RSS {warm / 1e6:.0f} MB", flush=True)
                started = time.perf_counter()
                done = 0

                def measured_batch(count: int) -> None:
                    nonlocal done
                    latencies.extend(timed_requests(proxy.base_url, count, args.clients, upstream))
                    done += count
                    rss = process_tree_rss(proxy.process.pid)
                    print(
                        f"  {done:>6} requests: RSS {rss / 1e6:7.0f} MB  ({rss / warm:.2f} x after warm-up), "
                        f"{done / (time.perf_counter() - started):.0f} requests/s",
                        flush=True,
                    )

                in_batches(args.requests, args.interval, measured_batch)
                final = process_tree_rss(proxy.process.pid)
                builds = http_request("GET", proxy.base_url + "/health").json()["snapshot_builds"]
            with run_proxy(upstream.url, root / "passthrough", {**env, "INJECT_CONTEXT": "false"}) as passthrough:
                timed_requests(passthrough.base_url, 20, args.clients, upstream)
                passthrough_latencies = timed_requests(
                    passthrough.base_url, args.baseline_requests, args.clients, upstream
                )
            timed_requests(upstream.url, 20, args.clients, upstream)
            direct_latencies = timed_requests(upstream.url, args.baseline_requests, args.clients, upstream)

    print()
    print(f"RSS after warm-up {warm / 1e6:.0f} MB, after {args.requests} more {final / 1e6:.0f} MB")
    print(f"RSS ratio final / after warm-up: {final / warm:.2f}  (snapshot builds: {builds})")
    print("latency, client side:")
    print(describe("injecting", latencies))
    print(describe("pass-through", passthrough_latencies))
    print(describe("direct", direct_latencies))
    for name, baseline in (("pass-through", passthrough_latencies), ("direct", direct_latencies)):
        print(
            f"ratio injecting / {name}: median {statistics.median(latencies) / statistics.median(baseline):.1f}x, "
            f"p95 {percentile(latencies, 0.95) / percentile(baseline, 0.95):.1f}x"
        )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process it started was stopped")
