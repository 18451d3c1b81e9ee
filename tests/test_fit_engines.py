"""A repository three times the window, through mitmdump, on a REAL llama-server with a 16k window (issue 12).

The tiny Llama 4 model of tests/llama_server.py (about one token per byte) serves one 16384-token
slot. The proxy learns that window from ``/props``, counts every file block with llama-server's own
``/tokenize``, cuts message 1 to its share, and every question gets an answer; the cache verdicts
(llama-server's own ``cached_tokens``) show message 1 kept its bytes across questions and across two
proxy processes. Only the proxy's own 400 answers a conversation the window cannot hold.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import openai
import pytest

from engine_client import ask, client_for, converse, next_turn, wait_for_diff, wait_for_log
from llama_server import LlamaServer, repo_files, run_llama_server, write_tiny_gguf
from support import Proxy, Repo

StartProxy = Callable[..., Proxy]
WINDOW = 16384
SHARE = (WINDOW - 4096) * 75 // 100  # SNAPSHOT_WINDOW_PERCENT of the window less ANSWER_RESERVE_TOKENS
# <|header_start|>assistant<|header_end|>\n\n ends a prompt; the next one has the answer there instead.
GENERATION_PROMPT_TOKENS = 1 + len("assistant") + 1 + 2 + 2


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    model = write_tiny_gguf(tmp_path_factory.mktemp("llama-model") / "tiny-llama4.gguf")
    with run_llama_server(model, ctx_size=WINDOW, slots=1, log_dir=tmp_path_factory.mktemp("llama-log")) as server:
        yield server


def three_windows(marker: str) -> dict[str, str]:
    files = repo_files(marker, modules=150, module_bytes=330)
    files.update({f"tests/test_mod_{m:03d}.py": f"def test_{m}():\n    assert {m} == {m}\n" * 20 for m in range(10)})
    files["docs/guide.md"] = "# Guide\n" + "How to use the package.\n" * 200
    assert sum(map(len, files.values())) > 3 * WINDOW
    return files


def health_when_exact(proxy: Proxy) -> dict[str, object]:
    line = wait_for_log(proxy, r"token counts: exact.*").group(0)
    assert "llama.cpp" in line
    health: dict[str, object] = proxy.get("/health").json()
    return health


def test_every_question_fits_and_message_1_keeps_its_bytes_across_questions_and_processes(
    small_llama: LlamaServer, start_proxy: StartProxy, make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(three_windows("the 16k-window test"))
    env = {"GIT_REPO_PATH": str(repo.path)}
    proxy = start_proxy(small_llama.url, env)
    health = health_when_exact(proxy)
    window = health["window"]
    assert isinstance(window, dict)
    assert (window["tokens"], window["source"]) == (WINDOW, "upstream GET /props n_ctx (one slot)")
    first = ask(proxy, "What does f_3_1 return?")
    fit = proxy.get("/health").json()["fit"]
    assert fit["cut_to_fit"] is True and fit["counted_by"].startswith("exact")
    assert fit["repository_tokens"] > 2 * WINDOW and fit["planned_tokens"] <= SHARE
    assert first.prompt_tokens < WINDOW  # llama-server itself counted what it got
    second = ask(proxy, "And f_100_2?")
    assert second.verdict == "hit", second.headers["x-scout-cache"]  # message 1 unchanged: its prefix reused
    # llama-server's own count of the prompt up to the end of message 1 is within what was planned.
    exact = int(wait_for_log(proxy, r"snapshot \w+ is (\d+) tokens \(upstream /tokenize\)").group(1))
    assert fit["planned_tokens"] - 200 <= exact <= fit["planned_tokens"], (exact, fit)
    assert "more than the" not in proxy.log()
    other = start_proxy(small_llama.url, env)
    health_when_exact(other)
    third = ask(other, "Which tests are there?")  # another process, the same message 1: still cached
    assert third.cached_tokens >= fit["planned_tokens"] * 9 // 10, (third.cached_tokens, fit)


def test_a_conversation_longer_than_the_window_is_refused_by_the_proxy_not_the_server(
    small_llama: LlamaServer, start_proxy: StartProxy, make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(three_windows("the 16k-window long-conversation test"))
    proxy = start_proxy(small_llama.url, {"GIT_REPO_PATH": str(repo.path)})
    health_when_exact(proxy)
    before = _requests_served(small_llama)
    with pytest.raises(openai.BadRequestError) as refused:
        client_for(proxy).chat.completions.create(
            model="tiny-llama4", messages=[{"role": "user", "content": "Explain this code. " * 600}]
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "context_length_exceeded", error
    assert f"context window is {WINDOW}" in str(error["message"])
    assert _requests_served(small_llama) == before  # nothing reached llama-server


def _requests_served(server: LlamaServer) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    line = next(line for line in text.splitlines() if line.startswith("llamacpp:prompt_tokens_total"))
    return float(line.split()[-1])


def test_a_large_working_diff_is_cut_so_the_request_fits(
    small_llama: LlamaServer, start_proxy: StartProxy, make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(three_windows("the 16k-window diff test"))
    # About 4 x 2.6k tokens of new files: with message 1 (about 8k) more than the 16k window holds.
    repo.write({f"pkg/new_{i}.py": "".join(f"NEW_{i}_{n} = {n}\n" for n in range(200)) for i in range(4)})
    proxy = start_proxy(small_llama.url, {"GIT_REPO_PATH": str(repo.path)})
    health_when_exact(proxy)
    answer = ask(proxy, "What is NEW_0_3?")
    assert answer.prompt_tokens < WINDOW
    wait_for_log(proxy, rf"working diff cut to [123] of its files so the request fits the window of {WINDOW} tokens")
    assert json.dumps(answer.body)  # an ordinary answer


def retrieved_tokens(headers: Mapping[str, str]) -> int:
    """The tokens of the retrieved files' message, from x-scout-retrieval ("retrieved 2 files (1,234 tokens)")."""
    found = re.match(r"retrieved \d+ files? \(([\d,]+) tokens\)", headers.get("x-scout-retrieval", ""))
    return int(found.group(1).replace(",", "")) if found else 0


def test_a_conversation_continued_after_an_edit_and_a_commit_prefills_only_what_is_new(
    small_llama: LlamaServer, start_proxy: StartProxy, make_repo: Callable[..., Repo]
) -> None:
    """Issue 13 on a real engine: each turn's prompt starts with the previous one, so llama-server reuses it."""
    repo = make_repo(repo_files("the conversation test", modules=20, module_bytes=330))
    proxy = start_proxy(small_llama.url, {"GIT_REPO_PATH": str(repo.path)})
    health_when_exact(proxy)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What does f_3_1 return?"}]
    first = converse(proxy, messages)
    repo.write({"pkg/mod_003.py": (repo.path / "pkg/mod_003.py").read_text() + "EDITED = 1\n"})
    wait_for_diff(proxy)
    messages = next_turn(messages, first, "I changed mod_003. What now?")
    second = converse(proxy, messages)
    # All of the first prompt but its generation prompt (the assistant header the answer follows).
    assert second.cached_tokens >= first.prompt_tokens - GENERATION_PROMPT_TOKENS, (second.cached_tokens, first)
    # The answer, the change message (about 550 bytes: one token each for this model), the question,
    # and the left-out files retrieved for it (issue 14; kept in place on the next turn).
    assert second.timings["prompt_n"] < 800 + retrieved_tokens(second.headers)
    repo.commit_all("commit the edit")
    wait_for_log(proxy, r"snapshot \w+ built")  # the new HEAD seen (a new snapshot for new conversations)
    messages = next_turn(messages, second, "Committed. Anything else?")
    third = converse(proxy, messages)
    assert third.cached_tokens >= second.prompt_tokens - GENERATION_PROMPT_TOKENS, (third.cached_tokens, second)
    assert third.headers["x-scout-cache-expected"].startswith("hit; conversation continued")


def test_a_question_about_a_left_out_file_gets_it_counted_by_the_servers_tokenizer(
    small_llama: LlamaServer, start_proxy: StartProxy, make_repo: Callable[..., Repo]
) -> None:
    """Issue 14 on a real engine: the retrieved file is counted by llama.cpp's tokenizer; message 1 stays cached."""
    repo = make_repo(three_windows("the 16k-window retrieval test"))
    proxy = start_proxy(small_llama.url, {"GIT_REPO_PATH": str(repo.path)})
    health_when_exact(proxy)
    wait_for_log(proxy, r"search index of the \d+ left-out files")
    first = ask(proxy, "What does f_140_3 return?")
    assert first.headers["x-scout-retrieved"] == 'pkg/mod_140.py;why="defines f_140_3"'
    assert first.prompt_tokens < WINDOW
    tokens = retrieved_tokens(first.headers)
    # Counted with llama.cpp's own tokenizer (about one token per byte for this model): the file, its
    # <file> lines and the message's own two lines.
    file_tokens = len(three_windows("the 16k-window retrieval test")["pkg/mod_140.py"].encode())
    assert file_tokens <= tokens <= file_tokens + 400, (tokens, file_tokens)
    second = ask(proxy, "And f_141_0?")
    assert second.headers["x-scout-retrieved"] == 'pkg/mod_141.py;why="defines f_141_0"'
    fit = proxy.get("/health").json()["fit"]
    assert second.cached_tokens >= fit["planned_tokens"] * 9 // 10, (second.cached_tokens, fit)
