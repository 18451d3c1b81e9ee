"""A real cluster router between the proxy and two real model servers: the cached base stays on one replica.

``vllm-router`` (PyPI, a Rust binary) with ``--policy consistent_hash`` hashes the request's
``X-Session-ID``; the proxy copies ``x-scout-prefix-key`` into it (PREFIX_KEY_HEADERS). Behind it,
two llama-servers with the tiny Llama 4 model of tests/llama_server.py. Which replica served a
request is read from the replicas themselves (``llamacpp:prompt_tokens_total`` in their /metrics),
whether it hit from their usage, through the proxy's verdict.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from engine_client import Answer, ask
from llama_server import LlamaServer, repo_files, run_llama_server, write_tiny_gguf
from support import Proxy, Repo, free_port, stop_process, wait_ready

ROUTER = Path(sys.executable).with_name("vllm-router")
MAX_REPOSITORIES = 10  # repositories tried until two replicas have been used (each one: 1 in 2)
StartProxy = Callable[..., Proxy]

pytestmark = pytest.mark.skipif(not ROUTER.exists(), reason="vllm-router is a test extra for Linux (pyproject)")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("router-model") / "tiny-llama4.gguf")


@contextlib.contextmanager
def two_replicas(model: Path, log_dir: Path) -> Iterator[tuple[LlamaServer, LlamaServer]]:
    with (
        run_llama_server(model, ctx_size=16384, log_dir=log_dir) as first,
        run_llama_server(model, ctx_size=16384, log_dir=log_dir) as second,
    ):
        yield first, second


@contextlib.contextmanager
def run_router(replicas: Sequence[LlamaServer], log_dir: Path) -> Iterator[str]:
    port = free_port()
    command = [
        str(ROUTER),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--policy", "consistent_hash",
        "--worker-urls", *(replica.url for replica in replicas),
        "--health-check-interval-secs", "1",
        "--health-failure-threshold", "1",
        "--worker-startup-check-interval", "1",
    ]  # fmt: skip
    log_path = log_dir / f"vllm-router-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(
            process,
            lambda: _healthy(url),
            60,
            0.2,
            lambda: f"vllm-router did not start:\n{log_path.read_text(errors='replace')[-3000:]}",
        )
        yield url
    finally:
        stop_process(process)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def prompt_tokens_counted(replica: LlamaServer) -> float:
    """llama-server's own count of the prompt tokens it has processed (0 for a replica that is gone)."""
    if replica.process.poll() is not None:
        return 0.0
    for line in replica.get("/metrics").body.decode().splitlines():
        if line.startswith("llamacpp:prompt_tokens_total"):
            return float(line.split()[-1])
    raise AssertionError("llama-server reports no llamacpp:prompt_tokens_total")


def asked_on(replicas: Sequence[LlamaServer], proxy: Proxy, question: str) -> tuple[int, Answer]:
    """One question through the proxy and the router: the index of the replica that served it, and the answer."""
    before = [prompt_tokens_counted(replica) for replica in replicas]
    answer = ask(proxy, question)
    grew = [i for i, replica in enumerate(replicas) if prompt_tokens_counted(replica) > before[i]]
    assert len(grew) == 1, (grew, before)
    return grew[0], answer


def proxy_for(start_proxy: StartProxy, router_url: str, repo: Repo) -> Proxy:
    return start_proxy(
        router_url,
        {
            "GIT_REPO_PATH": str(repo.path),
            "PREFIX_KEY_HEADERS": "X-Session-ID",
            "MAX_CONTEXT_TOKENS": "16384",
            "COUNT_SNAPSHOT_TOKENS": "false",  # the router does not pass /tokenize on
        },
    )


def test_a_repository_state_stays_on_one_replica_and_repositories_spread(
    model: Path, make_repo: Callable[..., Repo], start_proxy: StartProxy, tmp_path: Path
) -> None:
    with two_replicas(model, tmp_path) as replicas, run_router(replicas, tmp_path) as router_url:
        used: dict[str, int] = {}
        for i in range(MAX_REPOSITORIES):
            repo = make_repo(repo_files(f"router repository {i}", modules=6))
            proxy = proxy_for(start_proxy, router_url, repo)
            first, cold = asked_on(replicas, proxy, "Where is main?")
            second, warm = asked_on(replicas, proxy, "And the tests?")
            key = warm.headers["x-scout-prefix-key"]
            assert cold.headers["x-scout-prefix-key"] == key
            assert second == first, f"repository {i}: the second question went to another replica"
            assert warm.verdict == "hit", warm.headers["x-scout-cache"]
            assert warm.cached_tokens > 0.9 * warm.prompt_tokens - 64
            used[key] = first
            if len(used) >= 3 and len(set(used.values())) == 2:
                break
        assert len(set(used.values())) == 2, f"{len(used)} repositories, every one on replica {set(used.values())}"


def test_a_killed_replica_moves_its_traffic_and_the_verdict_says_why_the_next_request_missed(
    model: Path, make_repo: Callable[..., Repo], start_proxy: StartProxy, tmp_path: Path
) -> None:
    with two_replicas(model, tmp_path) as replicas, run_router(replicas, tmp_path) as router_url:
        repo = make_repo(repo_files("router failover", modules=6))
        proxy = proxy_for(start_proxy, router_url, repo)
        served, _ = asked_on(replicas, proxy, "Where is main?")
        assert asked_on(replicas, proxy, "Again?")[1].verdict == "hit"
        replicas[served].process.terminate()
        replicas[served].process.wait(timeout=20)
        deadline = time.monotonic() + 30
        while True:  # until the router has seen the replica fail its health check
            try:
                moved_to, answer = asked_on(replicas, proxy, "Where is main now?")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert moved_to != served
        assert answer.verdict == "miss", answer.headers["x-scout-cache"]
        assert answer.cache_fields["cause"] == "evicted"
        assert "answered by another replica" in proxy.log()
        again_on, again = asked_on(replicas, proxy, "And once more?")
        assert (again_on, again.verdict) == (moved_to, "hit")
