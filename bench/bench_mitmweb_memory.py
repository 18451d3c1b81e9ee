"""mitmweb's memory over many chat requests with a large snapshot: trimming stored bodies vs keeping them.

Generates a repository (default 1400 files, about 15 MB of snapshot), starts a recording upstream
and a real mitmweb running the addon, all on 127.0.0.1 (the helpers of tests/support.py), and
sends ``--requests`` small chat requests one after another. mitmweb stores every flow; the addon
keeps the full request body of the last KEEP_FULL_BODIES chat flows only. Two runs, each with its
own mitmweb: (a) ``--keep`` (default 10, the setting's default) and (b) ``--no-trim-keep``
(larger than the number of requests: nothing is trimmed). It prints mitmweb's RSS (children
included) every ``--interval`` requests, what mitmweb's API reports as stored request bytes,
and the ratios final / after the warm-up (the first ``--interval`` requests) for each run and
(b) / (a) at the end. Every process it starts is stopped before it returns, on errors and
Ctrl-C too.

Usage: .venv/bin/python bench/bench_mitmweb_memory.py [--requests N] [--files F] [--file-bytes B]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from scout_diff_cache.context.framing import TRIMMED_SNAPSHOT_PREFIX
from support import Repo, Upstream, free_port, generated_files, http_request, process_tree_rss, run_proxy, run_upstream

CHAT = "/v1/chat/completions"
HEADERS = {"content-type": "application/json"}


@dataclass
class Run:
    name: str
    keep: int
    requests: int
    warm_rss: int = 0
    final_rss: int = 0


def stored_chat_flows(web_url: str, token: str) -> list[dict[str, Any]]:
    """The chat flows mitmweb holds, oldest first, as its web UI lists them."""
    result = http_request("GET", web_url + "/flows.json", headers={"authorization": f"Bearer {token}"})
    if result.status != 200:
        raise RuntimeError(f"mitmweb /flows.json: HTTP {result.status}")
    flows = [f for f in result.json() if f["request"]["path"] == CHAT]
    return sorted(flows, key=lambda f: f["request"]["timestamp_start"])


def first_message(web_url: str, token: str, flow_id: str) -> str:
    result = http_request(
        "GET", f"{web_url}/flows/{flow_id}/request/content.data", headers={"authorization": f"Bearer {token}"}
    )
    content = json.loads(result.body)["messages"][0]["content"]
    return content if isinstance(content, str) else ""


def measure(run: Run, repo: Repo, upstream: Upstream, work_dir: Path, interval: int) -> None:
    web_port, token = free_port(), secrets.token_hex(16)
    web_url = f"http://127.0.0.1:{web_port}"
    env = {"GIT_REPO_PATH": str(repo.path), "KEEP_FULL_BODIES": str(run.keep)}
    web_args = ("--set", "web_host=127.0.0.1", "--set", f"web_port={web_port}", "--set", f"web_password={token}")
    print(f"\n({run.name}) KEEP_FULL_BODIES={run.keep}, {run.requests} requests", flush=True)
    with run_proxy(upstream.url, work_dir, env, web_args, program="mitmweb") as proxy:
        pid = proxy.process.pid
        print(f"  mitmweb pid {pid}, RSS at start {process_tree_rss(pid) / 1e6:.0f} MB", flush=True)
        started = time.perf_counter()
        for index in range(1, run.requests + 1):
            body = json.dumps({"model": "llama-4-scout", "messages": [{"role": "user", "content": f"q{index}"}]})
            result = http_request("POST", proxy.base_url + CHAT, body.encode(), HEADERS)
            if result.status != 200:
                raise RuntimeError(f"HTTP {result.status}: {result.body[:300]!r}")
            upstream.recorded.clear()  # the upstream keeps every body it received
            if index % interval == 0 or index == run.requests:
                rss = process_tree_rss(pid)
                if index == interval:
                    run.warm_rss = rss
                warm = f"({rss / run.warm_rss:.2f} x after warm-up)" if run.warm_rss else ""
                print(
                    f"  {index:>4} requests: RSS {rss / 1e6:6.0f} MB {warm:<24} "
                    f"{index / (time.perf_counter() - started):.1f} requests/s",
                    flush=True,
                )
        run.final_rss = process_tree_rss(pid)
        flows = stored_chat_flows(web_url, token)
        stored = sum(f["request"]["contentLength"] or 0 for f in flows)
        trimmed = sum(first_message(web_url, token, f["id"]).startswith(TRIMMED_SNAPSHOT_PREFIX) for f in flows)
        print(
            f"  mitmweb holds {len(flows)} chat flows, {stored / 1e6:.0f} MB of request bodies; "
            f"{trimmed} with the snapshot trimmed, {len(flows) - trimmed} full",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="chat requests in run (a)")
    parser.add_argument("--no-trim-requests", type=int, default=100, help="chat requests in run (b)")
    parser.add_argument("--interval", type=int, default=10, help="print RSS every this many requests")
    parser.add_argument("--keep", type=int, default=10, help="KEEP_FULL_BODIES of run (a)")
    parser.add_argument("--no-trim-keep", type=int, default=1_000_000, help="KEEP_FULL_BODIES of run (b)")
    parser.add_argument("--files", type=int, default=1400, help="files in the generated repository")
    parser.add_argument("--file-bytes", type=int, default=11_000, help="approximate size of each file")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the with-blocks below stop mitmweb and the upstream.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # Hermetic git for the generated repository: no user or system config (signing, hooks, templates).
    os.environ["GIT_CONFIG_GLOBAL"] = os.devnull
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
    runs = [
        Run("a", args.keep, args.requests),
        Run("b", args.no_trim_keep, args.no_trim_requests),
    ]
    with tempfile.TemporaryDirectory(prefix="scout-mitmweb-memory-") as tmp:
        root = Path(tmp)
        print(f"generating {args.files} files of about {args.file_bytes} bytes ...", flush=True)
        repo = Repo.create(root / "repo", generated_files(args.files, args.file_bytes))
        with run_upstream() as upstream:
            for run in runs:
                measure(run, repo, upstream, root / f"mitmweb-{run.name}", args.interval)

    print()
    for run in runs:
        print(
            f"({run.name}) KEEP_FULL_BODIES={run.keep}: RSS after warm-up ({args.interval} requests) "
            f"{run.warm_rss / 1e6:.0f} MB, after {run.requests} {run.final_rss / 1e6:.0f} MB, "
            f"ratio final / after warm-up {run.final_rss / run.warm_rss:.2f}"
        )
    a, b = runs
    print(f"ratio final RSS (b) / (a): {b.final_rss / a.final_rss:.2f}  ({b.requests} vs {a.requests} requests)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process it started was stopped")
