"""Bodies sent to exhaust memory, against a real mitmdump: peak memory is read from /proc (VmHWM)."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import Proxy, Repo, Upstream, generated_files

CHAT = "/v1/chat/completions"
LIMIT = 1 << 20  # MAX_BODY_BYTES in these tests
MIB = 1 << 20


def proc_memory(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status (VmRSS: resident now; VmHWM: its peak so far), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_rss(pid: int) -> int:
    return proc_memory(pid, "VmHWM")


def resident(pid: int) -> int:
    return proc_memory(pid, "VmRSS")


def send(
    proxy: Proxy, body: bytes | Iterator[bytes], headers: dict[str, str], timeout: float = 60
) -> tuple[int, dict[str, object]]:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        chunked = not isinstance(body, bytes)
        connection.request("POST", CHAT, body=body, headers=headers, encode_chunked=chunked)
        response = connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else {}
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        return 0, {}  # the proxy stopped reading (and closed): the rest of the body was never taken
    finally:
        connection.close()


def chat_json(size: int) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "a" * size}]}).encode()


@pytest.fixture
def proxy(make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]) -> Proxy:
    repo = make_repo({"a.py": "x = 1\n"})
    return start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "MAX_BODY_BYTES": str(LIMIT)})


def test_a_gzip_bomb_is_refused_without_inflating_it(proxy: Proxy, upstream: Upstream) -> None:
    bomb = gzip.compress(chat_json(64 * MIB))  # 64 KiB on the wire, valid JSON once inflated
    assert proxy.get("/health").status == 200
    before = peak_rss(proxy.process.pid)
    status, answer = send(proxy, bomb, {"content-type": "application/json", "content-encoding": "gzip"})
    assert (status, answer["error"]["code"]) == (413, "request_too_large")  # type: ignore[index]
    assert peak_rss(proxy.process.pid) - before < 16 * MIB
    assert upstream.recorded == []
    small = gzip.compress(chat_json(1000))
    assert send(proxy, small, {"content-type": "application/json", "content-encoding": "gzip"})[0] == 200


def test_a_body_over_the_limit_is_refused_with_or_without_a_length(proxy: Proxy, upstream: Upstream) -> None:
    status, answer = send(proxy, chat_json(2 * MIB), {"content-type": "application/json"})
    assert (status, answer["error"]["code"]) == (413, "request_too_large")  # type: ignore[index]
    pieces = (b"x" * 65536 for _ in range(64))  # 4 MiB, chunked: no length to judge it by
    status, answer = send(proxy, pieces, {"content-type": "application/json"})
    assert (status, answer["error"]["code"]) == (413, "request_too_large")  # type: ignore[index]
    assert upstream.recorded == []


def test_clients_without_the_key_cannot_make_the_proxy_hold_their_bodies(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    repo = make_repo({"a.py": "x = 1\n"})
    env = {"GIT_REPO_PATH": str(repo.path), "MAX_BODY_BYTES": str(LIMIT), "PROXY_API_KEY": "sk-the-key"}
    proxy = start_proxy(upstream.url, env)
    assert proxy.request("GET", "/health", headers={"authorization": "Bearer sk-the-key"}).status == 200
    before = peak_rss(proxy.process.pid)
    statuses: list[int] = []

    def flood() -> None:
        pieces = (b"x" * 65536 for _ in range(256))  # 16 MiB each, chunked
        statuses.append(send(proxy, pieces, {"content-type": "application/json"}, timeout=5)[0])

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(statuses) == 4 and set(statuses) <= {413, 0}, statuses  # refused, never read to the end
    assert peak_rss(proxy.process.pid) - before < 24 * MIB  # 4 x 16 MiB were sent
    assert proxy.log().count("Request body exceeds mitmproxy's body_size_limit") == 4
    assert upstream.recorded == []


def test_memory_returns_to_its_baseline_when_a_burst_is_over(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Each concurrent request holds a snapshot-sized body; they used to stay resident after the burst."""
    repo = make_repo(generated_files(400, 12_000))  # a snapshot of about 5 MB
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    small = chat_json(10)
    assert send(proxy, small, {"content-type": "application/json"})[0] == 200
    time.sleep(1.5)
    baseline = resident(proxy.process.pid)
    for _ in range(2):
        threads = [
            threading.Thread(target=send, args=(proxy, small, {"content-type": "application/json"})) for _ in range(24)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        deadline = time.monotonic() + 10
        while resident(proxy.process.pid) > baseline + 32 * MIB and time.monotonic() < deadline:
            time.sleep(0.2)
        assert resident(proxy.process.pid) <= baseline + 32 * MIB, (resident(proxy.process.pid) - baseline) / MIB
    assert len(upstream.chat_requests()) == 49
