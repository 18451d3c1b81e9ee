"""Bodies sent to exhaust memory, against a real mitmdump: peak memory is read from /proc (VmHWM)."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import Proxy, Repo, Upstream, generated_files, read_until_closed

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
    """The client sends its whole body before it reads (as http.client does) and still reads the 413.

    24 MiB is more than the kernel's socket buffers hold: the proxy must go on reading (and discarding).
    """
    status, answer = send(proxy, chat_json(24 * MIB), {"content-type": "application/json"}, timeout=8)
    assert (status, answer["error"]["code"]) == (413, "request_too_large")  # type: ignore[index]
    pieces = (b"x" * 65536 for _ in range(384))  # 24 MiB, chunked: no length to judge it by
    status, answer = send(proxy, pieces, {"content-type": "application/json"}, timeout=8)
    assert (status, answer["error"]["code"]) == (413, "request_too_large")  # type: ignore[index]
    assert upstream.recorded == []
    assert send(proxy, chat_json(1000), {"content-type": "application/json"})[0] == 200


KEY = "sk-the-key"


@pytest.fixture
def keyed_proxy(make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]) -> Proxy:
    repo = make_repo({"a.py": "x = 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "PROXY_API_KEY": KEY})
    assert proxy.request("GET", "/health", headers={"authorization": f"Bearer {KEY}"}).status == 200
    return proxy


def test_a_client_without_the_key_is_refused_before_it_sends_its_body(keyed_proxy: Proxy, upstream: Upstream) -> None:
    """The 401 comes after the headers alone: the proxy does not wait for (or read) a 256 MiB body."""
    with socket.create_connection(("127.0.0.1", keyed_proxy.port), timeout=10) as sock:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        sock.sendall(f"{head}content-length: {256 * MIB}\r\n\r\n".encode() + b"{" * 1000)
        answer = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b'"code": "invalid_api_key"' in answer and b"connection: close" in answer.lower()
    with socket.create_connection(("127.0.0.1", keyed_proxy.port), timeout=10) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n".encode())
        sock.sendall(f"content-length: {MIB}\r\n\r\n".encode())  # waits for 100 Continue, which never comes
        assert read_until_closed(sock, 5).startswith(b"HTTP/1.1 401 ")
    assert upstream.recorded == []
    assert keyed_proxy.log().count(f"refused POST {CHAT} before its body: 401") == 2


def test_a_client_without_the_key_that_sends_its_whole_body_first_reads_the_401(
    keyed_proxy: Proxy, upstream: Upstream
) -> None:
    """http.client (like most SDKs) sends the whole body before reading: the 401 must survive the close."""
    for body in (chat_json(24 * MIB), (b"x" * 65536 for _ in range(384))):  # more than socket buffers hold
        headers = {"content-type": "application/json", "authorization": "Bearer sk-no"}
        status, answer = send(keyed_proxy, body, headers, timeout=8)
        assert (status, answer["error"]["code"]) == (401, "invalid_api_key")  # type: ignore[index]
    status, _ = send(keyed_proxy, chat_json(10), {"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    assert status == 200 and len(upstream.chat_requests()) == 1


def test_clients_without_the_key_cannot_make_the_proxy_hold_their_bodies(
    keyed_proxy: Proxy, upstream: Upstream
) -> None:
    before = peak_rss(keyed_proxy.process.pid)
    statuses: list[int] = []

    def flood() -> None:
        pieces = (b"x" * 65536 for _ in range(1024))  # 64 MiB each, chunked, the default MAX_BODY_BYTES
        statuses.append(send(keyed_proxy, pieces, {"content-type": "application/json"}, timeout=20)[0])

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [401] * 4  # each body was drained and discarded, and the 401 read after it
    assert peak_rss(keyed_proxy.process.pid) - before < 16 * MIB  # 4 x 64 MiB were sent
    assert keyed_proxy.log().count(f"refused POST {CHAT} before its body: 401") == 4
    assert "body_size_limit" not in keyed_proxy.log()  # no body was read far enough to reach the limit
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
