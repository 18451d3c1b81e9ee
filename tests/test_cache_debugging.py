"""End to end: cache verdicts, response headers, the log line, mitmweb comments, /metrics and /health.

A real mitmdump runs the addon in front of the recording upstream, which here keeps a prefix
cache and reports it the way vLLM, llama.cpp, SGLang or TGI do (tests/support.py FakePrefixCache).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from mitmproxy import io
from mitmproxy.http import HTTPFlow

from scout_diff_cache.mitm.state import METADATA_KEY
from support import FakePrefixCache, HttpResult, Proxy, Repo, Upstream, generated_files, run_upstream

CHAT = "/v1/chat/completions"
TOOLS_A = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
TOOLS_B = [{"type": "function", "function": {"name": "run_tests", "parameters": {"type": "object"}}}]


@pytest.fixture
def repo(make_repo: Callable[..., Repo]) -> Repo:
    files = generated_files(40, 1500)
    files["m_middle.py"] = "MIDDLE = 1\n" * 50
    return make_repo(files)


@pytest.fixture
def engine_upstream(request: pytest.FixtureRequest) -> Iterator[Upstream]:
    with run_upstream() as upstream:
        upstream.behaviour.engine = request.param
        yield upstream


ProxyFor = Callable[..., Proxy]


@pytest.fixture
def proxy_for(start_proxy: Callable[..., Proxy], repo: Repo, clean_scout_env: Path) -> ProxyFor:
    def start(upstream: Upstream, *extra_args: str, **env: str) -> Proxy:
        return start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), **env}, extra_args)

    return start


def ask(proxy: Proxy, question: str = "what does it do?", **fields: Any) -> HttpResult:
    body = {"model": "llama-4-scout", "messages": [{"role": "user", "content": question}], **fields}
    result = proxy.post(CHAT, json.dumps(body).encode())
    assert result.status == 200, result.body
    return result


def verdict_of(result: HttpResult) -> str:
    return result.headers["x-scout-cache"].split(";")[0]


def header_fields(result: HttpResult) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("[^"]*"|[^;]+)', result.headers["x-scout-cache"]))


def metric(proxy: Proxy, name: str, **labels: str) -> float:
    text = proxy.get("/metrics").body.decode()
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    wanted = f"{name}{{{label_text}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series == wanted or _same_labels(series, name, labels):
            return float(value)
    raise AssertionError(f"{wanted} not in /metrics:\n{text}")


def _same_labels(series: str, name: str, labels: dict[str, str]) -> bool:
    if not series.startswith(name + "{"):
        return False
    found = dict(re.findall(r'(\w+)="([^"]*)"', series))
    return found == labels


def wait_for_log(proxy: Proxy, fragment: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = proxy.log()
        if fragment in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{fragment!r} not in the log:\n{proxy.log()[-4000:]}")


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_second_question_is_a_hit_seen_in_headers_log_metrics_and_health(
    engine_upstream: Upstream, proxy_for: ProxyFor, repo: Repo
) -> None:
    proxy = proxy_for(engine_upstream)
    first = ask(proxy, "first question")
    assert first.headers["x-scout-snapshot-commit"] == repo.head()
    assert first.headers["x-scout-cache-expected"] == "miss; first request to this upstream"
    assert verdict_of(first) == "miss"
    assert header_fields(first)["cause"] == '"first request"'
    health = proxy.get("/health").json()
    assert int(first.headers["x-scout-snapshot-bytes"]) == health["snapshot"]["bytes"]
    assert int(first.headers["x-scout-diff-bytes"]) == health["diff"]["bytes"]

    second = ask(proxy, "second question")
    assert second.headers["x-scout-cache-expected"] == "hit"
    assert verdict_of(second) == "hit"
    fields = header_fields(second)
    reported = second.json()["usage"]
    assert int(fields["cached_tokens"]) == reported["prompt_tokens_details"]["cached_tokens"]
    assert int(fields["prompt_tokens"]) == reported["prompt_tokens"]
    assert int(fields["cached_tokens"]) >= int(fields["snapshot_tokens"])

    log = wait_for_log(proxy, "(hit)")
    line = next(line for line in log.splitlines() if "(hit)" in line)
    assert re.search(rf"chat 200 in [\d.]+ s · snap {repo.head()[:7]} · [\d.]+ KB · diff \d+ B · prompt \d+ tok", line)
    assert re.search(r"cached 99\.\d% \(hit\)", line)
    assert "first request to this upstream since the proxy started" in log

    assert metric(proxy, "scout_chat_requests_total", outcome="hit") == 1
    assert metric(proxy, "scout_chat_requests_total", outcome="miss") == 1
    first_usage = first.json()["usage"]
    assert (
        metric(proxy, "scout_upstream_prompt_tokens_total") == first_usage["prompt_tokens"] + reported["prompt_tokens"]
    )
    assert metric(proxy, "scout_upstream_cached_tokens_total") == reported["prompt_tokens_details"]["cached_tokens"]
    assert metric(proxy, "scout_snapshot_builds_total") == 1
    assert metric(proxy, "scout_snapshot_cache_lookups_total", result="miss") == 1
    assert metric(proxy, "scout_snapshot_cache_lookups_total", result="hit") >= 1
    assert metric(proxy, "scout_diff_bytes_count") == 2
    cache = proxy.get("/health").json()["cache"]
    assert cache == {"requests": 2, "hit": 1, "partial": 0, "miss": 1, "unknown": 0, "hit_ratio": 0.5}


@pytest.mark.parametrize("engine_upstream", ["vllm"], indirect=True)
def test_stream_usage_is_asked_for_and_removed_for_a_client_that_did_not_ask(
    engine_upstream: Upstream, proxy_for: ProxyFor
) -> None:
    proxy = proxy_for(engine_upstream)
    client = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="k", max_retries=0, timeout=30)
    for attempt in range(2):
        chunks = list(
            client.chat.completions.create(
                model="llama-4-scout", messages=[{"role": "user", "content": f"q{attempt}"}], stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "part0 part1 part2 "
        assert all(c.choices and c.usage is None for c in chunks)
    sent = engine_upstream.chat_requests()[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    # Read anyway: the second stream's verdict is a hit (vLLM reported cached tokens in the removed chunk).
    wait_for_log(proxy, "(hit)")
    assert metric(proxy, "scout_chat_requests_total", outcome="hit") == 1


@pytest.mark.parametrize("engine_upstream", ["vllm"], indirect=True)
def test_a_client_that_closes_at_done_before_the_body_ends_still_gets_a_verdict(
    engine_upstream: Upstream, proxy_for: ProxyFor
) -> None:
    """SDKs stop reading at "data: [DONE]" and may close before the stream's last bytes arrive:
    the answer was whole and its usage had passed, so the verdict is given, not "client gone"."""
    proxy = proxy_for(engine_upstream)
    ask(proxy, "q0")  # the prefix cache holds the first prompt
    gate = threading.Event()
    engine_upstream.behaviour.end_gate = gate
    body = json.dumps({"messages": [{"role": "user", "content": "q1"}], "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        deadline = time.monotonic() + 20
        while b"data: [DONE]" not in received and time.monotonic() < deadline:
            received += sock.recv(65536)
    assert b"data: [DONE]" in received
    gate.set()  # the upstream ends the body after the client left

    wait_for_log(proxy, "(hit)")
    assert metric(proxy, "scout_chat_requests_total", outcome="hit") == 1
    assert metric(proxy, "scout_chat_requests_total", outcome="client_gone") == 0


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_a_stream_with_its_usage_chunk_removed_leaves_the_connection_usable(
    engine_upstream: Upstream, proxy_for: ProxyFor
) -> None:
    """Regression: a removed chunk once went out as an empty HTTP/1 chunk, the end-of-body marker."""
    proxy = proxy_for(engine_upstream)
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        bodies = []
        for question in ("q1", "q2", "q3"):
            body = {"messages": [{"role": "user", "content": question}], "stream": question != "q3"}
            connection.request("POST", CHAT, json.dumps(body).encode(), {"content-type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200
            bodies.append(response.read())
            assert not response.will_close
    finally:
        connection.close()
    for streamed in bodies[:2]:
        assert streamed.endswith(b"data: [DONE]\n\n")
        assert b'"usage"' not in streamed and streamed.count(b"data: ") == 4  # three chunks and [DONE]
    assert json.loads(bodies[2])["choices"][0]["message"]["content"] == "ok"
    assert len(re.findall(rf"(127\.0\.0\.1:\d+): POST \S+{CHAT}", proxy.log())) == 3


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_a_client_that_asks_for_usage_gets_the_upstream_chunk_unchanged(
    engine_upstream: Upstream, proxy_for: ProxyFor
) -> None:
    proxy = proxy_for(engine_upstream)
    options = {"include_usage": True, "continuous_usage_stats": False}
    body = {
        "model": "llama-4-scout",
        "messages": [{"role": "user", "content": "q"}],
        "stream": True,
        "stream_options": options,
    }
    result = proxy.post(CHAT, json.dumps(body).encode())
    events = [line.removeprefix("data: ") for line in result.body.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage_chunk["timings"]["prompt_n"] == usage_chunk["usage"]["prompt_tokens"]
    assert engine_upstream.chat_requests()[-1].json()["stream_options"] == options
    assert "x-scout-cache" not in result.headers  # streamed: the verdict comes after the headers
    assert result.headers["x-scout-cache-expected"] == "miss; first request to this upstream"
    wait_for_log(proxy, "(miss: first request)")


@pytest.mark.parametrize("engine_upstream", ["vllm"], indirect=True)
def test_with_stream_usage_off_streams_go_as_asked_without_a_verdict(
    engine_upstream: Upstream, proxy_for: ProxyFor
) -> None:
    proxy = proxy_for(engine_upstream, STREAM_USAGE="false")
    ask(proxy, stream=True)
    assert "stream_options" not in engine_upstream.chat_requests()[-1].json()
    wait_for_log(proxy, "cache unknown: no usage")
    assert metric(proxy, "scout_chat_requests_total", outcome="unknown") == 1


@pytest.mark.parametrize("engine_upstream", ["sglang"], indirect=True)
def test_per_commit_a_commit_that_changes_a_file_mid_snapshot_is_a_partial_hit_naming_it(
    engine_upstream: Upstream, proxy_for: ProxyFor, repo: Repo
) -> None:
    proxy = proxy_for(engine_upstream, LAYOUT="per-commit")
    ask(proxy)
    ask(proxy)
    commit_and_wait(proxy, repo, {"m_middle.py": "MIDDLE = 2\n" * 50})
    result = ask(proxy)
    assert result.headers["x-scout-cache-expected"] == "miss; new commit"
    assert verdict_of(result) == "partial"
    assert header_fields(result)["cause"] == '"new commit"'
    line = wait_for_log(proxy, "(partial: new commit)").splitlines()[-1]
    assert "it changes at m_middle.py" in proxy.log()
    assert "near m_middle.py" in proxy.log(), line


@pytest.mark.parametrize("engine_upstream", ["sglang"], indirect=True)
def test_append_only_the_same_commit_keeps_the_snapshot_cached(
    engine_upstream: Upstream, proxy_for: ProxyFor, repo: Repo
) -> None:
    proxy = proxy_for(engine_upstream)  # LAYOUT=append, the default
    ask(proxy)
    before = ask(proxy)
    commit_and_wait(proxy, repo, {"m_middle.py": "MIDDLE = 2\n" * 50})
    result = ask(proxy)
    # Predicted right: the new commit only appends a block to the snapshot that is cached.
    assert result.headers["x-scout-cache-expected"] == "hit; new commit appended to the cached snapshot"
    assert verdict_of(result) == "hit"  # all but the new history block, a few hundred bytes
    fields = header_fields(result)
    # Everything before the appended block is reused: the whole previous snapshot, less a token or two.
    assert int(fields["cached_tokens"]) >= 0.99 * int(header_fields(before)["snapshot_tokens"])
    assert result.headers["x-scout-base-commit"] == before.headers["x-scout-snapshot-commit"]
    assert result.headers["x-scout-snapshot-commit"] == repo.head()
    wait_for_log(proxy, "+ 1 commits")  # the build's log line: base + the new commit's block


def commit_and_wait(proxy: Proxy, repo: Repo, files: dict[str, str]) -> None:
    repo.write(files)
    repo.commit_all("change the middle")
    deadline = time.monotonic() + 10
    while proxy.get("/health").json()["head"] != repo.head() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_changed_tools_are_named_as_the_cause(engine_upstream: Upstream, proxy_for: ProxyFor) -> None:
    proxy = proxy_for(engine_upstream)
    ask(proxy, tools=TOOLS_A)
    assert verdict_of(ask(proxy, tools=TOOLS_A)) == "hit"
    result = ask(proxy, tools=TOOLS_B)
    assert result.headers["x-scout-cache-expected"] == "miss; tools changed"
    assert verdict_of(result) == "miss"
    assert header_fields(result)["cause"] == '"tools"'
    assert "Llama 4's chat template puts tool text before the first system message" in wait_for_log(
        proxy, "(miss: tools)"
    )


@pytest.mark.parametrize("engine_upstream", ["vllm"], indirect=True)
def test_eviction_and_vllms_missing_count_once_it_has_reported_one(
    engine_upstream: Upstream, proxy_for: ProxyFor
) -> None:
    proxy = proxy_for(engine_upstream)
    first = ask(proxy)
    # vLLM leaves prompt_tokens_details out when nothing was cached: unknown until it reports once.
    assert "prompt_tokens_details" not in first.json()["usage"]
    assert verdict_of(first) == "unknown"
    assert verdict_of(ask(proxy)) == "hit"
    engine_upstream.behaviour.cache.forget()
    evicted = ask(proxy)
    assert "prompt_tokens_details" not in evicted.json()["usage"]
    assert verdict_of(evicted) == "miss"
    assert header_fields(evicted)["cause"] == '"evicted"'
    assert header_fields(evicted)["cached_tokens"] == "0"


@pytest.mark.parametrize("engine_upstream", ["tgi"], indirect=True)
def test_an_upstream_that_reports_no_cached_tokens_is_unknown_and_says_why(
    engine_upstream: Upstream, proxy_for: ProxyFor
) -> None:
    proxy = proxy_for(engine_upstream)
    ask(proxy)
    result = ask(proxy)
    assert verdict_of(result) == "unknown"
    assert header_fields(result)["cause"] == '"upstream reports no cached tokens"'
    assert "--enable-prompt-tokens-details" in wait_for_log(proxy, "cache unknown: upstream reports no cached tokens")
    assert proxy.get("/health").json()["cache"]["hit_ratio"] is None


@pytest.mark.parametrize("engine_upstream", ["vllm", "llamacpp"], indirect=True)
def test_the_exact_token_count_from_tokenize_is_used_once_known(
    engine_upstream: Upstream, proxy_for: ProxyFor, repo: Repo
) -> None:
    proxy = proxy_for(engine_upstream)
    first = ask(proxy)
    assert header_fields(first)["snapshot_tokens_exact"] == "false"
    # Counting starts once the upstream has reported cached tokens (vLLM: from the first hit on).
    ask(proxy)
    wait_for_log(proxy, "tokens (upstream /tokenize)")
    second = ask(proxy)
    fields = header_fields(second)
    assert fields["snapshot_tokens_exact"] == "true"
    snapshot_message = json.loads(engine_upstream.chat_requests()[-1].raw_messages()[0])
    expected = FakePrefixCache.tokens(FakePrefixCache.render({"messages": [snapshot_message]}, generation_prompt=False))
    assert int(fields["snapshot_tokens"]) == expected
    tokenize_calls = [r for r in engine_upstream.recorded if r.path in ("/tokenize", "/apply-template")]
    ask(proxy)
    assert [r for r in engine_upstream.recorded if r.path in ("/tokenize", "/apply-template")] == tokenize_calls


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_count_snapshot_tokens_off_never_calls_tokenize(engine_upstream: Upstream, proxy_for: ProxyFor) -> None:
    proxy = proxy_for(engine_upstream, COUNT_SNAPSHOT_TOKENS="false")
    ask(proxy)
    assert header_fields(ask(proxy))["snapshot_tokens_exact"] == "false"
    assert [r.path for r in engine_upstream.recorded if r.method == "POST"] == [CHAT, CHAT]


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_errors_are_counted_by_status_and_source(engine_upstream: Upstream, proxy_for: ProxyFor) -> None:
    proxy = proxy_for(engine_upstream)
    assert proxy.post(CHAT, b"{not json").status == 400
    engine_upstream.behaviour.status = 500
    engine_upstream.behaviour.error_body = b'{"error": {"message": "boom"}}'
    assert proxy.post(CHAT, json.dumps({"messages": []}).encode()).status == 500
    assert metric(proxy, "scout_errors_total", status="400", source="proxy") == 1
    assert metric(proxy, "scout_errors_total", status="500", source="upstream") == 1
    assert metric(proxy, "scout_chat_requests_total", outcome="upstream_error") == 1
    wait_for_log(proxy, "no verdict (upstream error)")


def test_pass_through_requests_are_counted(upstream: Upstream, proxy_for: ProxyFor) -> None:
    proxy = proxy_for(upstream, INJECT_CONTEXT="false")
    assert proxy.post(CHAT, json.dumps({"messages": []}).encode()).status == 200
    assert metric(proxy, "scout_chat_requests_total", outcome="passthrough") == 1
    assert metric(proxy, "scout_chat_requests_total", outcome="hit") == 0


def saved_flows(proxy: Proxy, flows_file: Path) -> list[HTTPFlow]:
    """The HTTP flows a proxy started with ``-w flows_file`` saved, once it has stopped."""
    proxy.process.terminate()
    proxy.wait_exit()
    with flows_file.open("rb") as f:
        return [flow for flow in io.FlowReader(f).stream() if isinstance(flow, HTTPFlow)]


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_flows_the_proxy_answered_itself_say_so_and_chat_flows_start_with_the_verdict(
    engine_upstream: Upstream, proxy_for: ProxyFor, repo: Repo, tmp_path: Path
) -> None:
    """mitmweb shows every reverse-proxied flow with the upstream's URL: the comment tells them apart."""
    flows_file = tmp_path / "flows.mitm"
    proxy = proxy_for(engine_upstream, "-w", str(flows_file))
    ask(proxy)
    assert proxy.get("/health").status == 200
    assert proxy.get("/v1/models").status == 200
    assert proxy.post(CHAT, b"{not json", {"content-type": "application/json"}).status == 400
    flows = {
        (flow.request.path, flow.response.status_code if flow.response else 0): flow
        for flow in saved_flows(proxy, flows_file)
    }
    local = "answered by scout-diff-cache, not sent upstream"
    assert flows[("/health", 200)].comment == local
    assert flows[("/v1/models", 200)].comment == local
    assert local in flows[(CHAT, 400)].comment
    assert flows[(CHAT, 200)].comment.startswith("miss ") and local not in flows[(CHAT, 200)].comment
    assert len(engine_upstream.chat_requests()) == 1


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_saved_flows_carry_the_comment_verdict_and_the_streamed_answer(
    engine_upstream: Upstream, proxy_for: ProxyFor, repo: Repo, tmp_path: Path
) -> None:
    flows_file = tmp_path / "flows.mitm"
    proxy = proxy_for(engine_upstream, "-w", str(flows_file))
    ask(proxy)
    ask(proxy, stream=True)
    wait_for_log(proxy, "(hit)")
    chats = [flow for flow in saved_flows(proxy, flows_file) if flow.request.path == CHAT]
    assert len(chats) == 2
    comment_pattern = rf"(miss [\d.]+%: first request|hit [\d.]+%) · snap {repo.head()[:7]} · [\d.]+ KB · diff \d+ B"
    assert re.fullmatch(comment_pattern, chats[0].comment)
    assert chats[0].comment.startswith("miss ") and chats[0].comment.partition(" · ")[0].endswith(": first request")
    assert chats[1].comment.startswith("hit ")
    assert chats[1].metadata[METADATA_KEY]["cache"]["verdict"] == "hit"
    assert chats[1].metadata[METADATA_KEY]["outcome"] == "hit"
    streamed = chats[1].response
    assert streamed is not None and streamed.raw_content is not None
    assert b"part0 " in streamed.raw_content and b"data: [DONE]" in streamed.raw_content
    assert b'"usage"' not in streamed.raw_content  # recorded as the client got it


def prewarms(upstream: Upstream) -> list[dict[str, Any]]:
    return [body for body in (r.json() for r in upstream.chat_requests()) if body.get("max_tokens") == 1]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_prewarm_sends_each_new_base_once_and_the_next_question_hits(
    engine_upstream: Upstream, proxy_for: ProxyFor, repo: Repo
) -> None:
    proxy = proxy_for(engine_upstream, PREWARM="true", LAYOUT="per-commit", UPSTREAM_MODEL="served-name")
    wait_for(lambda: len(prewarms(engine_upstream)) == 1, "the prewarm at start")
    first = prewarms(engine_upstream)[0]
    assert first["model"] == "served-name" and first["stream"] is False
    assert first["messages"][2] == {"role": "user", "content": "."}
    result = ask(proxy)
    assert result.headers["x-scout-cache-expected"] == "hit"
    assert verdict_of(result) == "hit"

    repo.write({"m_middle.py": "MIDDLE = 3\n"})
    repo.commit_all("new commit: a new base in the per-commit layout")
    wait_for(lambda: len(prewarms(engine_upstream)) == 2, "the prewarm of the new commit")
    assert f"against commit {repo.head()}" in prewarms(engine_upstream)[1]["messages"][1]["content"]
    wait_for_log(proxy, "prompt tokens")  # the prewarm's result is logged
    assert verdict_of(ask(proxy)) == "hit"
    time.sleep(1.2)  # two more polls: nothing changed, nothing more is sent
    assert len(prewarms(engine_upstream)) == 2
    assert metric(proxy, "scout_prewarm_requests_total", result="ok") == 2


@pytest.mark.parametrize("engine_upstream", ["llamacpp"], indirect=True)
def test_prewarm_in_the_append_layout_waits_for_a_new_base(
    engine_upstream: Upstream, proxy_for: ProxyFor, repo: Repo
) -> None:
    proxy = proxy_for(engine_upstream, PREWARM="true")  # append layout, a base every 128 commits
    wait_for(lambda: len(prewarms(engine_upstream)) == 1, "the prewarm at start")
    repo.write({"m_middle.py": "MIDDLE = 4\n"})
    repo.commit_all("appends a block: same base")
    commit_and_wait(proxy, repo, {"m_middle.py": "MIDDLE = 5\n"})
    time.sleep(1.2)
    assert len(prewarms(engine_upstream)) == 1
