"""Each addon of the list in-process (mitmproxy's taddons, tflow), and the rules every request hook keeps."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow, tutils

from inprocess import ScoutAddons
from scout_diff_cache.chat.usage import UpstreamUsage
from scout_diff_cache.mitm import gc as gc_module
from scout_diff_cache.mitm import verdicts as verdicts_module
from scout_diff_cache.mitm.auth import ClientAuth
from scout_diff_cache.mitm.browser import BrowserGuard
from scout_diff_cache.mitm.endpoints import LocalEndpoints
from scout_diff_cache.mitm.envelopes import ErrorEnvelopes
from scout_diff_cache.mitm.forward import UpstreamForwarding
from scout_diff_cache.mitm.gc import GC_EVERY_SPLICED_BYTES, GcPacing
from scout_diff_cache.mitm.inject import ContextInjection
from scout_diff_cache.mitm.listen import ListenGuard
from scout_diff_cache.mitm.prewarm import Prewarm
from scout_diff_cache.mitm.state import METADATA_KEY
from scout_diff_cache.mitm.verdicts import CacheVerdicts
from scout_diff_cache.observe.metrics import ProxyMetrics
from scout_diff_cache.settings import SETTING_NAMES, option_name
from support import (
    SCRIPT,
    MitmwebApi,
    Proxy,
    Repo,
    Upstream,
    free_port,
    mitmdump_executable,
    mitmweb_args,
    proxy_env,
    run_proxy,
    run_upstream,
)

CHAT = b"/v1/chat/completions"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
REQUEST_HOOK_ADDONS = [BrowserGuard, ClientAuth, LocalEndpoints, ContextInjection, UpstreamForwarding]
FAIL_SCRIPT = Path(__file__).resolve().parent / "data" / "scripts" / "fail_addon.py"


def flow_for(path: bytes = CHAT, method: bytes = b"POST", content: bytes = BODY, **headers: str) -> http.HTTPFlow:
    request = tutils.treq(method=method, path=path, content=content)
    request.headers.update(headers)
    return tflow.tflow(req=request, resp=False)


@pytest.fixture
def scout(addon: ScoutAddons, make_repo: Callable[..., Repo]) -> Iterator[tuple[ScoutAddons, taddons.context]]:
    """The addon list configured on a small repository; no reachability probe (tflow's upstream is fake)."""
    repo = make_repo({"a.py": "x = 1\n"})
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), scout_upstream_connect_timeout_ms="0")
        yield addon, tctx


def metric(addon: ScoutAddons, line_start: str) -> float:
    for line in addon.state.metrics.render().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rpartition(" ")[2])
    raise AssertionError(f"no metric {line_start}")


# --- the two rules of request hooks ------------------------------------------------------------------


def load_fail_script() -> Any:
    """The failure-injecting script mitmdump loads in the end-to-end test; its FailingState serves here too."""
    spec = importlib.util.spec_from_file_location("fail_addon", FAIL_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The shared state as one addon sees it, its ``configured()`` raising: a failure inside the hook.
FailingState = load_fail_script().FailingState


def expected_status(failing: type[Any], path: bytes) -> int:
    """A failure answers 500, unless an addon before the failing one answered the request already."""
    answered_before = path == b"/health" and failing not in (BrowserGuard, ClientAuth, LocalEndpoints)
    return 200 if answered_before else 500


@pytest.mark.parametrize("kind", REQUEST_HOOK_ADDONS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("path", [CHAT, b"/health", b"/v1/other"])
async def test_a_failing_request_hook_answers_500_and_nothing_is_forwarded(
    scout: tuple[ScoutAddons, taddons.context], kind: type[Any], path: bytes
) -> None:
    addon, _ = scout
    failing = addon.get(kind)
    failing.state = FailingState(failing.state)
    flow = flow_for(path, b"POST" if path == CHAT else b"GET", BODY if path == CHAT else b"")
    await addon.send_request(flow)
    assert flow.response is not None, "an unanswered flow is forwarded"
    if expected_status(kind, path) == 200:
        assert flow.response.status_code == 200  # /health answered before the failing addon's turn
        return
    assert flow.response.status_code == 500
    error = json.loads(flow.response.content or b"")["error"]
    assert (error["code"], error["type"]) == ("internal_error", "server_error")
    assert "failure injected by the test" in error["message"]
    assert metric(addon, 'scout_errors_total{source="proxy",status="500"}') == 1


@pytest.mark.parametrize("path", [CHAT, b"/health", b"/v1/models"])
async def test_every_request_hook_leaves_an_answered_flow_alone(
    scout: tuple[ScoutAddons, taddons.context], path: bytes
) -> None:
    addon, _ = scout
    flow = flow_for(path, b"POST" if path == CHAT else b"GET", authorization="Bearer client")
    answer = http.Response.make(299, b"answered by another addon")
    flow.response = answer
    await addon.send_request(flow)
    assert flow.response is answer
    assert flow.response.content == b"answered by another addon"
    assert flow.request.content == BODY
    assert flow.request.headers["authorization"] == "Bearer client"
    assert METADATA_KEY not in flow.metadata
    assert addon.state.chats == {}


@pytest.mark.parametrize("kind", REQUEST_HOOK_ADDONS, ids=lambda k: k.__name__)
def test_a_failing_request_hook_in_a_real_mitmdump_forwards_nothing(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy], kind: type[Any]
) -> None:
    repo = make_repo({"a.py": "x = 1\n"})
    env = {"GIT_REPO_PATH": str(repo.path), "SCOUT_TEST_FAILING_ADDON": kind.__name__}
    proxy = start_proxy(upstream.url, env, ("-s", str(FAIL_SCRIPT)))
    for method, path, body in (("POST", "/v1/chat/completions", BODY), ("GET", "/health", None), ("GET", "/x", None)):
        result = proxy.request(method, path, body, {"content-type": "application/json"})
        assert result.status == expected_status(kind, path.encode()), (path, result.body)
        if result.status == 500:
            assert result.json()["error"]["code"] == "internal_error"
    assert upstream.recorded == []
    assert f"scout-diff-cache: {kind.__name__} failed on" in proxy.log()


def test_a_chat_request_without_context_is_never_forwarded(addon: ScoutAddons, make_repo: Callable[..., Repo]) -> None:
    """Forwarding checks the rewrite happened: a list that lost its injection addon still forwards nothing bare."""
    addon.addons = [a for a in addon.addons if not isinstance(a, ContextInjection)]
    repo = make_repo({"a.py": "x = 1\n"})
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), scout_upstream_connect_timeout_ms="0")
        flow = flow_for()
        tctx.master.event_loop.run_until_complete(addon.send_request(flow))
    assert flow.response is not None and flow.response.status_code == 500
    assert "has no context" in json.loads(flow.response.content or b"")["error"]["message"]


# --- one addon at a time -------------------------------------------------------------------------------


def test_options_show_effective_defaults_and_never_a_key(
    addon: ScoutAddons, make_repo: Callable[..., Repo], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_FILE_BYTES", "1234")
    monkeypatch.setenv("PROXY_API_KEY", "sk-secret-from-env")
    repo = make_repo({"a.py": "x = 1\n"})
    with taddons.context(addon) as tctx:
        assert tctx.options.default("scout_max_file_bytes") == "1234"
        assert tctx.options.default("scout_layout") == "append"
        assert tctx.options.default("scout_prewarm") == "false"
        assert tctx.options.default("scout_proxy_api_key") is None
        tctx.configure(addon, scout_git_repo_path=str(repo.path), listen_host="127.0.0.1")
        assert addon.settings is not None
        assert (addon.settings.max_file_bytes, addon.settings.proxy_api_key) == (1234, "sk-secret-from-env")
        tctx.configure(addon, scout_max_file_bytes="99")  # an option set by the user wins over the environment
        assert addon.settings.max_file_bytes == 99


@pytest.mark.parametrize(
    ("sockname", "settings", "refused"),
    [
        (("127.0.0.1", 8787), {}, False),
        (("::1", 8787, 0, 0), {}, False),
        (("::ffff:127.0.0.1", 8787, 0, 0), {}, False),
        (("192.0.2.10", 8787), {}, True),
        (("2001:db8::1", 8787, 0, 0), {}, True),
        (("192.0.2.10", 8787), {"scout_proxy_api_key": "k"}, False),
        (("192.0.2.10", 8787), {"scout_allow_remote_without_key": "true"}, False),
    ],
)
def test_listen_guard_closes_connections_to_addresses_the_policy_does_not_allow(
    addon: ScoutAddons,
    make_repo: Callable[..., Repo],
    sockname: tuple[Any, ...],
    settings: dict[str, Any],
    refused: bool,
) -> None:
    repo = make_repo({"a.py": "x = 1\n"})
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), **settings)
        client = tflow.tclient_conn()
        client.sockname = sockname
        addon.get(ListenGuard).client_connected(client)
        assert (client.error is not None) is refused


def test_listen_guard_refuses_remote_connections_before_it_is_configured(addon: ScoutAddons) -> None:
    client = tflow.tclient_conn()
    client.sockname = ("192.0.2.10", 8787)
    addon.get(ListenGuard).client_connected(client)
    assert client.error is not None


async def test_local_endpoints_answer_models_metrics_and_health(scout: tuple[ScoutAddons, taddons.context]) -> None:
    addon, _ = scout
    answers = {}
    for path in (b"/v1/models", b"/v1/models/llama-4-scout", b"/v1/models/other", b"/metrics", b"/health"):
        flow = flow_for(path, b"GET", b"")
        await addon.send_request(flow)
        assert flow.response is not None
        answers[path] = flow.response
    assert json.loads(answers[b"/v1/models"].content or b"")["data"][0]["id"] == "llama-4-scout"
    assert json.loads(answers[b"/v1/models/llama-4-scout"].content or b"")["id"] == "llama-4-scout"
    assert answers[b"/v1/models/other"].status_code == 404
    assert b"scout_chat_requests_total" in (answers[b"/metrics"].content or b"")
    assert json.loads(answers[b"/health"].content or b"")["status"] == "ok"
    assert addon.state.chats == {}


async def test_injection_owns_the_chat_route(scout: tuple[ScoutAddons, taddons.context]) -> None:
    addon, tctx = scout
    get = flow_for(CHAT, b"GET", b"")
    await addon.send_request(get)
    assert get.response is not None and get.response.status_code == 405
    assert get.response.headers["allow"] == "POST, OPTIONS"
    preflight = flow_for(CHAT, b"OPTIONS", b"")
    await addon.send_request(preflight)
    assert preflight.response is None  # the upstream answers CORS preflights
    chat = flow_for()
    await addon.send_request(chat)
    assert chat.response is None
    assert [m["role"] for m in json.loads(chat.request.content or b"")["messages"]] == ["system", "system", "user"]
    assert chat.id in addon.state.chats and METADATA_KEY in chat.metadata
    tctx.configure(addon, scout_inject_context="false")
    bare = flow_for()
    await addon.send_request(bare)
    assert bare.response is None and bare.request.content == BODY
    assert metric(addon, 'scout_chat_requests_total{outcome="passthrough"}') == 1


async def test_forwarding_swaps_the_key_and_masks_it_once_answered(
    scout: tuple[ScoutAddons, taddons.context],
) -> None:
    addon, tctx = scout
    tctx.configure(addon, scout_proxy_api_key="sk-proxy", scout_target_api_key="sk-target")
    flow = flow_for(authorization="Bearer sk-proxy")
    await addon.send_request(flow)
    assert flow.response is None
    assert flow.request.headers["authorization"] == "Bearer sk-target"
    flow.response = tutils.tresp(content=b'{"choices": []}')
    addon.get(UpstreamForwarding).responseheaders(flow)
    assert flow.request.headers["authorization"] == "Bearer [TARGET_API_KEY]"
    tctx.configure(addon, scout_target_api_key=None)
    flow = flow_for(authorization="Bearer sk-proxy")
    await addon.send_request(flow)
    assert "authorization" not in flow.request.headers


async def test_verdicts_label_the_answer_and_count_the_outcome(scout: tuple[ScoutAddons, taddons.context]) -> None:
    addon, _ = scout
    flow = flow_for()
    await addon.send_request(flow)
    usage = {"prompt_tokens": 400, "prompt_tokens_details": {"cached_tokens": 380}}
    flow.response = tutils.tresp(content=json.dumps({"choices": [], "usage": usage}).encode())
    verdicts = addon.get(CacheVerdicts)
    verdicts.responseheaders(flow)
    await verdicts.response(flow)
    assert flow.response.headers["x-scout-snapshot-commit"] == flow.metadata[METADATA_KEY]["commit"]
    assert flow.response.headers["x-scout-cache-expected"] == "miss; first request to this upstream"
    assert flow.response.headers["x-scout-cache"].startswith("hit; cached_tokens=380; prompt_tokens=400")
    assert flow.metadata[METADATA_KEY]["cache"]["verdict"] == "hit"
    assert flow.comment.startswith("hit 95.0% · snap ")  # the verdict first: mitmweb's flow list shows the start
    assert metric(addon, 'scout_chat_requests_total{outcome="hit"}') == 1
    assert addon.state.chats == {}


async def test_a_large_answer_is_read_for_its_usage_off_the_event_loop(
    scout: tuple[ScoutAddons, taddons.context], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 GB answer once held the event loop for 11 s in the usage parse; every other client waited."""
    addon, _ = scout
    parsed_on: list[bool] = []
    original = verdicts_module.usage_from_body

    def recording(body: bytes) -> UpstreamUsage | None:
        parsed_on.append(threading.current_thread() is threading.main_thread())
        return original(body)

    monkeypatch.setattr(verdicts_module, "usage_from_body", recording)
    usage = {"prompt_tokens": 400, "prompt_tokens_details": {"cached_tokens": 380}}
    verdicts = addon.get(CacheVerdicts)
    for text in ("short", "x" * (2 << 20)):
        flow = flow_for()
        await addon.send_request(flow)
        answer = {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": usage}
        flow.response = tutils.tresp(content=json.dumps(answer).encode())
        verdicts.responseheaders(flow)
        await verdicts.response(flow)
        assert flow.response.headers["x-scout-cache"].startswith("hit; cached_tokens=380")
    assert parsed_on == [True, False]  # the small one on the loop, the 2 MiB one in a thread


async def test_a_chat_the_proxy_answered_itself_is_a_proxy_error_without_context_headers(
    scout: tuple[ScoutAddons, taddons.context], upstream: Upstream
) -> None:
    addon, tctx = scout
    tctx.configure(addon, scout_upstream_connect_timeout_ms="3000")
    flow = flow_for()
    flow.request.port = 9  # the discard port: nothing listens, the probe is refused
    flow.request.host = "127.0.0.1"
    await addon.send_request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    verdicts = addon.get(CacheVerdicts)
    verdicts.responseheaders(flow)
    await verdicts.response(flow)
    assert "x-scout-snapshot-commit" not in flow.response.headers
    assert flow.metadata[METADATA_KEY]["outcome"] == "proxy_error"
    assert metric(addon, 'scout_chat_requests_total{outcome="proxy_error"}') == 1
    assert metric(addon, 'scout_errors_total{source="proxy",status="503"}') == 1


def test_error_envelopes_render_mitmproxys_own_errors_and_count_them(addon: ScoutAddons) -> None:
    response = addon.get(ErrorEnvelopes).render(503, "connection refused")
    error = json.loads(response.content or b"")["error"]
    assert (response.status_code, error["code"]) == (503, "upstream_unavailable")
    assert "connection refused" in error["message"]
    assert metric(addon, 'scout_errors_total{source="proxy",status="503"}') == 1


def test_gc_pacing_collects_after_enough_spliced_bytes(addon: ScoutAddons, monkeypatch: pytest.MonkeyPatch) -> None:
    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or 0)
    pacing = addon.get(GcPacing)
    addon.state.spliced_bytes = GC_EVERY_SPLICED_BYTES - 1
    pacing.response(tflow.tflow(resp=True))
    assert collections == []
    addon.state.spliced_bytes = GC_EVERY_SPLICED_BYTES
    pacing.error(tflow.tflow(err=True))
    assert collections == [1]
    assert addon.state.spliced_bytes == 0


async def test_prewarm_sends_one_prefill_per_new_base(addon: ScoutAddons, make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.py": "x = 1\n"})
    with run_upstream() as upstream, taddons.context(addon) as tctx:
        tctx.configure(
            addon, scout_git_repo_path=str(repo.path), scout_prewarm="true", mode=[f"reverse:{upstream.url}"]
        )
        prewarm = addon.get(Prewarm)
        await prewarm.poll()
        await prewarm.poll()  # nothing changed: nothing sent
        (sent,) = upstream.chat_requests()
        body = sent.json()
        assert body["max_tokens"] == 1 and body["model"] == "llama-4-scout"
        assert [m["role"] for m in body["messages"]] == ["system", "system", "user"]
        assert body["messages"][0]["content"].startswith(f"Base commit: {repo.head()}\nThis is a snapshot of a git")
        assert metric(addon, 'scout_prewarm_requests_total{result="ok"}') == 1
        tctx.configure(addon, scout_prewarm="false")
        repo.write({"b.py": "y = 2\n"})
        repo.commit_all("second")
        addon.provider.monitor.note_change()  # type: ignore[union-attr]
        await prewarm.poll()
        assert len(upstream.chat_requests()) == 1  # off: nothing more


def test_metrics_render_what_was_counted() -> None:
    metrics = ProxyMetrics()
    metrics.error(401, "proxy")
    metrics.error(502, "upstream")
    metrics.snapshot_lookup("wait")
    metrics.injected(1000, 10)
    text = metrics.render().decode()
    assert 'scout_errors_total{source="proxy",status="401"} 1.0' in text
    assert 'scout_errors_total{source="upstream",status="502"} 1.0' in text
    assert 'scout_snapshot_cache_lookups_total{result="wait"} 1.0' in text
    assert 'scout_snapshot_cache_lookups_total{result="hit"} 0.0' in text  # every label exists from the start
    assert "scout_injected_bytes_total 1000.0" in text
    assert 'scout_chat_requests_total{outcome="client_gone"} 0.0' in text


def test_the_script_exposes_the_addon_list() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(SCRIPT.read_text(), str(SCRIPT), "exec"), namespace)
    kinds = [type(a).__name__ for a in namespace["addons"]]
    assert kinds[0] == "ScoutOptions"
    assert kinds.index("ClientAuth") < kinds.index("LocalEndpoints") < kinds.index("ContextInjection")
    assert kinds.index("ContextInjection") < kinds.index("UpstreamForwarding")
    states = {id(a.state) for a in namespace["addons"]}
    assert len(states) == 1  # one shared state


async def test_client_auth_requires_the_key_and_masks_it(scout: tuple[ScoutAddons, taddons.context]) -> None:
    addon, tctx = scout
    tctx.configure(addon, scout_proxy_api_key="sk-proxy")
    for header in (None, "Bearer wrong", "Basic sk-proxy"):
        flow = flow_for(b"/health", b"GET", b"", **({"authorization": header} if header else {}))
        await addon.send_request(flow)
        assert flow.response is not None and flow.response.status_code == 401
        assert flow.response.headers["www-authenticate"].startswith("Bearer")
        assert flow.request.headers.get("authorization") in (None, "[rejected]")
    flow = flow_for(b"/health", b"GET", b"", authorization="Bearer sk-proxy")
    await addon.send_request(flow)
    assert flow.response is not None and flow.response.status_code == 200
    assert flow.request.headers["authorization"] == "Bearer [PROXY_API_KEY]"


def test_the_chat_view_is_registered_while_loaded(addon: ScoutAddons) -> None:
    with taddons.context(addon):
        assert "scout chat" in contentviews.registry
    addon.stop()
    assert "scout chat" not in contentviews.registry


def test_mitmdump_options_lists_every_setting_with_its_effective_default(
    make_repo: Callable[..., Repo], tmp_path: Path
) -> None:
    repo = make_repo({"a.py": "x = 1\n"})
    env = {"GIT_REPO_PATH": str(repo.path), "MAX_FILE_BYTES": "2048", "PROXY_API_KEY": "sk-never-shown"}
    result = subprocess.run(
        [mitmdump_executable(), "-s", str(SCRIPT), "--options", "--set", f"confdir={tmp_path / 'conf'}"],
        env=proxy_env(env, tmp_path),
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    options = yaml.safe_load(out)
    for setting in SETTING_NAMES:
        assert option_name(setting) in options
    assert options["scout_max_file_bytes"] == "2048"  # from the environment
    assert options["scout_max_snapshot_bytes"] == "67108864"  # built in
    assert options["scout_layout"] == "append"
    assert options["scout_inject_context"] == "true"
    assert options["scout_proxy_api_key"] is None
    assert "sk-never-shown" not in out
    assert "Files larger than this are skipped and listed" in out  # the help text


def test_mitmwebs_options_page_shows_and_edits_the_settings(
    make_repo: Callable[..., Repo], upstream: Upstream, tmp_path: Path
) -> None:
    """What mitmweb's Options page renders and sends: its /options API."""
    repo = make_repo({"a.py": "x = 1\n"})
    env = {"GIT_REPO_PATH": str(repo.path), "MAX_FILE_BYTES": "4096", "TARGET_API_KEY": "sk-target-never-shown"}
    web_port, token = free_port(), secrets.token_hex(16)
    with run_proxy(upstream.url, tmp_path / "web", env, mitmweb_args(web_port, token), program="mitmweb"):
        api = MitmwebApi(web_port, token)
        page = api.get("/options.json")
        options = json.loads(page)
        assert options["scout_max_file_bytes"]["default"] == "4096"
        assert options["scout_max_file_bytes"]["value"] == "4096"
        assert "Files larger than this are skipped" in options["scout_max_file_bytes"]["help"]
        assert options["scout_layout"]["choices"] == ["append", "per-commit"]
        assert options["scout_target_api_key"]["value"] is None
        assert b"sk-target-never-shown" not in page

        assert api.put_json("/options", {"scout_max_file_bytes": "100"}).status == 200
        assert json.loads(api.get("/options.json"))["scout_max_file_bytes"]["value"] == "100"
        refused = api.put_json("/options", {"scout_max_file_bytes": "lots"})
        assert refused.status == 400
        assert b"invalid setting max_file_bytes (option scout_max_file_bytes)" in refused.body
        assert json.loads(api.get("/options.json"))["scout_max_file_bytes"]["value"] == "100"


async def test_browser_guard_refuses_foreign_hosts_and_origins_and_drops_upstream_cors(
    scout: tuple[ScoutAddons, taddons.context],
) -> None:
    addon, _ = scout
    rebinding = flow_for(b"/health", b"GET", b"")
    rebinding.request.host_header = "evil.example:8787"
    page = flow_for(origin="http://evil.example")
    for flow, code in ((rebinding, "host_not_allowed"), (page, "origin_not_allowed")):
        await addon.send_request(flow)
        assert flow.response is not None and flow.response.status_code == 403
        assert json.loads(flow.response.content or b"")["error"]["code"] == code
    passed = flow_for(b"/v1/other", b"GET", b"")
    passed.response = http.Response.make(200, b"", {"access-control-allow-origin": "*", "x-other": "1"})
    addon.get(BrowserGuard).responseheaders(passed)
    assert "access-control-allow-origin" not in passed.response.headers
    assert passed.response.headers["x-other"] == "1"


async def test_gc_pacing_collects_and_trims_once_the_proxy_is_idle(
    addon: ScoutAddons, monkeypatch: pytest.MonkeyPatch
) -> None:
    collections: list[int] = []
    trims: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or 0)
    monkeypatch.setattr(gc_module, "release_free_memory", lambda: trims.append(1))
    monkeypatch.setattr(gc_module, "IDLE_SECONDS", 0.05)
    pacing = addon.get(GcPacing)
    addon.state.spliced_bytes = 1000
    addon.state.chats["in flight"] = object()  # type: ignore[assignment]
    pacing.response(tflow.tflow(resp=True))
    await asyncio.sleep(0.2)
    assert (collections, trims) == ([], [])  # a chat still in flight: not idle
    del addon.state.chats["in flight"]
    pacing.client_disconnected(tflow.tclient_conn())
    await asyncio.sleep(0.2)
    assert (collections, trims) == ([1], [1])
    assert addon.state.spliced_bytes == 0
