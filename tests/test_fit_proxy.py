"""Every request fits the model's window, through a real mitmdump (issue 12).

The fake upstream reports a window (vLLM's ``max_model_len`` in ``GET /v1/models``) and counts
tokens like vLLM's ``POST /tokenize`` (4 characters per token); the repository is three times the
window. What is checked is what the upstream received and what a client got back.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow

from inprocess import ScoutAddons
from support import Proxy, Repo, Upstream, run_upstream

StartProxy = Callable[..., Proxy]
WINDOW = 16384
CHARS_PER_TOKEN = 4  # the fake upstream's tokenizer


def module(name: str, functions: int) -> str:
    body = [f'"""The {name} module."""\n']
    for i in range(functions):
        body.append(f'def {name}_f{i}(x):\n    """Return x times {i}."""\n    return x * {i} + {len(name)}\n\n')
    return "".join(body)


def three_windows() -> dict[str, str]:
    """About 3 x 16k tokens x 4 characters: source, tests and docs."""
    files = {f"src/pkg/mod{i:02d}.py": "from pkg import core\n" + module(f"mod{i:02d}", 40) for i in range(60)}
    files["src/pkg/core.py"] = module("core", 30)
    files.update({f"tests/test_mod{i:02d}.py": module(f"test_mod{i:02d}", 30) for i in range(10)})
    files["docs/guide.md"] = "# Guide\n" + "How to use the package.\n" * 400
    assert sum(map(len, files.values())) > 3 * WINDOW * CHARS_PER_TOKEN
    return files


def chat_body(content: str, **fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **fields}).encode()


def vllm_like(upstream: Upstream, window: int = WINDOW) -> None:
    upstream.behaviour.engine = "vllm"
    upstream.behaviour.max_model_len = window


def start_learning(
    start_proxy: StartProxy, upstream: Upstream, repo: Repo, expect: int = WINDOW, **env: str
) -> tuple[Proxy, dict[str, Any]]:
    """A proxy in front of the vLLM-like upstream, once it has learned the window (``expect``) and its tokenizer."""
    vllm_like(upstream)
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), **env})
    return proxy, wait_for_window(proxy, expect)


def wait_for_window(proxy: Proxy, tokens: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        window: dict[str, Any] = proxy.get("/health").json()["window"]
        if window["tokens"] == tokens and window["counted_by"].startswith("exact"):
            return window
        time.sleep(0.1)
    raise AssertionError(f"the window never became {tokens}: {proxy.get('/health').json()['window']}")


def message_one(upstream: Upstream, index: int = -1) -> bytes:
    return upstream.chat_requests()[index].raw_messages()[0]


def test_a_repository_three_times_the_window_is_cut_to_fit_and_every_question_answers(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(three_windows())
    proxy, window = start_learning(start_proxy, upstream, repo)
    assert window["source"] == "upstream GET /v1/models max_model_len"
    assert window["message_1_share_tokens"] == (WINDOW - 4096) * 75 // 100
    for question in ("what does core do?", "and mod07?", "list the tests"):
        reply = proxy.post("/v1/chat/completions", chat_body(question))
        assert reply.status == 200, reply.body
        fitted = reply.headers["x-scout-window"]
        assert fitted.startswith(f'tokens={WINDOW}; source="upstream GET /v1/models max_model_len"; message_1_tokens=')
        assert "; cut_to_fit=true; outlined=" in fitted and 'message_1_counted_by="exact' in fitted
    first, *others = (request.raw_messages()[0] for request in upstream.chat_requests())
    assert all(other == first for other in others)  # message 1 byte-identical across questions
    text = json.loads(first)["content"]
    assert len(text) / CHARS_PER_TOKEN <= window["message_1_share_tokens"]
    full = re.findall(r'^<file path="([^"]+)"', text, flags=re.MULTILINE)
    outlined = re.findall(r'^<outline path="([^"]+)"', text, flags=re.MULTILINE)
    assert "src/pkg/core.py" in full  # the file every other module imports
    assert outlined and all(path.startswith("src/") for path in outlined)  # source before tests and docs
    assert not any(path.startswith(("tests/", "docs/")) for path in full)
    assert "files omitted to fit the context window" in text
    health = proxy.get("/health").json()
    assert health["fit"]["cut_to_fit"] is True and health["fit"]["counted_by"].startswith("exact")
    assert re.search(r"cut to fit \d+ tokens: \d+ files in full, \d+ outlined, \d+ omitted", proxy.log())
    # A second proxy process (a replica, a restart) sends the very same message 1.
    second = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    wait_for_window(second, WINDOW)
    assert second.post("/v1/chat/completions", chat_body("again")).status == 200
    assert message_one(upstream) == first


def test_a_conversation_longer_than_the_window_gets_the_proxys_own_400_and_nothing_is_forwarded(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(three_windows())
    proxy, _ = start_learning(start_proxy, upstream, repo)
    reply = proxy.post("/v1/chat/completions", chat_body("tell me about this repository. " * 2000))
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert f"context window is {WINDOW}" in error["message"] and "over" in error["message"]
    assert upstream.chat_requests() == []
    too_long_answer = proxy.post("/v1/chat/completions", chat_body("short", max_tokens=WINDOW))
    assert too_long_answer.status == 400 and "max_tokens" in too_long_answer.json()["error"]["message"]
    assert upstream.chat_requests() == []


def test_a_working_diff_too_large_for_what_is_left_is_cut_and_says_what_it_left_out(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(three_windows())
    repo.write({f"src/pkg/new{i}.py": module(f"new{i}", 120) for i in range(3)})  # about 3 x 2.4k tokens
    proxy, _ = start_learning(start_proxy, upstream, repo)
    reply = proxy.post("/v1/chat/completions", chat_body("what changed?"))
    assert reply.status == 200, reply.body
    diff = json.loads(upstream.chat_requests()[-1].raw_messages()[1])["content"]
    assert "diff --git a/src/pkg/new0.py" in diff
    assert "new2.py" in diff.split(f"left out so the request fits the model's context window of {WINDOW} tokens")[1]
    assert "diff --git a/src/pkg/new2.py" not in diff
    assert "working diff cut to" in proxy.log()


def test_max_context_tokens_overrides_what_the_upstream_reports(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(three_windows())
    proxy, window = start_learning(start_proxy, upstream, repo, 65536, MAX_CONTEXT_TOKENS="65536")
    assert window["source"] == "MAX_CONTEXT_TOKENS" and window["learned"]["tokens"] == WINDOW
    assert proxy.post("/v1/chat/completions", chat_body("hi")).status == 200
    text = json.loads(message_one(upstream))["content"]
    assert len(text) > WINDOW * CHARS_PER_TOKEN  # planned for the larger window


def test_the_window_is_learned_again_when_the_upstream_comes_back(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    proxy, _ = start_learning(start_proxy, upstream, repo)
    upstream.behaviour.status = 503  # the model server goes down ...
    assert proxy.post("/v1/chat/completions", chat_body("hi")).status == 503
    upstream.behaviour.status = 200  # ... and comes back with another --max-model-len
    upstream.behaviour.max_model_len = 2 * WINDOW
    assert proxy.post("/v1/chat/completions", chat_body("hi")).status == 200
    wait_for_window(proxy, 2 * WINDOW)
    assert f"upstream context window: {2 * WINDOW} tokens" in proxy.log()


def test_without_a_window_from_the_upstream_the_default_is_used_and_said(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    assert proxy.post("/v1/chat/completions", chat_body("hi")).status == 200
    window = proxy.get("/health").json()["window"]
    assert window["tokens"] == 131072 and window["source"].startswith("default; not learned")
    assert window["counted_by"].startswith("estimate")
    assert "upstream context window unknown" in proxy.log()


async def test_mitmweb_shows_how_the_request_was_fitted(
    addon: ScoutAddons, make_repo: Callable[..., Repo], upstream: Upstream
) -> None:
    """The content view mitmweb renders for a rewritten flow says the window, the cut and the counts."""
    repo = make_repo(three_windows())
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), scout_max_context_tokens="16384")
        request = http.Request.make("POST", f"{upstream.url}/v1/chat/completions", chat_body("hi"))
        flow = tflow.tflow(req=request, resp=False)
        await addon.send_request(flow)
        assert flow.response is None  # forwarded
        assert "cut to fit:" in flow.comment and "outlined" in flow.comment
        shown = contentviews.prettify_message(flow.request, flow)
        assert shown.view_name == "Scout chat", shown.description
        assert re.search(r"cut to fit the window: \d+ of the repository's \d+ tokens; \d+ files outlined", shown.text)
        assert "window: 16384 tokens (MAX_CONTEXT_TOKENS); this request: message 1 " in shown.text


def test_prewarm_sends_the_fitted_message_1_the_questions_send(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(three_windows())
    proxy, _ = start_learning(start_proxy, upstream, repo, PREWARM="true")
    deadline = time.monotonic() + 30
    while not upstream.chat_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    prewarm = upstream.chat_requests()[0]
    assert prewarm.json()["max_tokens"] == 1
    assert proxy.post("/v1/chat/completions", chat_body("what is core?")).status == 200
    assert upstream.chat_requests()[-1].raw_messages()[0] == prewarm.raw_messages()[0]
    assert len(json.loads(prewarm.raw_messages()[0])["content"]) / CHARS_PER_TOKEN < WINDOW


def test_an_upstream_that_goes_away_keeps_the_window_it_had(
    make_repo: Callable[..., Repo], start_proxy: StartProxy
) -> None:
    """Message 1's plan must not change because the model server restarts: the learned window stays."""
    repo = make_repo({"a.py": "a = 1\n"})
    with run_upstream() as upstream:
        proxy, _ = start_learning(start_proxy, upstream, repo)
    assert proxy.post("/v1/chat/completions", chat_body("hi")).status in (502, 503)  # gone
    assert proxy.get("/health").status == 200  # an answer: the proxy asks the upstream again ...
    deadline = time.monotonic() + 20
    while "not re-learned" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "upstream context window not re-learned (upstream not reachable): keeping 16384" in proxy.log()
    window = proxy.get("/health").json()["window"]
    assert (window["tokens"], window["source"]) == (WINDOW, "upstream GET /v1/models max_model_len")


def test_a_tokenizer_that_fails_never_fails_a_request(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(three_windows())
    proxy, _ = start_learning(start_proxy, upstream, repo)
    messages = [{"role": "user", "content": "first"}]
    assert proxy.post("/v1/chat/completions", json.dumps({"model": "m", "messages": messages}).encode()).status == 200
    upstream.behaviour.tokenize_status = 500
    # Too long for the byte bound, short enough by the estimate: it must be counted, and the tokenizer fails.
    longer = [*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "y" * 9000}]
    assert proxy.post("/v1/chat/completions", json.dumps({"model": "m", "messages": longer}).encode()).status == 200
    assert "the upstream's tokenizer failed (POST /tokenize answered 500): counting by estimate" in proxy.log()
    assert proxy.post("/v1/chat/completions", chat_body("x" * 9000)).status == 200  # a new one, by estimate
    assert proxy.get("/health").json()["window"]["counted_by"].startswith("estimate")
