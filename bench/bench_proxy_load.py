"""Speed at scale through a real mitmdump (issue 16): per-request cost, event-loop stalls, memory under load.

Generates a repository of about ``--megabytes`` MB (default 40) with ``--commits`` commits, or
clones ``--repo PATH`` (git/git, ...), starts the recording upstream of
tests/support.py and mitmdump running the addon (MAX_CONTEXT_TOKENS large enough for the whole
repository, so message 1 is all of it), all on 127.0.0.1, and measures in one run:

1. cold first answer: a chat request sent as soon as a freshly started mitmdump listens (it
   waits for the build of message 1 begun at start: HEAD, the diff, the history tail and the base
   snapshot), less a warm request, against ``git archive HEAD > /dev/null`` (goal <= 1.3x): at a
   first start (an empty build cache), and at a restart (a second mitmdump on the build cache the
   first one kept, after the commits of 2.);
2. a new commit: the first request after a commit (once the watcher saw it) against a warm
   request, medians of ``--requests`` commits (goal <= 1.5x);
3. per request: a small chat request through the proxy (which sends the upstream the whole
   message 1 and the diff) against a client sending that same final body straight to the
   upstream, medians of ``--requests`` each, alternated (goal <= 1.3x);
4. event-loop stalls: a streaming answer through the proxy whose upstream sends a piece every
   10 ms, while a commit lands and chat requests make the proxy build and splice a new message 1
   (BASE_EVERY_COMMITS=1: every commit is a new base, a full build); the longest gap between
   pieces at the client, less the 10 ms the upstream waits (goal <= 50 ms);
5. memory: ``--concurrent`` chat requests at once (default 64); mitmdump's peak resident memory
   during the burst (VmHWM in /proc, reset before it) against its RSS before, three times the
   snapshot and what the bodies in flight hold (each request's body as the upstream received
   it), and its RSS once settled after the burst and after a second one (flat: no growth).

Machines differ: compare ratios, not milliseconds. Every process it starts is stopped before it
returns, on errors and Ctrl-C too.

Usage: .venv/bin/python bench/bench_proxy_load.py [--megabytes M | --repo PATH] [--requests N] [--concurrent C]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_fit import clone_of, git_archive_seconds
from support import Proxy, Repo, Upstream, generated_files, http_request, run_proxy, run_upstream

CHAT = "/v1/chat/completions"
HEADERS = {"content-type": "application/json"}
PIECE_DELAY = 0.01


def chat_body(question: str, stream: bool = False) -> bytes:
    return json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": question}]}).encode()


def post(url: str, body: bytes) -> float:
    started = time.perf_counter()
    result = http_request("POST", url + CHAT, body, HEADERS)
    if result.status != 200:
        raise RuntimeError(f"HTTP {result.status}: {result.body[:300]!r}")
    return time.perf_counter() - started


def cold_and_new_commit(proxy: Proxy, upstream: Upstream, repo: Repo, rounds: int) -> None:
    cold = post(proxy.base_url, chat_body("the first question"))
    warm = statistics.median(post(proxy.base_url, chat_body("warm")) for _ in range(3))
    archive = min(git_archive_seconds(repo.path) for _ in range(3))
    print(
        f"cold first answer {cold * 1000:.0f} ms, a warm request {warm * 1000:.0f} ms, "
        f"git archive {archive * 1000:.0f} ms (best of 3)"
    )
    print(f"  ratio (cold - warm) / git archive at a first start: {(cold - warm) / archive:.2f}x (goal <= 1.3x)")
    module = repo.path / "scout_bench_edit.txt"
    warm_times, after_commit = [], []
    for i in range(rounds):
        warm_times.append(post(proxy.base_url, chat_body("warm")))
        with module.open("a") as edit:
            edit.write(f"new commit {i}\n")
        repo.commit_all(f"new commit {i}")
        time.sleep(0.3)  # the watcher sees it (inotify: milliseconds)
        after_commit.append(post(proxy.base_url, chat_body("after a commit")))
        upstream.recorded.clear()
    ratio = statistics.median(after_commit) / statistics.median(warm_times)
    print(
        f"new commit: the first request after it {statistics.median(after_commit) * 1000:.0f} ms, a warm request "
        f"{statistics.median(warm_times) * 1000:.0f} ms (medians of {rounds})"
    )
    print(f"  ratio new commit / warm request: {ratio:.2f}x (goal <= 1.5x)")


def restart(upstream: Upstream, repo: Repo, env: dict[str, str], work_dir: Path, build_cache: Path) -> None:
    """The cold first answer of a new mitmdump that finds what the first one kept in its build cache."""
    with run_proxy(upstream.url, work_dir, {**env, "BUILD_CACHE_DIR": str(build_cache)}) as proxy:
        cold = post(proxy.base_url, chat_body("the first question after a restart"))
        warm = statistics.median(post(proxy.base_url, chat_body("warm")) for _ in range(3))
        read_back = "read from the build cache" in proxy.log()
    archive = min(git_archive_seconds(repo.path) for _ in range(3))
    print(
        f"restart: cold first answer {cold * 1000:.0f} ms, a warm request {warm * 1000:.0f} ms, git archive "
        f"{archive * 1000:.0f} ms (best of 3); base read from the build cache: {'yes' if read_back else 'no'}"
    )
    print(f"  ratio (cold - warm) / git archive at a restart: {(cold - warm) / archive:.2f}x (goal <= 1.3x)")


def per_request(proxy: Proxy, upstream: Upstream, requests: int) -> None:
    post(proxy.base_url, chat_body("warm up"))
    final_body = upstream.chat_requests()[-1].body
    through, direct = [], []
    for i in range(requests):
        through.append(post(proxy.base_url, chat_body("warm up")))
        direct.append(post(upstream.url, final_body))
        if i % 4 == 3:
            upstream.recorded.clear()  # it keeps every body: tens of megabytes each
    ratio = statistics.median(through) / statistics.median(direct)
    print(
        f"per request ({len(final_body) / 1e6:.1f} MB body): through the proxy {statistics.median(through) * 1000:.0f} "
        f"ms, the same body sent direct {statistics.median(direct) * 1000:.0f} ms (medians of {requests})"
    )
    print(f"  ratio proxy / direct: {ratio:.2f}x (goal <= 1.3x)")


def stream_gaps(proxy: Proxy, seconds_limit: float, started: threading.Event) -> list[float]:
    """Arrival times' gaps of a streaming answer read from a raw socket."""
    body = chat_body("stream please", stream=True)
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    arrivals = []
    with socket.create_connection(("127.0.0.1", int(proxy.base_url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + seconds_limit
        while time.monotonic() < deadline:
            data = sock.recv(1 << 20)
            if not data:
                break
            arrivals.append(time.perf_counter())
            if len(arrivals) == 3:
                started.set()
            if data.endswith(b"0\r\n\r\n"):
                break
    started.set()
    return [b - a for a, b in itertools.pairwise(arrivals[2:])]


STREAMING_UPSTREAM = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DELAY = float(sys.argv[1])
PIECE = json.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 65536}}]}).encode()
ANSWER = json.dumps({
    "id": "c", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if b'"stream":true' not in body[:4096].replace(b" ", b""):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(ANSWER)))
            self.end_headers()
            self.wfile.write(ANSWER)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for _ in range(400):
            event = b"data: " + PIECE + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(DELAY)
        end = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"""


@contextlib.contextmanager
def streaming_upstream() -> Iterator[str]:
    """A minimal model server in its own process that never parses a body: the recording upstream
    json-decodes every 40 MB body, and while it does, its GIL would delay the stream's pieces."""
    process = subprocess.Popen([sys.executable, "-c", STREAMING_UPSTREAM, str(PIECE_DELAY)], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        yield process.stdout.readline().decode().strip()
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def stalls(proxy: Proxy, repo: Repo) -> None:
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        gaps_future = pool.submit(stream_gaps, proxy, 60, started)
        started.wait(30)
        with (repo.path / "scout_bench_edit.txt").open("a") as edit:
            edit.write("a new base\n")
        repo.commit_all("a commit during the stream")
        time.sleep(0.3)  # the watcher sees it
        for i in range(3):
            post(proxy.base_url, chat_body(f"after the commit {i}"))
        gaps = gaps_future.result()
    longest = max(gaps) - PIECE_DELAY
    print(
        f"event loop: longest gap in a 10 ms stream during a commit, a full build and 3 rewrites: "
        f"{longest * 1000:.0f} ms beyond the 10 ms (p99 {sorted(gaps)[int(len(gaps) * 0.99)] * 1000:.0f} ms of "
        f"{len(gaps)} gaps; the upstream runs in its own process)"
    )
    print(f"  longest stall: {longest * 1000:.0f} ms (goal <= 50 ms)")


def memory(proxy: Proxy, upstream: Upstream, concurrent: int, snapshot_bytes: int) -> None:
    pid = proxy.process.pid
    baseline = rss(pid)

    def burst() -> tuple[int, int, int]:
        """One burst of requests: the body size, mitmdump's peak RSS during it, its RSS once settled."""
        reset_peak(pid)
        with ThreadPoolExecutor(concurrent) as pool:
            list(pool.map(lambda i: post(proxy.base_url, chat_body(f"question {i}")), range(concurrent)))
        body = len(upstream.chat_requests()[-1].body)
        upstream.recorded.clear()
        peak = peak_rss(pid)
        deadline = time.monotonic() + 10  # finished flows are freed within about a second
        while rss(pid) > baseline + snapshot_bytes * 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        return body, peak, rss(pid)

    body, peak, after_first = burst()
    _, second_peak, after_second = burst()
    in_flight = concurrent * body
    print(
        f"memory: snapshot {snapshot_bytes / 1e6:.1f} MB; {concurrent} concurrent requests of {body / 1e6:.1f} MB "
        f"bodies ({in_flight / 1e6:.0f} MB in flight); mitmdump RSS before {baseline / 1e6:.0f} MB, peak "
        f"{peak / 1e6:.0f} MB (second burst {second_peak / 1e6:.0f} MB), settled after a burst "
        f"{after_first / 1e6:.0f} MB, after a second {after_second / 1e6:.0f} MB"
    )
    print(
        f"  peak / (RSS before + 3x snapshot + bodies in flight): "
        f"{peak / (baseline + 3 * snapshot_bytes + in_flight):.2f} (goal <= 1); "
        f"settled after the second burst / after the first: {after_second / after_first:.2f} (flat: about 1)"
    )
    print(f"  memory per in-flight body: {(peak - baseline) / in_flight:.2f} copies of it")


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5; needs the right to write it)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss(pid: int) -> int:
    return _status_kb(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    return _status_kb(pid, "VmHWM") * 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=40, help="the generated repository's size")
    parser.add_argument("--requests", type=int, default=9, help="requests per side for the per-request ratio")
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--commits", type=int, default=30, help="history made before the proxy starts")
    parser.add_argument("--repo", type=Path, help="a clone of this repository instead of a generated one")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ["GIT_CONFIG_GLOBAL"] = os.devnull
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
    with tempfile.TemporaryDirectory(prefix="scout-proxy-load-") as tmp:
        root = Path(tmp)
        if args.repo is None:
            files = args.megabytes * 1_000_000 // 11_000
            repo = Repo.create(root / "repo", generated_files(files, 11_000))
            for i in range(args.commits):
                module = root / "repo" / f"pkg{i % 20:02d}" / f"history_{i % 7}.py"
                module.parent.mkdir(exist_ok=True)
                module.write_text(f"STEP = {i}\n")
                repo.commit_all(f"history {i}")
            described = f"{files:,} generated files and {args.commits} commits"
        else:
            repo, described = clone_of(args.repo, root / "repo"), f"a clone of {args.repo}"
        # A window that holds the whole repository, so message 1 is every file: the multi-megabyte
        # body this bench is about, not a cut to the fake upstream's default window.
        env = {"GIT_REPO_PATH": str(repo.path), "MAX_CONTEXT_TOKENS": str(1 << 30)}
        with run_upstream() as upstream:
            with run_proxy(upstream.url, root / "proxy", env) as proxy:
                print(f"repository: {described}")
                cold_and_new_commit(proxy, upstream, repo, args.requests)
                per_request(proxy, upstream, args.requests)
            # The first mitmdump's build cache (BUILD_CACHE_DIR=auto under its XDG_CACHE_HOME, see proxy_env).
            restart(upstream, repo, env, root / "restarted", root / "proxy" / "xdg-cache" / "scout-diff-cache")
            every_commit_a_base = {**env, "BASE_EVERY_COMMITS": "1", "MAX_TAIL_PERCENT": "0"}
            with streaming_upstream() as url, run_proxy(url, root / "streaming", every_commit_a_base) as proxy:
                http_request("GET", proxy.base_url + "/health")
                stalls(proxy, repo)
            with run_proxy(upstream.url, root / "rebuilding", every_commit_a_base) as proxy:
                snapshot = http_request("GET", proxy.base_url + "/health").json()["snapshot"]
                memory(proxy, upstream, args.concurrent, snapshot["bytes"])


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process it started was stopped")
