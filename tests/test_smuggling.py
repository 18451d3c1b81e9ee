"""Request smuggling and header tricks against a real mitmdump: what held up when the proxy was probed keeps holding.

Each request is written byte by byte on a raw socket. Whatever the proxy answers, the model
server must never see a request the client hid inside another one, nor a chat request without
its context, and a doubled header must not get past the key or the Host check.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable

import pytest

from support import Proxy, Repo, Upstream, read_until_closed

CHAT = "/v1/chat/completions"
KEY = "sk-the-key"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def proxy(make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]) -> Proxy:
    repo = make_repo({"a.py": "x = 1\n"})
    return start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "PROXY_API_KEY": KEY})


def exchange(proxy: Proxy, raw: bytes, seconds: float = 3.0) -> bytes:
    """Send ``raw`` on one connection; everything the proxy sends back until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=seconds) as sock:
        sock.sendall(raw)
        return read_until_closed(sock, seconds)


def statuses(answer: bytes) -> list[int]:
    """The status of each answer on the connection (a JSON body ends without a line break)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", answer)]


def head(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chat_head(*headers: str, host: str | None = "Host: 127.0.0.1") -> bytes:
    """A chat request's head with these headers (and a Host, unless ``host`` is None), no body."""
    hosts = [host] if host is not None else []
    return head([f"POST {CHAT} HTTP/1.1", *hosts, *headers, "Content-Type: application/json"])


def with_body(*headers: str, host: str | None = "Host: 127.0.0.1") -> bytes:
    return chat_head(*headers, f"Content-Length: {len(BODY)}", host=host) + BODY.encode()


AUTH = f"Authorization: Bearer {KEY}"
# A request without the key, hidden in another's body: the proxy refuses it if it sees it as a request.
HIDDEN = "GET /hidden HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def assert_nothing_hidden_reached(upstream: Upstream) -> None:
    assert all(record.path != "/hidden" for record in upstream.recorded), [r.path for r in upstream.recorded]
    for record in upstream.recorded:
        if record.path == CHAT:  # every chat request that got through carries its context
            assert [m["role"] for m in record.json()["messages"]][:2] == ["system", "system"]


def test_a_length_and_a_chunked_coding_together_do_not_smuggle_a_request(proxy: Proxy, upstream: Upstream) -> None:
    chunked = f"{len(BODY):x}\r\n{BODY}\r\n0\r\n\r\n"
    raw = chat_head(AUTH, f"Content-Length: {len(chunked)}", "Transfer-Encoding: chunked") + (chunked + HIDDEN).encode()
    answer = exchange(proxy, raw)
    assert statuses(answer)[:1] in ([200], [400]), answer[:300]
    assert_nothing_hidden_reached(upstream)


@pytest.mark.parametrize(
    "lengths",
    [["Content-Length: 4", "Content-Length: 200"], ["Content-Length: 4, 200"], ["Content-Length: -1"]],
    ids=["two-lengths", "a-list", "negative"],
)
def test_conflicting_lengths_are_a_400(proxy: Proxy, upstream: Upstream, lengths: list[str]) -> None:
    raw = chat_head(AUTH, *lengths)
    answer = exchange(proxy, raw + BODY.encode() + HIDDEN.encode())
    assert statuses(answer)[:1] == [400], answer[:300]
    assert b'"type": "invalid_request_error"' in answer or b'"type": "server_error"' not in answer
    assert upstream.recorded == []


@pytest.mark.parametrize(
    "coding", ["Transfer-Encoding: chunked, identity", "Transfer-Encoding: xchunked", "Transfer-Encoding:\tchunked "]
)
def test_odd_transfer_codings_smuggle_nothing(proxy: Proxy, upstream: Upstream, coding: str) -> None:
    chunked = f"{len(BODY):x}\r\n{BODY}\r\n0\r\n\r\n"
    raw = chat_head(AUTH, coding)
    answer = exchange(proxy, raw + (chunked + HIDDEN).encode())
    assert statuses(answer), answer[:300]  # answered, not hung
    assert_nothing_hidden_reached(upstream)


def test_a_second_authorization_header_does_not_get_past_the_key(proxy: Proxy, upstream: Upstream) -> None:
    for order in ([AUTH, "Authorization: Bearer sk-wrong"], ["Authorization: Bearer sk-wrong", AUTH]):
        answer = exchange(proxy, with_body(*order))
        assert statuses(answer)[:1] == [401], answer[:300]
    assert upstream.recorded == []


def test_a_second_host_header_does_not_get_past_the_host_check(proxy: Proxy, upstream: Upstream) -> None:
    for hosts in (["Host: 127.0.0.1", "Host: evil.example"], ["Host: evil.example", "Host: 127.0.0.1"]):
        answer = exchange(proxy, with_body(*hosts, AUTH, host=None))
        assert statuses(answer)[:1] in ([400], [403]), answer[:300]
    assert upstream.recorded == []


@pytest.mark.parametrize(
    "bad_header",
    [
        "X-Folded: a\r\n continued",
        "X-Nul: a\x00b",
        "Bad Name: x",
        "X-Bare-CR: a\rAuthorization: Bearer x",
        "X-Del: \x7f",
    ],
    ids=["obs-fold", "nul", "space-in-name", "bare-cr", "del"],
)
def test_malformed_headers_are_refused_and_forward_nothing(proxy: Proxy, upstream: Upstream, bad_header: str) -> None:
    answer = exchange(proxy, with_body(AUTH, bad_header))
    assert statuses(answer)[:1] == [400], answer[:300]
    assert upstream.recorded == []
    tab_and_utf8 = with_body(AUTH, "X-Tab: a\tb").replace(b"a\tb", "a\tcafé".encode())
    assert statuses(exchange(proxy, tab_and_utf8))[:1] == [200]  # a tab and obs-text are fine


def test_pipelined_requests_are_each_answered_and_each_injected(proxy: Proxy, upstream: Upstream) -> None:
    answer = exchange(proxy, with_body(AUTH) * 3)
    assert statuses(answer) == [200, 200, 200], answer[-600:]
    assert len(upstream.chat_requests()) == 3
    assert_nothing_hidden_reached(upstream)
