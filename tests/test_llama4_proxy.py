"""End to end on a REAL llama.cpp llama-server running a tiny model of Scout's own ``llama4`` architecture.

llama.cpp runs Llama 4 on its iSWA cache: three of every four layers attend within chunks of 8192
tokens (a size llama.cpp fixes for this architecture), the fourth globally without RoPE; every
second layer here is a mixture of experts. The snapshots (about 10k tokens) cross a chunk
boundary. What these tests pin down, measured on this llama-server:

- a second question, and a commit in the append layout, reuse everything before the point of
  difference with the server's default flags: the difference is near the end of the prompt,
  inside the chunk the sliding cache still holds;
- a difference early in the prompt (the per-commit layout after a commit that edits an early
  file) reuses nothing by default: the chunked layers no longer hold that position's chunk, and
  the server prefills the whole prompt again; ``--swa-full`` keeps the full cache for those layers
  (more memory) and reuses the prefix up to the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine_client import Answer, ask, wait_for_diff, wait_for_head, wait_for_log
from llama_server import (
    EARLY_FILE,
    LLAMA4_CHUNK_TOKENS,
    LlamaServer,
    edit_early_file,
    repo_files,
    run_llama_server,
    write_tiny_gguf,
)
from support import Proxy, Repo

EXACT_COUNT = r"snapshot \w+ is \d+ tokens \(upstream /tokenize\)"


@dataclass
class Llama4Server:
    server: LlamaServer
    swa_full: bool  # started with --swa-full: the chunked layers keep the whole context


@pytest.fixture(scope="module")
def llama4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("llama4-model") / "tiny-llama4.gguf", architecture="llama4")


@pytest.fixture(scope="module", params=[False, True], ids=["default", "swa-full"])
def llama4(
    request: pytest.FixtureRequest, llama4_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Llama4Server]:
    swa_full: bool = request.param
    extra = ["--swa-full"] if swa_full else []
    log_dir = tmp_path_factory.mktemp("llama4-log")
    with run_llama_server(llama4_model, ctx_size=32768, slots=1, extra_args=extra, log_dir=log_dir) as server:
        yield Llama4Server(server, swa_full)


@pytest.fixture
def proxy_in_front(start_proxy: Callable[..., Proxy], llama4: Llama4Server) -> Callable[..., Proxy]:
    def start(repo: Repo, **env: str) -> Proxy:
        return start_proxy(llama4.server.url, {"GIT_REPO_PATH": str(repo.path), **env})

    return start


def warm_up(proxy: Proxy) -> Answer:
    ask(proxy, "What is EARLY_6?")
    wait_for_log(proxy, EXACT_COUNT)
    before = ask(proxy, "What is EARLY_7?")
    assert before.verdict == "hit", before.headers["x-scout-cache"]
    assert before.cache_fields["snapshot_tokens_exact"] == "true"
    assert int(before.cache_fields["snapshot_tokens"]) > LLAMA4_CHUNK_TOKENS  # the snapshot crosses a chunk
    return before


def test_append_layout_a_commit_only_appends_on_the_chunked_attention_cache(
    llama4: Llama4Server, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files(f"the llama4 append test {llama4.swa_full}"))
    proxy = proxy_in_front(repo)
    before = warm_up(proxy)
    previous = int(before.cache_fields["snapshot_tokens"])
    head = edit_early_file(repo)
    wait_for_head(proxy, head)
    after = ask(proxy, "What is EARLY_6 now?")
    assert after.headers["x-scout-cache-expected"] == "hit; new commit appended to the cached snapshot"
    assert after.cached_tokens >= previous - 4, (after.cached_tokens, previous)
    assert after.timings["prompt_n"] < 0.1 * previous  # the new block, the diff and the question
    assert after.verdict == "hit", after.headers["x-scout-cache"]


def test_per_commit_layout_an_early_edit_loses_everything_unless_the_full_cache_is_kept(
    llama4: Llama4Server, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files(f"the llama4 per-commit test {llama4.swa_full}"))
    proxy = proxy_in_front(repo, LAYOUT="per-commit")
    before = warm_up(proxy)
    snapshot = int(before.cache_fields["snapshot_tokens"])
    head = edit_early_file(repo)
    wait_for_head(proxy, head)
    after = ask(proxy, "What is EARLY_6 now?")
    if llama4.swa_full:
        assert 200 < after.cached_tokens < 0.2 * snapshot, (after.cached_tokens, snapshot)  # up to the early file
        assert after.verdict == "partial", after.headers["x-scout-cache"]
    else:
        assert after.cached_tokens == 0, after.cached_tokens  # the chunked layers lost that position
        assert after.timings["prompt_n"] == after.prompt_tokens
        assert after.verdict == "miss", after.headers["x-scout-cache"]
        line = wait_for_log(proxy, r"chat 200 in .*\(miss: new commit\).*").group(0)
        assert "unless llama-server runs with --swa-full" in line  # the log tells the user what to change


def test_prewarm_prefills_a_new_base_before_the_question(
    llama4: Llama4Server, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    """LAYOUT=per-commit makes each commit a new base; PREWARM pays its prefill before anyone asks."""
    repo = make_repo(repo_files(f"the llama4 prewarm test {llama4.swa_full}"))
    proxy = proxy_in_front(repo, LAYOUT="per-commit", PREWARM="true")
    warm_up(proxy)
    head = edit_early_file(repo)
    wait_for_log(proxy, rf"prewarm: base {head[:7]} prefilled in [\d.]+ s")
    after = ask(proxy, "What is EARLY_6 now?")
    assert after.headers["x-scout-snapshot-commit"] == head
    assert after.headers["x-scout-cache-expected"] == "hit"  # the prewarm told the tracker
    assert after.verdict == "hit", after.headers["x-scout-cache"]
    assert after.timings["prompt_n"] < 64  # only the question's turn


def test_a_working_tree_edit_costs_only_the_diff_and_the_question(
    llama4: Llama4Server, proxy_in_front: Callable[..., Proxy], make_repo: Callable[..., Repo]
) -> None:
    repo = make_repo(repo_files(f"the llama4 working-tree test {llama4.swa_full}"))
    proxy = proxy_in_front(repo)
    before = warm_up(proxy)
    snapshot = int(before.cache_fields["snapshot_tokens"])
    repo.write({EARLY_FILE: "EARLY_6 = 67\n"})  # not committed: the working diff carries it
    wait_for_diff(proxy)
    after = ask(proxy, "What is EARLY_6 now?")
    assert after.verdict == "hit", after.headers["x-scout-cache"]
    assert after.cached_tokens >= snapshot, (after.cached_tokens, snapshot)
    assert after.timings["prompt_n"] < 0.1 * snapshot  # the diff and the question
