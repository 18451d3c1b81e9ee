"""End to end on a REAL model server: mitmdump running the addon in front of llama.cpp's llama-server.

The server runs the tiny random-weight Llama 4 model of tests/llama_server.py on CPU (one token per
byte, one slot, token-exact prefix reuse); the proxy watches a real temp git repository, and the
client is the real ``openai`` package. Every figure checked here comes from llama-server itself:
``usage.prompt_tokens_details.cached_tokens``, ``timings.prompt_ms`` / ``prompt_n``, its ``/metrics``,
its own ``/apply-template`` + ``/tokenize``. Times are compared as ratios only.

Snapshots stay small (about 10 KB, so about 10k tokens): this model's cold prefill on a loaded
2-core machine takes seconds. Each test's repository starts with a file naming the test
(``0_marker.txt``, first in path order), so no test finds its snapshot cached by an earlier one.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine_client import ask, client_for, doctor_verdicts, wait_for_head, wait_for_log
from llama_server import EARLY_FILE, LlamaServer, edit_early_file, repo_files, run_llama_server, write_tiny_gguf
from support import Proxy, Repo

StartProxy = Callable[..., Proxy]
USER_HEADER_TOKENS = 1 + len("user") + 1 + 2  # <|header_start|> user <|header_end|> \n\n


# --- the server, shared by the module --------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    model = write_tiny_gguf(tmp_path_factory.mktemp("llama-model") / "tiny-llama4.gguf")
    with run_llama_server(model, ctx_size=32768, slots=1, log_dir=tmp_path_factory.mktemp("llama-log")) as server:
        yield server


@pytest.fixture(autouse=True)
def llama_log_on_failure(llama: LlamaServer) -> Iterator[None]:
    """Print what llama-server logged during the test (pytest shows it only for a failed test)."""
    start = llama.log_size()
    yield
    print(f"--- llama-server log during this test ({llama.log_path}) ---\n{llama.log_since(start)[-6000:]}")
    assert llama.process.poll() is None, "llama-server exited"
    assert llama.get("/health").status == 200  # usable by the next test


@pytest.fixture
def proxy_in_front(start_proxy: StartProxy) -> Callable[..., Proxy]:
    def start(upstream_url: str, repo: Repo, **env: str) -> Proxy:
        return start_proxy(upstream_url, {"GIT_REPO_PATH": str(repo.path), **env})

    return start


def test_the_window_is_read_from_llama_server_and_shown_in_health(
    llama: LlamaServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    proxy = proxy_in_front(llama.url, make_repo({"a.py": "x = 1\n"}))
    deadline = time.monotonic() + 20
    while not proxy.get("/health").json()["window"]["counted_by"].startswith("exact") and time.monotonic() < deadline:
        time.sleep(0.2)
    window = proxy.get("/health").json()["window"]
    assert window["tokens"] == 32768  # --ctx-size 32768, 1 slot
    assert window["source"] == "upstream GET /props n_ctx (one slot)"
    assert window["counted_by"] == "exact (the upstream's tokenizer, llama.cpp POST /tokenize)"
    assert "upstream context window: 32768 tokens" in proxy.log()


# --- asking through the proxy ----------------------------------------------------------------------


def llama_metric(llama: LlamaServer, name: str) -> float:
    text = llama.get("/metrics").body.decode()
    match = re.search(rf"^llamacpp:{name} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def server_count(llama: LlamaServer, messages: list[dict[str, Any]]) -> int:
    """Tokens of ``messages`` (no generation prompt) by llama-server's own /apply-template and /tokenize."""
    rendered = llama.post("/apply-template", {"messages": messages, "add_generation_prompt": False})
    assert rendered.status == 200, rendered.body[:500]
    tokens = llama.post(
        "/tokenize", {"content": rendered.json()["prompt"], "add_special": True, "parse_special": True}
    ).json()["tokens"]
    return len(tokens)


# --- a recording relay (what the proxy really sent) ------------------------------------------------


@dataclass
class Relayed:
    path: str
    body: bytes


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RelayServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _relay(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.relayed.append(Relayed(self.path, body))
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=300)
        try:
            headers = {"content-type": self.headers.get("content-type", "application/json")}
            upstream.request(self.command, self.path, body or None, headers)
            response = upstream.getresponse()
            answer = response.read()  # plain answers only: this relay does not stream
            content_type = response.getheader("content-type", "application/json")
            status = response.status
        finally:
            upstream.close()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = _relay
    do_POST = _relay


class _RelayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _RelayHandler)
        self.target_port = target_port
        self.relayed: list[Relayed] = []


@pytest.fixture
def relay(llama: LlamaServer) -> Iterator[_RelayServer]:
    server = _RelayServer(llama.port)
    thread = threading.Thread(target=server.serve_forever, name="relay", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- the tests -------------------------------------------------------------------------------------


def test_second_question_reuses_the_whole_snapshot_and_the_exact_count_is_llama_servers(
    llama: LlamaServer, relay: _RelayServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files("the second-question test"))
    proxy = proxy_in_front(f"http://127.0.0.1:{relay.server_address[1]}", repo)

    first = ask(proxy, "Where is f_3_1 defined?")
    assert first.headers["x-scout-cache-expected"] == "miss; first request to this upstream"
    assert first.cache_fields["cause"] == "first request"
    # Nothing of this snapshot was in the slot, at most the preamble an earlier test's snapshot began with.
    assert first.verdict in ("miss", "partial")

    # What the proxy sent: [snapshot, diff, the question]; its snapshot message as llama-server counts it.
    sent = json.loads(next(r for r in relay.relayed if r.path == "/v1/chat/completions").body)
    snapshot_message, diff_message, question = sent["messages"]
    assert snapshot_message["role"] == diff_message["role"] == "system"
    assert question == {"role": "user", "content": "Where is f_3_1 defined?"}
    assert f"commit: {repo.head()}" in snapshot_message["content"]
    snapshot_tokens = server_count(llama, [snapshot_message])
    assert snapshot_tokens == llama.count_chat_tokens([snapshot_message])  # both of llama-server's ways agree
    assert 7_000 < snapshot_tokens < 20_000
    assert first.cached_tokens < 0.15 * snapshot_tokens
    assert first.prompt_tokens == llama.count_chat_tokens(sent["messages"], add_generation_prompt=True)

    second = ask(proxy, "Name the function returning x * 2 + 1.")
    assert second.headers["x-scout-cache-expected"] == "hit"
    assert second.verdict == "hit", second.headers["x-scout-cache"]
    # Token-exact prefix reuse: the snapshot, the diff, the user turn's header, nothing of the new question
    # (the two questions differ from their first character).
    both = llama.count_chat_tokens([snapshot_message, diff_message])
    assert second.cached_tokens == second.timings["cache_n"] == both + USER_HEADER_TOKENS
    assert second.cached_tokens >= snapshot_tokens
    assert second.timings["prompt_n"] == second.prompt_tokens - second.cached_tokens

    # The proxy counts the snapshot in the background (it asked after the first answer): once known, exact.
    wait_for_log(proxy, rf"snapshot {repo.head()[:7]} is \d+ tokens \(upstream /tokenize\)")
    third = ask(proxy, "Show a function of module 7.")
    fields = third.cache_fields
    assert third.verdict == "hit"
    assert fields["snapshot_tokens_exact"] == "true"
    assert int(fields["snapshot_tokens"]) == snapshot_tokens
    assert int(fields["cached_tokens"]) == third.cached_tokens >= snapshot_tokens
    # It asked llama-server's two endpoints (through the relay), with the snapshot message alone.
    paths = [r.path for r in relay.relayed]
    assert "/apply-template" in paths and "/tokenize" in paths
    template_request = json.loads(next(r for r in relay.relayed if r.path == "/apply-template").body)
    assert template_request["messages"] == [snapshot_message]
    line = wait_for_log(proxy, r"chat 200 in .*\(hit\)", count=2).group(0)
    assert f"snapshot {snapshot_tokens} tok (exact)" in line


def test_append_layout_a_commit_editing_an_early_file_keeps_everything_before_the_new_block(
    llama: LlamaServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files("the append-layout test"))
    proxy = proxy_in_front(llama.url, repo)  # LAYOUT=append, the default
    ask(proxy, "What is EARLY_6?")
    wait_for_log(proxy, r"snapshot \w+ is \d+ tokens \(upstream /tokenize\)")
    before = ask(proxy, "What is EARLY_7?")
    assert before.verdict == "hit"
    assert before.cache_fields["snapshot_tokens_exact"] == "true"
    previous_snapshot_tokens = int(before.cache_fields["snapshot_tokens"])
    base = repo.head()

    head = edit_early_file(repo)
    wait_for_head(proxy, head)
    after = ask(proxy, "What is EARLY_6 now?")
    assert after.headers["x-scout-cache-expected"] == "hit; new commit appended to the cached snapshot"
    assert after.headers["x-scout-snapshot-commit"] == head
    assert after.headers["x-scout-base-commit"] == base
    # The previous snapshot is a prefix of this one, up to its trimmed end: only <|eot|> differs.
    assert after.cached_tokens >= previous_snapshot_tokens - 4, (after.cached_tokens, previous_snapshot_tokens)
    # What was prefilled is the new history block, the diff and the question: a few hundred tokens.
    assert after.timings["prompt_n"] < 0.1 * previous_snapshot_tokens
    print(
        f"append: cached {after.cached_tokens} of {after.prompt_tokens} prompt tokens after the commit "
        f"(previous snapshot {previous_snapshot_tokens}); verdict: {after.headers['x-scout-cache']}"
    )
    wait_for_log(proxy, r"\+ 1 commits")  # the build's log line: the base and the new commit's block
    line = wait_for_log(proxy, r"chat 200 in .*new commit.*").group(0)
    assert f"it changes at commit {head}" in line  # the new block is where the two snapshots part

    # Once the proxy has counted the new snapshot, the next question is a hit by the exact count.
    wait_for_log(proxy, rf"snapshot {head[:7]} is \d+ tokens \(upstream /tokenize\)")
    again = ask(proxy, "Is EARLY_6 still 66?")
    assert again.verdict == "hit", again.headers["x-scout-cache"]
    assert again.cache_fields["snapshot_tokens_exact"] == "true"
    assert again.cached_tokens >= int(again.cache_fields["snapshot_tokens"])

    # Everything the cache could hold was reused, and the verdict says so, although the new block
    # (about 600 tokens) is 6% of this 10 KB snapshot, past the estimate's 3% tolerance.
    assert after.verdict == "hit", after.headers["x-scout-cache"]
    assert after.cache_fields["cause"] == "new commit"


def test_per_commit_layout_a_commit_editing_an_early_file_loses_the_snapshot_from_that_file(
    llama: LlamaServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files("the per-commit-layout test"))
    proxy = proxy_in_front(llama.url, repo, LAYOUT="per-commit")
    ask(proxy, "What is EARLY_6?")
    wait_for_log(proxy, r"snapshot \w+ is \d+ tokens \(upstream /tokenize\)")
    before = ask(proxy, "What is EARLY_7?")
    assert before.verdict == "hit"
    snapshot_tokens = int(before.cache_fields["snapshot_tokens"])
    assert before.cache_fields["snapshot_tokens_exact"] == "true"

    head = edit_early_file(repo)
    wait_for_head(proxy, head)
    after = ask(proxy, "What is EARLY_6 now?")
    assert after.headers["x-scout-cache-expected"] == "miss; new commit"
    assert after.headers["x-scout-base-commit"] == head  # every commit is its own base
    # The cache ends inside EARLY_FILE, near the start: nearly the whole snapshot is prefilled again.
    assert 200 < after.cached_tokens < 0.2 * snapshot_tokens, (after.cached_tokens, snapshot_tokens)
    assert after.timings["prompt_n"] > 0.8 * snapshot_tokens
    assert after.verdict == "partial", after.headers["x-scout-cache"]
    assert after.cache_fields["cause"] == "new commit"
    log = wait_for_log(proxy, r"chat 200 in .*\(partial: new commit\).*").group(0)
    assert f"it changes at {EARLY_FILE}" in log
    print(f"per-commit: cached {after.cached_tokens} of {after.prompt_tokens}; {log}")


def test_warm_prefill_is_a_fraction_of_the_cold_one(
    llama: LlamaServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files("the warm-and-cold test"))
    proxy = proxy_in_front(llama.url, repo)
    cold = ask(proxy, "What does f_1_1 return?")
    warm = ask(proxy, "And f_2_2?")
    # The proxy passes llama-server's timings through.
    assert cold.timings["cache_n"] < 0.15 * cold.prompt_tokens  # at most an earlier snapshot's preamble
    assert warm.timings["cache_n"] > 0.95 * warm.prompt_tokens
    ratio = warm.timings["prompt_ms"] / cold.timings["prompt_ms"]
    wall_ratio = warm.wall_seconds / cold.wall_seconds
    print(
        f"prefill cold {cold.timings['prompt_ms']:.0f} ms ({cold.timings['prompt_n']} tokens), warm "
        f"{warm.timings['prompt_ms']:.0f} ms ({warm.timings['prompt_n']} tokens): warm/cold {ratio:.3f}; "
        f"wall warm/cold {wall_ratio:.3f}"
    )
    assert ratio < 0.25
    assert wall_ratio < 0.5


def test_streams_through_the_proxy(
    llama: LlamaServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files("the streaming test", modules=4))  # small: nothing here needs a long prefill
    proxy = proxy_in_front(llama.url, repo)
    client = client_for(proxy)
    messages: Any = [{"role": "user", "content": "Stream an answer."}]

    # Without include_usage: the proxy asks for usage, reads it, and removes the chunk (timings with it).
    for attempt in (1, 2):
        chunks = list(
            client.chat.completions.create(model="llama-4-scout", messages=messages, max_tokens=3, stream=True)
        )
        assert chunks and all(chunk.usage is None for chunk in chunks)
        assert all(chunk.choices for chunk in chunks)
        assert all("timings" not in (chunk.model_extra or {}) for chunk in chunks)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        expected = "(miss|partial): first request" if attempt == 1 else "hit"
        wait_for_log(proxy, rf"chat 200 in .*prompt \d+ tok .*\({expected}\)")

    # With include_usage: llama-server's own usage chunk, unchanged, with its timings.
    chunks = list(
        client.chat.completions.create(
            model="llama-4-scout",
            messages=messages,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert all(chunk.usage is None for chunk in content)
    details = usage_chunk.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    timings = (usage_chunk.model_extra or {})["timings"]
    assert details.cached_tokens == timings["cache_n"]
    assert timings["cache_n"] + timings["prompt_n"] == usage_chunk.usage.prompt_tokens
    # The same question again: everything but the last token was cached.
    assert details.cached_tokens == usage_chunk.usage.prompt_tokens - 1
    wait_for_log(proxy, r"chat 200 in .*\(hit\)", count=2)


def test_prewarm_prefills_each_commit_before_the_question(
    llama: LlamaServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files("the prewarm test"))
    first_head = repo.head()
    processed_before = llama_metric(llama, "prompt_tokens_total")
    proxy = proxy_in_front(llama.url, repo, LAYOUT="per-commit", PREWARM="true")
    wait_for_log(proxy, rf"prewarm: base {first_head[:7]} prefilled in [\d.]+ s \(\d+ prompt tokens")
    started_prefill = llama_metric(llama, "prompt_tokens_total") - processed_before
    assert started_prefill > 7_000  # the whole snapshot was prefilled by llama-server, before any question

    before_commit = llama_metric(llama, "prompt_tokens_total")
    head = edit_early_file(repo)
    match = wait_for_log(
        proxy, rf"prewarm: base {head[:7]} prefilled in ([\d.]+) s \((\d+) prompt tokens, (\d+) were cached already\)"
    )
    prewarm_prompt, prewarm_cached = int(match.group(2)), int(match.group(3))
    assert prewarm_cached < 0.2 * prewarm_prompt  # the commit changed the snapshot early: a new prefill
    assert llama_metric(llama, "prompt_tokens_total") - before_commit == prewarm_prompt - prewarm_cached

    answer = ask(proxy, "What is EARLY_6 now?")
    assert answer.headers["x-scout-snapshot-commit"] == head
    assert answer.headers["x-scout-cache-expected"] == "hit"  # the prewarm told the tracker
    assert answer.verdict == "hit", answer.headers["x-scout-cache"]
    # The snapshot and the diff came from the cache; only the question's turn was prefilled.
    assert answer.cached_tokens >= prewarm_prompt - 20
    assert answer.timings["prompt_n"] < 64
    print(
        f"prewarm: {prewarm_prompt - prewarm_cached} tokens prefilled in {match.group(1)} s after the commit; "
        f"the question then prefilled {answer.timings['prompt_n']} tokens in {answer.timings['prompt_ms']:.0f} ms"
    )


def test_doctor_finds_llama_servers_window_tokenizer_and_cache_reporting(
    llama: LlamaServer, make_repo: Callable[..., Repo], tmp_path: Path
) -> None:
    verdicts = doctor_verdicts(llama.url, make_repo(repo_files("the llama doctor test")).path, tmp_path)
    assert verdicts["upstream"][0] == "ok"
    assert verdicts["window"] == ("ok", "32,768 tokens (upstream GET /props n_ctx (one slot))")
    assert verdicts["tokenizer"] == ("ok", "llama.cpp /tokenize: exact token counts")
    level, detail = verdicts["cache reporting"]
    assert level == "ok" and re.search(r"again: \d+ of \d+ prompt tokens cached", detail), detail
