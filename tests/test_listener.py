"""The sockets a real mitmdump binds, and requests sent in the first instants after it starts.

mitmproxy binds its listeners before it loads ``-s`` scripts, so what the addon decides about the
listen address must be checked on the sockets the process really holds, not on an option.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from support import Proxy, Repo, Upstream, http_request, run_proxy

PROXY_KEY = "sk-proxy-listener-test"
CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket the process listens on."""
    return {
        (str(c.laddr.ip), int(c.laddr.port))
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def settled_listeners(proxy: Proxy, expected: set[tuple[str, int]], timeout: float = 10) -> set[tuple[str, int]]:
    """The sockets bound once they equal ``expected`` or ``timeout`` passed (mitmproxy binds, then the addon)."""
    deadline = time.monotonic() + timeout
    bound = listening(proxy.process.pid)
    while bound != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        bound = listening(proxy.process.pid)
    return bound


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def repo_path(make_repo: Callable[..., Repo]) -> Path:
    return make_repo({"a.py": "x = 1\n"}).path


def test_the_default_listener_is_loopback_only(
    repo_path: Path, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """As a new user starts it: no --listen-host (mitmproxy's own default is every interface)."""
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo_path)}, listen=())
    expected = {("127.0.0.1", proxy.port)}
    assert settled_listeners(proxy, expected) == expected
    assert proxy.get("/health").status == 200
    assert listening(proxy.process.pid) == expected, "nothing else was bound while serving"


@pytest.mark.parametrize(
    ("launch", "shown"),
    [
        pytest.param({"listen": ("--listen-host", "0.0.0.0")}, "0.0.0.0", id="listen-host-any"),
        pytest.param({"listen": (), "mode_suffix": "@0.0.0.0:{port}"}, "0.0.0.0", id="mode-at-any"),
        pytest.param({"listen": ("--listen-host", "::")}, "::", id="listen-host-ipv6-any"),
    ],
)
def test_an_open_listener_is_bound_only_with_a_key(
    repo_path: Path,
    upstream: Upstream,
    start_proxy: Callable[..., Proxy],
    launch: dict[str, object],
    shown: str,
) -> None:
    if shown == "::" and not ipv6_loopback():
        pytest.skip("no IPv6 on this machine")
    refused = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo_path)}, wait=False, **launch)
    assert refused.wait_exit() != 0
    assert f"refusing to listen on {shown} without PROXY_API_KEY" in refused.log()

    env = {"GIT_REPO_PATH": str(repo_path), "PROXY_API_KEY": PROXY_KEY}
    allowed = start_proxy(upstream.url, env, wait=False, **launch)
    expected = {(shown, allowed.port)}
    assert settled_listeners(allowed, expected, timeout=30) == expected
    loopback = "[::1]" if shown == "::" else "127.0.0.1"  # an IPv6 socket takes no IPv4 connections
    url = f"http://{loopback}:{allowed.port}/health"
    assert http_request("GET", url, headers={"authorization": f"Bearer {PROXY_KEY}"}).status == 200
    assert http_request("GET", url).status == 401


def test_an_ipv6_loopback_listener_needs_no_key(
    repo_path: Path, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    if not ipv6_loopback():
        pytest.skip("no IPv6 on this machine")
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo_path)}, listen=("--listen-host", "::1"), wait=False)
    expected = {("::1", proxy.port)}
    assert settled_listeners(proxy, expected, timeout=30) == expected


# --- the first instants ------------------------------------------------------------------------------


@dataclass
class EarlyClient:
    """Connects as soon as the port accepts (like a supervisor's health check), then sends its requests."""

    port: int
    requests: list[tuple[str, str, bytes | None]]
    answers: list[tuple[int, bytes]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    refusals: int = 0  # connection attempts refused before the port was open

    def run(self, deadline: float) -> None:
        for method, path, body in self.requests:
            try:
                self.answers.append(self._send(method, path, body, deadline))
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(f"{method} {path}: {type(e).__name__}: {e}")

    def _send(self, method: str, path: str, body: bytes | None, deadline: float) -> tuple[int, bytes]:
        while True:  # until the port accepts, bounded by the deadline
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                connection.connect()
                break
            except ConnectionRefusedError:
                self.refusals += 1
                connection.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        try:
            headers = {"content-type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def test_requests_started_before_the_port_opens_all_get_answers(repo_path: Path, tmp_path: Path) -> None:
    """The upstream is down: /health and the models list are answered by the proxy, a chat gets a 503.

    mitmproxy's reverse mode connects upstream eagerly and drops the client when that fails; a
    request accepted before the addon switched that off got no answer at all.
    """
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refused
        requests = [("GET", "/health", None), ("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT_BODY)]
        clients = [EarlyClient(0, requests) for _ in range(8)]  # the port is known once mitmdump is started
        deadline = time.monotonic() + 60
        threads: list[threading.Thread] = []
        with contextlib.ExitStack() as stack:
            proxy = stack.enter_context(
                run_proxy(down, tmp_path / "proxy", {"GIT_REPO_PATH": str(repo_path)}, wait=False)
            )
            for client in clients:
                client.port = proxy.port
                thread = threading.Thread(target=client.run, args=(deadline,), daemon=True)
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join(timeout=max(deadline - time.monotonic(), 0.1))
            log = proxy.log()
    assert all(not thread.is_alive() for thread in threads)
    failures = [failure for client in clients for failure in client.failures]
    assert failures == [], f"{failures}\n{log}"
    for client in clients:
        statuses = [status for status, _ in client.answers]
        assert statuses == [200, 200, 503], client.answers
        assert json.loads(client.answers[2][1])["error"]["code"] == "upstream_unavailable"
    assert "error establishing server connection" not in log
    assert all(client.refusals > 0 for client in clients), "every client started before the port was open"
