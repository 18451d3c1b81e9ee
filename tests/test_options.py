"""The addon list in-process (taddons): its options, configure errors, the catch-all 500, chat route variants."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from inprocess import ScoutAddons
from scout_diff_cache.chat.routes import route_path
from support import Repo

CHAT = b"/v1/chat/completions"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def chat_flow() -> tflow.HTTPFlow:
    return tflow.tflow(req=tutils.treq(method=b"POST", path=CHAT, content=BODY), resp=False)


async def test_unconfigured_addon_answers_503_instead_of_forwarding(addon: ScoutAddons) -> None:
    flow = chat_flow()
    with taddons.context(addon):
        await addon.send_request(flow)
    assert flow.response is not None
    assert flow.response.status_code == 503
    assert json.loads(flow.response.content or b"")["error"]["code"] == "not_configured"


def test_every_setting_is_an_option_validated_in_configure(addon: ScoutAddons, make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a": "a\n"})
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon,
            scout_git_repo_path=str(repo.path),
            scout_max_file_bytes="10",
            scout_inject_context="false",
            scout_exclude_path_patterns=["docs/", "!docs/keep.md"],
        )
        assert addon.settings is not None
        assert addon.settings.max_file_bytes == 10
        assert addon.settings.inject_context is False
        assert addon.settings.exclude_path_patterns == ("docs/", "!docs/keep.md")
        with pytest.raises(exceptions.OptionsError, match="scout_max_diff_bytes"):
            tctx.options.set("scout_max_diff_bytes=many")  # as --set parses it


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"scout_inject_context": "perhaps"}, "invalid setting inject_context (option scout_inject_context)"),
        ({"scout_layout": "sideways"}, "invalid setting layout (option scout_layout)"),
        ({"scout_max_file_bytes": "0"}, "invalid setting max_file_bytes"),
        ({"scout_git_repo_path": "/"}, "invalid setting git_repo_path: / is not inside a git repository"),
    ],
)
def test_bad_settings_are_options_errors(addon: ScoutAddons, options: dict[str, object], fragment: str) -> None:
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError) as raised:
        tctx.configure(addon, **options)
    assert fragment in str(raised.value)


def test_reverse_mode_connects_lazily_from_the_first_configure(
    addon: ScoutAddons, make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo({"a": "a\n"})
    with taddons.context(Proxyserver(), addon) as tctx:
        assert tctx.options.connection_strategy == "eager"
        tctx.configure(addon, scout_git_repo_path=str(repo.path))
        assert tctx.options.connection_strategy == "lazy"  # before running: no connection sees eager
        tctx.options.connection_strategy = "eager"
        assert tctx.options.connection_strategy == "lazy"


async def test_an_unexpected_failure_is_a_500_and_the_request_is_not_forwarded(
    addon: ScoutAddons, make_repo: Callable[..., Repo], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo({"a": "a\n"})
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path))
        assert addon.provider is not None

        async def broken(*args: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(addon.provider, "current", broken)
        flow = chat_flow()
        await addon.send_request(flow)
        assert flow.response is not None
        assert flow.response.status_code == 500
        error = json.loads(flow.response.content or b"")["error"]
        assert error["code"] == "internal_error"
        assert "boom" in error["message"]
        assert flow.request.content == BODY


@pytest.mark.parametrize(
    ("raw", "routed"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions/", "/v1/chat/completions"),
        ("//v1//chat/completions?x=1", "/v1/chat/completions"),
        ("/health/", "/health"),
        ("/v1/%63hat/completions", "/v1/chat/completions"),
        ("/v1/./chat/completions", "/v1/chat/completions"),
        ("/v1/x/../chat%2Fcompletions", "/v1/chat/completions"),
        ("/", "/"),
        ("", "/"),
    ],
)
def test_route_path(raw: str, routed: str) -> None:
    assert route_path(raw) == routed


async def test_chat_path_variants_are_injected_not_forwarded_bare(
    addon: ScoutAddons, make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo({"a": "a\n"})
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), scout_upstream_connect_timeout_ms="0")
        for path in (b"/v1/chat/completions/", b"//v1/chat//completions"):
            flow = tflow.tflow(req=tutils.treq(method=b"POST", path=path, content=BODY), resp=False)
            await addon.send_request(flow)
            assert flow.response is None
            assert [m["role"] for m in json.loads(flow.request.content or b"")["messages"]] == [
                "system",
                "system",
                "user",
            ]
