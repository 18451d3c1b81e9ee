"""UPSTREAM_TIMEOUT_MS end to end: a real mitmdump in front of a deliberately slow upstream.

These tests also guard mitm_internals.py, the one module that uses mitmproxy's private API: an
upgrade that breaks it makes them fail.
"""

from __future__ import annotations

import contextlib
import json
import select
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from support import Proxy, Repo

HOLD_SECONDS = 20.0


class _SlowHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SlowServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        stream = bool(json.loads(body).get("stream"))
        if self.server.mode == "stall":
            self._stall()
        elif stream:
            self._slow_stream()
        else:
            self._reply(b'{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[]}')

    def _stall(self) -> None:
        """Never answer; note when the proxy closes the connection."""
        received = time.monotonic()
        deadline = received + HOLD_SECONDS
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.01)
            if readable and not self.connection.recv(1, 2):  # MSG_PEEK: EOF means closed
                self.server.closed_after.append(time.monotonic() - received)
                self.close_connection = True
                return
        self._reply(b"{}")

    def _slow_stream(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for index in range(4):
            time.sleep(0.4)
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": f"p{index}"}, "finish_reason": None}]}  # fmt: skip
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _SlowServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SlowHandler)
        self.mode = "stall"
        self.closed_after: list[float] = []


@contextlib.contextmanager
def slow_upstream() -> Iterator[_SlowServer]:
    server = _SlowServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def slow_proxy(
    make_repo: Callable[..., Repo], start_proxy: Callable[..., Proxy]
) -> Iterator[tuple[_SlowServer, Proxy]]:
    repo = make_repo({"a.py": "x = 1\n"})
    with slow_upstream() as server:
        proxy = start_proxy(
            f"http://127.0.0.1:{server.server_address[1]}",
            {"GIT_REPO_PATH": str(repo.path), "UPSTREAM_TIMEOUT_MS": "600"},
        )
        yield server, proxy


def test_no_response_headers_in_time_gives_504_and_closes_the_upstream(slow_proxy: tuple[_SlowServer, Proxy]) -> None:
    server, proxy = slow_proxy
    client = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="k", max_retries=0, timeout=HOLD_SECONDS + 10)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    elapsed = time.monotonic() - started
    assert raised.value.status_code == 504
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["code"] == "upstream_timeout"
    assert "600 ms" in error["message"]
    assert elapsed >= 0.6, "the deadline fired early"
    assert elapsed < HOLD_SECONDS / 2, "the deadline never fired; the upstream answered instead"
    deadline = time.monotonic() + 5
    while not server.closed_after and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.closed_after, "the upstream connection was left open: the model would keep generating"
    assert server.closed_after[0] < HOLD_SECONDS / 2

    # the proxy keeps serving: the next request to a healthy upstream goes through
    server.mode = "fast"
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}])
    assert reply.id == "x"
    assert "Addon error" not in proxy.log()
    assert "crashed" not in proxy.log()


def test_a_stream_that_started_in_time_is_not_cut(slow_proxy: tuple[_SlowServer, Proxy]) -> None:
    server, proxy = slow_proxy
    server.mode = "fast"
    client = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="k", max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    parts = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert parts == ["p0", "p1", "p2", "p3"], "1.6 s of streaming must outlive a 600 ms first-byte deadline"
