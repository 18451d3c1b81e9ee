"""Access control: PROXY_API_KEY, and no open listener without it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from inprocess import ScoutAddons
from scout_diff_cache.chat.access import (
    bearer_token,
    host_allowed,
    host_name,
    is_authorized,
    is_loopback,
    open_listen_hosts,
)
from support import Proxy, Repo, Upstream

PROXY_KEY = "sk-proxy-0123456789abcdef"
TARGET_KEY = "sk-target-fedcba9876543210"
CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_is_authorized() -> None:
    assert is_authorized(f"Bearer {PROXY_KEY}", PROXY_KEY)
    assert not is_authorized(f"Bearer {PROXY_KEY}x", PROXY_KEY)
    assert not is_authorized(PROXY_KEY, PROXY_KEY)
    assert not is_authorized(None, PROXY_KEY)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("", False),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8787", "localhost"),
        ("[::1]:8787", "::1"),
        ("::1", "::1"),
        ("Example.COM.", "example.com"),
        ("a", "a"),
    ],
)
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("127.0.0.1:8787", True),
        ("[::1]:8787", True),
        ("localhost:8787", True),
        ("app.localhost", True),
        ("10.1.2.3:8787", True),
        ("scout.internal:8787", True),
        ("evil.example:8787", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
    ],
)
def test_host_allowed(header: str, allowed: bool) -> None:
    assert host_allowed(header, ["scout.internal"]) is allowed


def test_open_listen_hosts() -> None:
    assert open_listen_hosts(["127.0.0.1", "::1"]) == []
    assert open_listen_hosts(["127.0.0.1", "", "10.0.0.1"]) == ["0.0.0.0 (all interfaces)", "10.0.0.1"]


# --- the listen policy, in-process ----------------------------------------------------------------


def test_default_listen_host_becomes_loopback(addon: ScoutAddons, make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a": "a\n"})
    with taddons.context(Proxyserver(), addon) as tctx:
        assert tctx.options.listen_host == ""  # mitmproxy's default: every interface
        tctx.configure(addon, scout_git_repo_path=str(repo.path))
        assert tctx.options.listen_host == "127.0.0.1"


@pytest.mark.parametrize(
    "options",
    [
        {"listen_host": "0.0.0.0"},
        {"listen_host": "::"},
        {"mode": ["reverse:http://127.0.0.1:9@0.0.0.0:8787"]},
    ],
)
def test_open_listener_without_key_is_refused(
    addon: ScoutAddons, make_repo: Callable[..., Repo], options: dict[str, object]
) -> None:
    repo = make_repo({"a": "a\n"})
    with taddons.context(Proxyserver(), addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"refusing to listen on .* without PROXY_API_KEY"):
            tctx.configure(addon, scout_git_repo_path=str(repo.path), **options)
        if "listen_host" in options:
            assert tctx.options.listen_host == "127.0.0.1", "the refused address must not be bound"


@pytest.mark.parametrize("settings", [{"scout_proxy_api_key": PROXY_KEY}, {"scout_allow_remote_without_key": "true"}])
def test_open_listener_with_key_or_explicit_opt_out_is_allowed(
    addon: ScoutAddons, make_repo: Callable[..., Repo], settings: dict[str, str]
) -> None:
    repo = make_repo({"a": "a\n"})
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), listen_host="0.0.0.0", **settings)
        assert tctx.options.listen_host == "0.0.0.0"


def test_mitmdump_refuses_to_start_on_an_open_address_without_a_key(
    repo_path: Path, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo_path)}, ("--listen-host", "0.0.0.0"), wait=False)
    assert proxy.process.wait(timeout=30) != 0
    log = proxy.log()
    assert "refusing to listen on 0.0.0.0 without PROXY_API_KEY" in log
    assert "ALLOW_REMOTE_WITHOUT_KEY" in log
    assert "listening at 0.0.0.0" not in log


# --- PROXY_API_KEY end to end -------------------------------------------------------------------


@pytest.fixture
def repo_path(make_repo: Callable[..., Repo]) -> Path:
    return make_repo({"a.py": "x = 1\n"}).path


def test_proxy_key_is_required_and_replaced_by_the_target_key(
    repo_path: Path, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    env = {"GIT_REPO_PATH": str(repo_path), "PROXY_API_KEY": PROXY_KEY, "TARGET_API_KEY": TARGET_KEY}
    proxy = start_proxy(upstream.url, env, ("--set", "flow_detail=3"))

    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {PROXY_KEY}"}):
        for method, path, body in (("POST", "/v1/chat/completions", CHAT_BODY), ("GET", "/health", None)):
            result = proxy.request(method, path, body, {"content-type": "application/json", **headers})
            assert result.status == 401, (headers, path)
            error = json.loads(result.body)["error"]
            assert error["code"] == "invalid_api_key"
            assert result.headers["www-authenticate"].startswith("Bearer")
    assert upstream.recorded == []

    client = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key=PROXY_KEY, max_retries=0)
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).id
    assert [m.id for m in client.models.list()] == ["llama-4-scout"]
    assert proxy.request("GET", "/health", headers={"authorization": f"Bearer {PROXY_KEY}"}).status == 200
    (chat,) = upstream.chat_requests()
    assert chat.headers["authorization"] == f"Bearer {TARGET_KEY}"

    log = proxy.log()
    assert "Bearer [PROXY_API_KEY]" in log or "Bearer [TARGET_API_KEY]" in log  # headers were printed
    assert PROXY_KEY not in log
    assert TARGET_KEY not in log
    health = proxy.request("GET", "/health", headers={"authorization": f"Bearer {PROXY_KEY}"}).body.decode()
    assert PROXY_KEY not in health
    assert TARGET_KEY not in health


def test_proxy_key_is_not_forwarded_when_there_is_no_target_key(
    repo_path: Path, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo_path), "PROXY_API_KEY": PROXY_KEY})
    result = proxy.post("/v1/chat/completions", CHAT_BODY, {"authorization": f"Bearer {PROXY_KEY}"})
    assert result.status == 200
    other = proxy.request("GET", "/v1/other", headers={"authorization": f"Bearer {PROXY_KEY}"})
    assert other.status == 200
    assert len(upstream.recorded) == 2
    for recorded in upstream.recorded:
        assert "authorization" not in recorded.headers
