"""End to end on a REAL vLLM on CPU serving the Llama 4 architecture (``Llama4ForCausalLM``), through mitmdump.

The model (tests/vllm_server.py) is tiny and random, but it is Scout's shape: chunked local attention
in three of four layers, a global NoPE layer, mixture-of-experts layers; vLLM keeps one KV cache group
per attention type (its hybrid KV cache manager) and caches whole blocks (64-token steps for this
model). Every figure comes from vLLM itself (``usage.prompt_tokens_details``: ``cached_tokens``,
``created_cache_tokens``; its ``/tokenize``; its ``/v1/models``). One server per module; each test's
repository starts with a file naming the test, so no test finds its snapshot cached by another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine_client import (
    Answer,
    ask,
    converse,
    doctor_verdicts,
    next_turn,
    wait_for_diff,
    wait_for_head,
    wait_for_log,
)
from llama_server import EARLY_FILE, edit_early_file, repo_files
from support import SETTING_ENV_NAMES, Proxy, Repo
from vllm_server import CACHE_GRAIN_TOKENS, MAX_MODEL_LEN, SERVED_MODEL, VllmServer, run_vllm_server, write_tiny_llama4

StartProxy = Callable[..., Proxy]
EXACT_COUNT = r"snapshot \w+ is \d+ tokens \(upstream /tokenize\)"
# The generation prompt a chat request adds after the messages: <|header_start|>assistant<|header_end|>\n\n.
ASSISTANT_HEADER_TOKENS = 1 + len("assistant") + 1 + 2


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    model = write_tiny_llama4(tmp_path_factory.mktemp("vllm-model"))
    with run_vllm_server(model, tmp_path_factory.mktemp("vllm-log")) as server:
        yield server


@pytest.fixture(autouse=True)
def vllm_log_on_failure(vllm: VllmServer) -> Iterator[None]:
    start = len(vllm.log())
    yield
    print(f"--- vLLM log during this test ({vllm.log_path}) ---\n{vllm.log()[start:][-6000:]}")
    assert vllm.process.poll() is None, "vLLM exited"


@pytest.fixture
def proxy_in_front(start_proxy: StartProxy, vllm: VllmServer) -> Callable[..., Proxy]:
    def start(repo: Repo, **env: str) -> Proxy:
        # vLLM answers only the name it serves: the proxy sends that whatever the client asked for.
        return start_proxy(vllm.url, {"GIT_REPO_PATH": str(repo.path), "UPSTREAM_MODEL": SERVED_MODEL, **env})

    return start


def snapshot_tokens(answer: Answer) -> int:
    assert answer.cache_fields["snapshot_tokens_exact"] == "true", answer.headers["x-scout-cache"]
    return int(answer.cache_fields["snapshot_tokens"])


def test_second_question_reuses_the_whole_snapshot_and_the_window_is_vllms(
    proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    proxy = proxy_in_front(make_repo(repo_files("the vLLM second-question test")))
    first = ask(proxy, "What is EARLY_6?")
    assert first.cached_tokens < 64 and first.written_tokens is not None
    assert first.written_tokens >= first.prompt_tokens - CACHE_GRAIN_TOKENS  # cold: all whole blocks written
    wait_for_log(proxy, EXACT_COUNT)
    second = ask(proxy, "What is EARLY_7?")
    snapshot = snapshot_tokens(second)
    assert second.verdict == "hit", second.headers["x-scout-cache"]
    assert second.headers["x-scout-cache-expected"] == "hit"
    # In whole steps of the cache: everything up to the question, the snapshot and the diff included.
    assert second.cached_tokens >= snapshot - CACHE_GRAIN_TOKENS, (second.cached_tokens, snapshot)
    assert second.written_tokens is not None and second.written_tokens < 4 * CACHE_GRAIN_TOKENS  # only the new question
    assert second.cache_fields["cache_written_tokens"] == str(second.written_tokens)
    line = wait_for_log(proxy, r"chat 200 in .*cached [\d.]+% \(hit\)").group(0)
    assert f"cache read {second.cached_tokens} · written {second.written_tokens} tok" in line
    window = proxy.get("/health").json()["window"]
    assert (window["tokens"], window["source"]) == (MAX_MODEL_LEN, "upstream GET /v1/models max_model_len")
    assert window["counted_by"] == "exact (the upstream's tokenizer, vllm POST /tokenize)"


def test_the_exact_snapshot_count_is_what_vllm_reports_as_prompt_tokens_for_the_snapshot(
    vllm: VllmServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo], tmp_path: Path
) -> None:
    """The count the proxy gets from /tokenize equals vLLM's own prompt_tokens for message 1 alone."""
    repo = make_repo(repo_files("the vLLM exact-count test"))
    proxy = proxy_in_front(repo)
    ask(proxy, "What is EARLY_6?")
    counted = int(wait_for_log(proxy, r"snapshot \w+ is (\d+) tokens \(upstream /tokenize\)").group(1))
    snapshot_file, empty_config = tmp_path / "snapshot.txt", tmp_path / "empty-config.yaml"
    empty_config.write_text("{}\n")  # the built-in defaults, as the proxy under test has them
    command = [sys.executable, "-m", "scout_diff_cache", "preview", "--repo", str(repo.path)]
    preview = subprocess.run(
        [*command, "--config", str(empty_config), "--write-snapshot", str(snapshot_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={
            **{name: value for name, value in os.environ.items() if name not in SETTING_ENV_NAMES},
            "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),  # a build cache of the test's own
        },
    )
    assert "wrote" in preview.stdout
    body = {
        "model": SERVED_MODEL,
        "messages": [{"role": "system", "content": snapshot_file.read_text()}],
        "max_tokens": 1,
    }
    request = urllib.request.Request(
        vllm.url + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        prompt_tokens = json.loads(answer.read())["usage"]["prompt_tokens"]
    assert counted == prompt_tokens - ASSISTANT_HEADER_TOKENS, (counted, prompt_tokens)


def test_append_layout_a_commit_only_appends_and_per_commit_loses_the_snapshot(
    proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    """The contrast the append layout exists for, on Scout's attention layout: one edit of an early file."""
    results: dict[str, tuple[Answer, int]] = {}
    for layout in ("append", "per-commit"):
        repo = make_repo(repo_files(f"the vLLM {layout}-layout test"))
        proxy = proxy_in_front(repo, LAYOUT=layout)
        ask(proxy, "What is EARLY_6?")
        wait_for_log(proxy, EXACT_COUNT)
        before = ask(proxy, "What is EARLY_7?")
        previous = snapshot_tokens(before)
        head = edit_early_file(repo)
        wait_for_head(proxy, head)
        results[layout] = (ask(proxy, "What is EARLY_6 now?"), previous)
    after, previous = results["append"]
    assert after.headers["x-scout-cache-expected"] == "hit; new commit appended to the cached snapshot"
    assert after.cached_tokens >= previous - CACHE_GRAIN_TOKENS, (after.cached_tokens, previous)
    assert after.written_tokens is not None and after.written_tokens < 0.15 * previous  # the new block, diff, question
    assert after.verdict == "hit", after.headers["x-scout-cache"]
    after, previous = results["per-commit"]
    assert after.headers["x-scout-cache-expected"] == "miss; new commit"
    assert after.cached_tokens < 0.2 * previous, (after.cached_tokens, previous)  # lost from the early file on
    assert after.written_tokens is not None and after.written_tokens > 0.8 * previous
    assert after.verdict == "partial", after.headers["x-scout-cache"]
    reused = results["append"][0].cached_tokens
    print(f"vLLM, {EARLY_FILE} edited: append reused {reused} tokens, per-commit {after.cached_tokens}")


def test_a_working_tree_edit_costs_only_the_diff_and_the_question(
    proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files("the vLLM working-tree test"))
    proxy = proxy_in_front(repo)
    ask(proxy, "What is EARLY_6?")
    wait_for_log(proxy, EXACT_COUNT)
    before = ask(proxy, "What is EARLY_7?")
    snapshot = snapshot_tokens(before)
    repo.write({EARLY_FILE: "EARLY_6 = 67\n"})  # not committed: the working diff carries it
    wait_for_diff(proxy)
    after = ask(proxy, "What is EARLY_6 now?")
    assert after.verdict == "hit", after.headers["x-scout-cache"]
    assert after.cached_tokens >= snapshot - CACHE_GRAIN_TOKENS, (after.cached_tokens, snapshot)
    assert after.written_tokens is not None and after.written_tokens < 0.1 * snapshot


def vllm_metric(vllm: VllmServer, name: str) -> float:
    """A counter of vLLM's /metrics, summed over its label sets."""
    with urllib.request.urlopen(vllm.url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values = re.findall(rf"^vllm:{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert values, f"no vllm:{name} in /metrics"
    return sum(float(value) for value in values)


def test_prewarm_prefills_a_new_base_before_the_question_and_without_it_the_question_pays(
    vllm: VllmServer, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    """LAYOUT=per-commit makes every commit a new base: the first question after it, with and without PREWARM."""
    firsts: dict[str, Answer] = {}
    for prewarm in ("true", "false"):
        repo = make_repo(repo_files(f"the vLLM prewarm={prewarm} test"))
        proxy = proxy_in_front(repo, LAYOUT="per-commit", PREWARM=prewarm)
        ask(proxy, "What is EARLY_6?")
        wait_for_log(proxy, EXACT_COUNT)
        hits_before = vllm_metric(vllm, "prefix_cache_hits_total")
        head = edit_early_file(repo)
        if prewarm == "true":
            wait_for_log(proxy, rf"prewarm: base {head[:7]} prefilled in [\d.]+ s")
        else:
            wait_for_head(proxy, head)
        firsts[prewarm] = ask(proxy, "What is EARLY_6 now?")
        assert vllm_metric(vllm, "prefix_cache_hits_total") > hits_before
    warm, cold = firsts["true"], firsts["false"]
    assert warm.headers["x-scout-cache-expected"] == "hit"  # the prewarm told the tracker
    assert warm.verdict == "hit", warm.headers["x-scout-cache"]
    assert warm.written_tokens is not None and warm.written_tokens < 4 * CACHE_GRAIN_TOKENS
    assert cold.verdict == "partial", cold.headers["x-scout-cache"]
    assert cold.written_tokens is not None and cold.written_tokens > 0.8 * cold.prompt_tokens
    print(f"vLLM prewarm: the first question after a new base wrote {warm.written_tokens} vs {cold.written_tokens}")


def test_a_repository_three_times_the_window_is_cut_to_fit_and_a_too_long_conversation_is_the_proxys_400(
    proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    """Issue 12 on vLLM: the window from /v1/models, every block counted by vLLM's /tokenize."""
    files = repo_files("the vLLM three-windows test", modules=320, module_bytes=330)
    assert sum(map(len, files.values())) > 3 * MAX_MODEL_LEN
    proxy = proxy_in_front(make_repo(files))
    wait_for_log(proxy, r"token counts: exact \(the upstream's tokenizer, vllm POST /tokenize\)")
    first = ask(proxy, "What does f_3_1 return?")
    assert first.prompt_tokens < MAX_MODEL_LEN
    fit = proxy.get("/health").json()["fit"]
    assert fit["cut_to_fit"] is True and fit["repository_tokens"] > 2 * MAX_MODEL_LEN
    second = ask(proxy, "And f_200_2?")
    assert second.verdict == "hit", second.headers["x-scout-cache"]
    assert second.cached_tokens >= fit["planned_tokens"] * 9 // 10
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "Explain this code. " * 1800}], "max_tokens": 2}
    ).encode()
    refused = proxy.post("/v1/chat/completions", body)
    assert refused.status == 400 and refused.json()["error"]["code"] == "context_length_exceeded", refused.body
    assert "vLLM" not in refused.body.decode() and f"context window is {MAX_MODEL_LEN}" in refused.body.decode()


def test_a_continued_conversation_reuses_the_previous_prompt_on_vllm(
    proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    """Issue 13 on vLLM's Llama 4 cache: after an edit the next turn reuses all of the previous prompt."""
    repo = make_repo(repo_files("the vLLM conversation test"))
    proxy = proxy_in_front(repo)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What does f_3_1 return?"}]
    first = converse(proxy, messages)
    text = (repo.path / EARLY_FILE).read_text()
    repo.write({EARLY_FILE: text.replace("EARLY_6 = 6 ", "EARLY_6 = 66")})  # uncommitted
    wait_for_diff(proxy)
    second = converse(proxy, next_turn(messages, first, "I edited it. What now?"))
    # Whole 64-token steps of the cache, up to where the first prompt's generation prompt was.
    assert second.cached_tokens >= first.prompt_tokens - CACHE_GRAIN_TOKENS - ASSISTANT_HEADER_TOKENS
    new = second.prompt_tokens - first.prompt_tokens + ASSISTANT_HEADER_TOKENS  # the answer, changes, question
    assert second.written_tokens is not None and second.written_tokens <= new + 2 * CACHE_GRAIN_TOKENS
    assert second.headers["x-scout-cache-expected"].startswith("hit; conversation continued: 1 change injected")


def test_doctor_finds_vllms_window_tokenizer_and_cache_reporting(
    vllm: VllmServer, make_repo: Callable[..., Repo], tmp_path: Path
) -> None:
    verdicts = doctor_verdicts(vllm.url, make_repo(repo_files("the vLLM doctor test")).path, tmp_path)
    assert verdicts["upstream"] == ("ok", f"{vllm.url} answers; serves {SERVED_MODEL}")
    assert verdicts["window"] == ("ok", f"{MAX_MODEL_LEN:,} tokens (upstream GET /v1/models max_model_len)")
    assert verdicts["tokenizer"] == ("ok", "vllm /tokenize: exact token counts")
    level, detail = verdicts["cache reporting"]  # --enable-prompt-tokens-details
    assert level == "ok" and re.search(r"again: \d+ of \d+ prompt tokens cached", detail), detail
