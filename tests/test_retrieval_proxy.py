"""What did not fit is still found, through a real mitmdump (issue 14).

The fake upstream reports a 32k window (vLLM's ``max_model_len``) and counts 4 characters per
token; the repository (``needles.py``) is four times that, with thirty planted functions each
defined only in a module message 1 leaves out. What is checked is what the upstream received
and what the client got back.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow

from inprocess import ScoutAddons
from needles import DESCRIBED, NAMED, NEEDLES, needle_files
from scout_diff_cache.context import retrieval
from scout_diff_cache.context.retrieval import build_index
from support import Proxy, Repo, Upstream

StartProxy = Callable[..., Proxy]
WINDOW = 32768
WATCH_SECONDS = 0.3
RETRIEVAL_START = "Files retrieved for the latest question"


def start(start_proxy: StartProxy, upstream: Upstream, repo: Repo, **env: str) -> Proxy:
    upstream.behaviour.engine = "vllm"
    upstream.behaviour.max_model_len = WINDOW
    return start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), **env})


def wait_for_index(proxy: Proxy, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = proxy.get("/health").json()
        if health["window"]["tokens"] == WINDOW and health["retrieval"]["status"] == "ready":
            retrieval: dict[str, Any] = health["retrieval"]
            return retrieval
        time.sleep(0.1)
    raise AssertionError(f"the index was never ready: {proxy.get('/health').json()['retrieval']}")


def ask(proxy: Proxy, messages: list[dict[str, Any]]) -> dict[str, str]:
    reply = proxy.post("/v1/chat/completions", json.dumps({"model": "m", "messages": messages}).encode())
    assert reply.status == 200, reply.body
    return reply.headers


def question(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def contents(raws: list[bytes]) -> list[str]:
    return [str(json.loads(raw)["content"]) for raw in raws]


def retrieval_messages(upstream: Upstream, index: int = -1) -> list[str]:
    return [
        text for text in contents(upstream.chat_requests()[index].raw_messages()) if text.startswith(RETRIEVAL_START)
    ]


def block(path: str) -> str:
    return f'<file path="{path}">\n'


def test_thirty_needle_questions_get_the_defining_file_and_message_1_never_changes(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(needle_files())
    proxy = start(start_proxy, upstream, repo)
    index = wait_for_index(proxy)
    assert index["files"] >= len(NEEDLES) and index["commit"] == repo.head()
    found = {"named": 0, "described": 0}
    message_1 = None
    for kind, needles in (("named", NAMED), ("described", DESCRIBED)):
        for needle in needles:
            headers = ask(proxy, question(needle.named if kind == "named" else needle.described))
            raws = upstream.chat_requests()[-1].raw_messages()
            message_1 = message_1 or raws[0]
            assert raws[0] == message_1  # byte-identical across all thirty
            assert block(needle.path) not in contents(raws[:1])[0]  # the needle is left out of message 1
            retrieved = retrieval_messages(upstream)
            assert len(retrieved) == 1 and contents(raws).index(retrieved[0]) == 2  # after the working diff
            if block(needle.path) in retrieved[0]:
                found[kind] += 1
                assert needle.path in headers["x-scout-retrieved"]
            assert headers["x-scout-retrieval"].startswith("retrieved ")
    assert found["named"] >= 0.95 * len(NAMED), found
    assert found["described"] >= 0.7 * len(DESCRIBED), found
    assert f"defines {NAMED[0].name}" in proxy.log()
    metrics = proxy.get("/metrics").body.decode()
    assert 'scout_retrievals_total{outcome="retrieved"} 30.0' in metrics
    assert "scout_retrieved_files_total" in metrics and "scout_retrieved_tokens_total" in metrics


async def test_until_the_index_is_built_requests_go_out_with_their_context_and_say_so(
    addon: ScoutAddons, make_repo: Callable[..., Repo], upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(needle_files())
    release = threading.Event()

    def held_build(*args: Any) -> Any:
        assert release.wait(30)
        return build_index(*args)

    monkeypatch.setattr(retrieval, "build_index", held_build)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), scout_max_context_tokens=str(WINDOW))
        body = json.dumps({"model": "m", "messages": question(NAMED[0].named)}).encode()
        flow = tflow.tflow(req=http.Request.make("POST", f"{upstream.url}/v1/chat/completions", body), resp=False)
        await addon.send_request(flow)
        assert flow.response is None  # forwarded, with its context
        messages = json.loads(flow.request.content or b"")["messages"]
        assert len(messages) == 3 and not messages[2]["content"].startswith(RETRIEVAL_START)
        assert "no retrieval: the search index of the left-out files is being built" in flow.comment
        assert addon.state.retriever is not None and addon.state.retriever.state().status == "building"
        release.set()
        for _ in range(200):
            flow = tflow.tflow(req=http.Request.make("POST", f"{upstream.url}/v1/chat/completions", body), resp=False)
            await addon.send_request(flow)
            if "retrieved 1 file" in flow.comment:
                break
            await asyncio.sleep(0.05)
        messages = json.loads(flow.request.content or b"")["messages"]
        assert messages[2]["content"].startswith(RETRIEVAL_START) and block(NAMED[0].path) in messages[2]["content"]
        metrics = addon.state.metrics.render().decode()
        assert 'scout_retrievals_total{outcome="retrieved"} 1.0' in metrics
        assert re.search(r'scout_retrievals_total\{outcome="index_building"\} [1-9]', metrics)


def test_a_conversation_gets_a_file_once_and_again_only_after_it_changed(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(needle_files())
    proxy = start(start_proxy, upstream, repo)
    wait_for_index(proxy)
    needle = NAMED[3]
    messages = question(needle.named)
    ask(proxy, messages)
    first = upstream.chat_requests()[-1].raw_messages()
    assert block(needle.path) in contents(first)[2]

    messages = [*messages, {"role": "assistant", "content": "It merges."}, {"role": "user", "content": needle.named}]
    headers = ask(proxy, messages)
    second = upstream.chat_requests()[-1].raw_messages()
    assert second[: len(first)] == first  # the retrieval message kept in place: the whole prompt is cached
    assert len(second) == len(first) + 2  # nothing retrieved again: the conversation holds the file
    assert "x-scout-retrieved" not in headers
    assert headers["x-scout-retrieval"].startswith("nothing found")

    changed = needle_files()[needle.path].replace(needle.doc, needle.doc + " Invoices in dispute are skipped.")
    repo.write({needle.path: changed})
    repo.commit_all("skip disputed invoices")
    time.sleep(WATCH_SECONDS)
    messages = [*messages, {"role": "assistant", "content": "Merged."}, {"role": "user", "content": needle.named}]
    headers = ask(proxy, messages)
    third = upstream.chat_requests()[-1].raw_messages()
    assert third[: len(second)] == second
    new = contents(third[len(second) :])
    assert new[0].startswith("Changes to the repository since the previous context message")
    assert new[1].startswith(RETRIEVAL_START) and "Invoices in dispute are skipped." in new[1]  # the changed file
    assert needle.path in headers["x-scout-retrieved"]
    assert proxy.get("/health").json()["retrieval"]["commit"] == repo.head()  # updated, not rebuilt


def test_retrieval_tokens_0_turns_it_off(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(needle_files())
    proxy = start(start_proxy, upstream, repo, RETRIEVAL_TOKENS="0")
    assert proxy.get("/health").json()["retrieval"] == {"status": "off"}
    headers = ask(proxy, question(NAMED[0].named))
    assert "x-scout-retrieval" not in headers and "x-scout-retrieved" not in headers
    assert not retrieval_messages(upstream) and len(upstream.chat_requests()[-1].raw_messages()) == 3


def test_a_repository_that_fits_has_nothing_to_retrieve(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"src/a.py": "def compute_parcel_surcharge():\n    return 1\n"})
    proxy = start(start_proxy, upstream, repo)
    assert proxy.get("/health").json()["retrieval"] == {"status": "nothing left out"}
    headers = ask(proxy, question(NAMED[0].named))
    assert "x-scout-retrieval" not in headers and len(upstream.chat_requests()[-1].raw_messages()) == 3


def test_a_small_retrieval_budget_takes_what_fits_and_names_the_rest(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(needle_files())
    proxy = start(start_proxy, upstream, repo, RETRIEVAL_TOKENS="1200")
    wait_for_index(proxy)
    both = f"Compare `{NAMED[0].name}` with `{NAMED[1].name}`."
    headers = ask(proxy, question(both))
    (retrieved,) = retrieval_messages(upstream)
    assert headers["x-scout-retrieved"].count(";why=") == 1  # one file of about 750 tokens fits in 1200
    assert "Also found for this question but left out for lack of room: " in retrieved
    assert len(retrieved) / 4 <= 1200


async def test_mitmweb_names_the_retrieved_files(
    addon: ScoutAddons, make_repo: Callable[..., Repo], upstream: Upstream
) -> None:
    repo = make_repo(needle_files())
    needle = NAMED[5]
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), scout_max_context_tokens=str(WINDOW))
        body = json.dumps({"model": "m", "messages": question(needle.named)}).encode()
        for _ in range(200):  # the first request starts the index build; later ones use it
            flow = tflow.tflow(req=http.Request.make("POST", f"{upstream.url}/v1/chat/completions", body), resp=False)
            await addon.send_request(flow)
            if "retrieved 1 file" in flow.comment:
                break
            await asyncio.sleep(0.05)
        assert "retrieved 1 file" in flow.comment and f"{needle.path} (defines {needle.name})" in flow.comment
        shown = contentviews.prettify_message(flow.request, flow)
        assert "messages[2] (left-out files retrieved for the question, injected by the proxy) system" in shown.text
        assert f"files: {needle.path}\n" in shown.text
        assert "1 retrieved-files message, 1 from the client" in shown.text


async def test_an_index_that_cannot_be_built_never_fails_a_question(
    addon: ScoutAddons, make_repo: Callable[..., Repo], upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(needle_files())

    def broken_build(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(retrieval, "build_index", broken_build)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path), scout_max_context_tokens=str(WINDOW))
        body = json.dumps({"model": "m", "messages": question(NAMED[0].named)}).encode()
        for _ in range(200):
            flow = tflow.tflow(req=http.Request.make("POST", f"{upstream.url}/v1/chat/completions", body), resp=False)
            await addon.send_request(flow)
            assert flow.response is None  # forwarded every time, with message 1 and the working diff
            assert len(json.loads(flow.request.content or b"")["messages"]) == 3
            if "index failed" in flow.comment:
                break
            await asyncio.sleep(0.02)
        assert "no retrieval: index failed: RuntimeError: boom" in flow.comment
        assert (
            addon.state.retriever is not None and addon.state.retriever.state().status == "failed: RuntimeError: boom"
        )


def test_a_request_with_nothing_to_search_for_says_so_and_is_counted(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo(needle_files())
    proxy = start(start_proxy, upstream, repo)
    wait_for_index(proxy)
    headers = ask(proxy, [{"role": "system", "content": "Be brief."}])
    assert headers["x-scout-retrieval"] == "nothing found: no user message or tool result to search for"
    assert "no retrieval: no user message or tool result to search for" in proxy.log()
    assert 'scout_retrievals_total{outcome="nothing_found"} 1.0' in proxy.get("/metrics").body.decode()
