"""Upstream faults end to end: a real mitmdump in front of a deliberately faulty upstream.

These tests also guard mitm/internals.py, the one module that uses mitmproxy's private API: an
upgrade that breaks it makes them fail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from support import Proxy, Repo, Upstream, free_port, http_request

HOLD_SECONDS = 20.0
CHAT = "/v1/chat/completions"
CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_BODY = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


def sse_event(text: str) -> bytes:
    chunk = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


def wait_for_eof(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed the connection, or None if it stayed open."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        readable, _, _ = select.select([sock], [], [], 0.002)
        if readable:
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    return time.monotonic() - started
            except ConnectionResetError:
                return time.monotonic() - started
    return None


class _FaultyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        getattr(self, f"_mode_{self.server.mode}")()

    def _mode_fast(self) -> None:
        self._reply(b'{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[]}')

    def _mode_stall(self) -> None:
        """Never answer; note when the proxy closes the connection."""
        closed_after = wait_for_eof(self.connection, HOLD_SECONDS)
        if closed_after is not None:
            self.server.closed_after.append(closed_after)
        self.close_connection = True

    def _mode_hold_then_answer(self) -> None:
        time.sleep(self.server.hold_seconds)
        self._mode_fast()

    def _mode_slow_stream(self) -> None:
        self._stream_headers()
        for index in range(4):
            time.sleep(0.4)
            self._chunk(sse_event(f"p{index}"))
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _mode_stream_until_client_leaves(self) -> None:
        self._stream_headers()
        self._chunk(sse_event("first"))
        self.server.first_chunk_sent.set()
        closed_after = wait_for_eof(self.connection, HOLD_SECONDS)
        self.server.closed_at.append(time.monotonic() if closed_after is not None else float("nan"))
        self.close_connection = True

    def _mode_stream_cut(self) -> None:
        self._stream_headers()
        self._chunk(sse_event("only"))
        self.close_connection = True  # no final chunk: the response is cut short

    def _mode_drop(self) -> None:
        """Accepts the connection (the probe succeeds), then closes it without a response."""
        self.close_connection = True

    def _mode_interim_then_answer(self) -> None:
        """Interim (1xx) answers the proxy did not ask for, then the real one (RFC 9110 allows any number)."""
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.wfile.flush()
        time.sleep(0.05)
        self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
        self._mode_fast()

    def _mode_garbage(self) -> None:
        self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")
        self.close_connection = True

    def _mode_truncated(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "100")
        self.end_headers()
        self.wfile.write(b'{"id": "x"')
        self.close_connection = True

    def _stream_headers(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FaultyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FaultyHandler)
        self.mode = "fast"
        self.hold_seconds = 0.0
        self.closed_after: list[float] = []
        self.closed_at: list[float] = []
        self.first_chunk_sent = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def faulty_upstream() -> Iterator[FaultyServer]:
    server = FaultyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def repo(make_repo: Callable[..., Repo]) -> Repo:
    return make_repo({"a.py": "x = 1\n"})


@pytest.fixture
def faulty() -> Iterator[FaultyServer]:
    with faulty_upstream() as server:
        yield server


def client_for(proxy: Proxy, timeout: float = HOLD_SECONDS + 10) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="k", max_retries=0, timeout=timeout)


def envelope(body: bytes, status: int, actual_status: int) -> dict[str, Any]:
    assert actual_status == status, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    return dict(error)


def assert_proxy_healthy(proxy: Proxy) -> None:
    assert proxy.process.poll() is None
    assert proxy.get("/health").status == 200
    assert "Addon error" not in proxy.log()
    assert "crashed" not in proxy.log()


# --- 504: no response headers in time ----------------------------------------------------------


def test_no_response_headers_in_time_gives_504_and_closes_the_upstream(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(faulty.url, {"GIT_REPO_PATH": str(repo.path), "UPSTREAM_TIMEOUT_MS": "600"})
    faulty.mode = "stall"
    client = client_for(proxy)
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
    while not faulty.closed_after and time.monotonic() < deadline:
        time.sleep(0.01)
    assert faulty.closed_after, "the upstream connection was left open: the model would keep generating"
    assert faulty.closed_after[0] < HOLD_SECONDS / 2

    # the proxy keeps serving: the next request to a healthy upstream goes through
    faulty.mode = "fast"
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}]).id == "x"
    assert_proxy_healthy(proxy)


def test_a_stream_that_started_in_time_is_not_cut(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(faulty.url, {"GIT_REPO_PATH": str(repo.path), "UPSTREAM_TIMEOUT_MS": "600"})
    faulty.mode = "slow_stream"
    stream = client_for(proxy, 30).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    parts = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert parts == ["p0", "p1", "p2", "p3"], "1.6 s of streaming must outlive a 600 ms first-byte deadline"


def test_tcp_timeout_is_raised_past_the_upstream_deadline(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy]
) -> None:
    # mitmproxy cuts a connection after tcp_timeout seconds without traffic; a long prefill is
    # silent. Asked for 1 s, the addon raises it past UPSTREAM_TIMEOUT_MS so 2 s of silence pass.
    proxy = start_proxy(
        faulty.url, {"GIT_REPO_PATH": str(repo.path), "UPSTREAM_TIMEOUT_MS": "3000"}, ("--set", "tcp_timeout=1")
    )
    faulty.mode = "hold_then_answer"
    faulty.hold_seconds = 2.0
    reply = client_for(proxy, 30).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.id == "x"
    assert "tcp_timeout raised from 1 to 33 s" in proxy.log()


# --- the reachability probe ---------------------------------------------------------------------


def test_the_reachability_probe_costs_no_connection_per_request(
    repo: Repo, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """A probe per request doubled the connections the model server must accept (and overflowed its backlog)."""
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        for _ in range(6):  # one client connection, kept alive: its upstream connection stays open too
            connection.request("POST", CHAT, body=CHAT_BODY, headers={"content-type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200, response.read()[:300]
            response.read()
    finally:
        connection.close()
    forwarding = upstream.accepted - len(upstream.server.own_requests)  # less the proxy's own GETs (one each)
    assert forwarding <= 2, forwarding  # its connection, and at most one probe
    before = forwarding
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(proxy.post(CHAT, CHAT_BODY).status)) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200] * 16
    forwarding = upstream.accepted - len(upstream.server.own_requests)
    assert forwarding - before <= 16 + 2, forwarding - before  # concurrent probes share one


# --- 503: the upstream cannot be reached ------------------------------------------------------


def test_refused_connection_is_a_503_envelope(repo: Repo, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", {"GIT_REPO_PATH": str(repo.path)})
    started = time.monotonic()
    result = proxy.post(CHAT, CHAT_BODY)
    assert time.monotonic() - started < 3.0, "a refused connection must not wait for the connect timeout"
    error = envelope(result.body, 503, result.status)
    assert error["code"] == "upstream_unavailable"
    assert "Connection refused" in error["message"]
    # other forwarded paths too, not just chat
    other = proxy.request("GET", "/v1/files")
    assert envelope(other.body, 503, other.status)["code"] == "upstream_unavailable"
    assert_proxy_healthy(proxy)


@contextlib.contextmanager
def unresponsive_listener() -> Iterator[int]:
    """A loopback port whose accept queue is full: new connections hang like an unroutable host's."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_connect_timeout_bounds_an_unreachable_upstream(repo: Repo, start_proxy: Callable[..., Proxy]) -> None:
    with unresponsive_listener() as port:
        probe = socket.socket()
        probe.settimeout(1.0)
        with pytest.raises(OSError):  # precondition: this port really does not accept
            probe.connect(("127.0.0.1", port))
        probe.close()
        proxy = start_proxy(
            f"http://127.0.0.1:{port}", {"GIT_REPO_PATH": str(repo.path), "UPSTREAM_CONNECT_TIMEOUT_MS": "500"}
        )
        started = time.monotonic()
        result = proxy.post(CHAT, CHAT_BODY)
        elapsed = time.monotonic() - started
    error = envelope(result.body, 503, result.status)
    assert error["code"] == "upstream_unavailable"
    assert "within 500 ms" in error["message"]
    assert 0.5 <= elapsed < 10


def test_upstream_that_drops_the_connection_after_the_probe_is_an_envelope(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy]
) -> None:
    # The probe connects fine; the real request's connection is closed with no answer: the
    # answer mitmproxy writes itself must be an envelope, not its HTML error page.
    proxy = start_proxy(faulty.url, {"GIT_REPO_PATH": str(repo.path)})
    faulty.mode = "drop"
    result = proxy.post(CHAT, CHAT_BODY)
    error = envelope(result.body, 502, result.status)
    assert result.headers["content-type"] == "application/json"
    assert error["code"] == "upstream_error"
    assert "<html" not in result.body.decode()
    assert_proxy_healthy(proxy)


def test_interim_answers_from_the_upstream_do_not_hide_its_real_answer(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(faulty.url, {"GIT_REPO_PATH": str(repo.path)})
    faulty.mode = "interim_then_answer"
    result = proxy.post(CHAT, CHAT_BODY)
    assert result.status == 200, result.body[:300]
    assert json.loads(result.body)["object"] == "chat.completion"
    assert proxy.post(CHAT, CHAT_BODY).status == 200  # the connection is still in step
    assert_proxy_healthy(proxy)


# --- 502: broken answers -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["garbage", "truncated"])
def test_broken_upstream_response_is_a_502_envelope(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy], mode: str
) -> None:
    proxy = start_proxy(faulty.url, {"GIT_REPO_PATH": str(repo.path)})
    faulty.mode = mode
    result = proxy.post(CHAT, CHAT_BODY)
    error = envelope(result.body, 502, result.status)
    assert error["type"] == "server_error"
    assert error["code"] == "upstream_error"
    faulty.mode = "fast"
    assert proxy.post(CHAT, CHAT_BODY).status == 200
    assert_proxy_healthy(proxy)


def test_a_stream_cut_short_ends_for_the_client(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(faulty.url, {"GIT_REPO_PATH": str(repo.path)})
    faulty.mode = "stream_cut"
    received = []
    started = time.monotonic()
    with contextlib.suppress(openai.APIError):
        stream = client_for(proxy, 15).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        for chunk in stream:
            received.extend(c.delta.content for c in chunk.choices)
    assert received == ["only"]
    assert time.monotonic() - started < 10, "the client must see the stream end, not hang"
    assert_proxy_healthy(proxy)


# --- the client goes away ----------------------------------------------------------------------


def stream_then_leave(port: int) -> float:
    """Ask for a stream, read its first event, close the connection; returns when it closed."""
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(STREAM_BODY)}\r\n\r\n".encode()
        + STREAM_BODY
    )
    received = b""
    while b"first" not in received:
        data = client.recv(65536)
        assert data, "the stream ended before its first event"
        received += data
    left_at = time.monotonic()
    client.close()
    return left_at


def test_client_disconnect_mid_stream_closes_the_upstream_connection(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(faulty.url, {"GIT_REPO_PATH": str(repo.path)})
    faulty.mode = "stream_until_client_leaves"
    left_at = stream_then_leave(proxy.port)
    deadline = time.monotonic() + 10
    while not faulty.closed_at and time.monotonic() < deadline:
        time.sleep(0.005)
    assert faulty.closed_at, "the upstream never saw the client leave"
    latency = faulty.closed_at[0] - left_at
    assert not math.isnan(latency), "the upstream connection stayed open"
    print(f"client disconnect -> upstream connection closed: {latency * 1000:.1f} ms")
    assert latency < 2.0
    assert_proxy_healthy(proxy)


def test_errors_mitmproxy_answers_for_a_malformed_client_request_are_envelopes(
    repo: Repo, faulty: FaultyServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(faulty.url, {"GIT_REPO_PATH": str(repo.path)})
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
        sock.settimeout(10)
        raw = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert http_request("GET", proxy.base_url + "/health").status == 200
