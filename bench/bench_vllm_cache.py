"""Prefix-cache payoff on a REAL vLLM (CPU) serving the Llama 4 architecture, behind mitmdump running the addon.

Starts vLLM (the environment built once by .ci/vllm-server) with the tiny random ``Llama4ForCausalLM``
of tests/vllm_server.py: chunked local attention in three of four layers, a global NoPE layer,
mixture-of-experts layers, one token per byte. Generated repositories (default about 12 KB of
snapshot, so about 12k tokens), each starting with its own marker file so no scenario finds
another's snapshot cached. Every token figure comes from vLLM's answers
(``usage.prompt_tokens_details.cached_tokens`` and ``created_cache_tokens``, the tokens this request
prefilled and wrote to the cache); times from the client's wall clock. Measures, in one run:

(i)  a second question on the same state against the first: wall time, tokens written, warm/cold;
(ii) a sequence of commits (default 20; each edits one module, chosen from a fixed pseudo-random
     order, so some are early in path order and some late), one question after each, with
     LAYOUT=append and LAYOUT=per-commit: tokens prefilled per question (mean, max, total), the
     mean wall time, and the per-commit/append ratios.

Machines differ: compare ratios, not milliseconds. Every process it starts (vLLM, mitmdump) is
stopped before it returns, on errors, Ctrl-C and SIGTERM too.

Usage: .venv/bin/python bench/bench_vllm_cache.py [--modules N] [--module-bytes B] [--commits C]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from commit_sequence import (
    Asked,
    commit_plan,
    post_question,
    ratio_line,
    run_commits,
    run_in_temp_dir,
    summary,
    wait_for_head,
)
from llama_server import repo_files
from support import Proxy, Repo, http_request, run_proxy
from vllm_server import SERVED_MODEL, VllmServer, run_vllm_server, write_tiny_llama4


@dataclass
class Answer:
    wall_seconds: float
    prompt_tokens: int
    cached_tokens: int
    written_tokens: int
    verdict: str
    base_commit: str

    def asked(self) -> Asked:
        return Asked(self.written_tokens, self.wall_seconds, self.verdict, self.base_commit)

    def describe(self) -> str:
        return (
            f"wall {self.wall_seconds * 1000:7.0f} ms, prompt {self.prompt_tokens} tokens, cached "
            f"{self.cached_tokens}, written {self.written_tokens}, {self.verdict}"
        )


def ask(proxy: Proxy, question: str) -> Answer:
    answer, headers, wall = post_question(proxy, question)
    usage: dict[str, Any] = answer["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return Answer(
        wall,
        int(usage["prompt_tokens"]),
        int(details.get("cached_tokens") or 0),
        int(details.get("created_cache_tokens") or 0),
        headers.get("x-scout-cache", "?").split(";")[0],
        headers.get("x-scout-base-commit", "?"),
    )


def run(args: argparse.Namespace, root: Path) -> None:
    counter = iter(range(100))

    def new_repo(marker: str) -> Repo:
        return Repo.create(root / f"repo{next(counter)}", repo_files(marker, args.modules, args.module_bytes))

    def proxy_for(server: VllmServer, repo: Repo, **env: str) -> Any:
        env = {"GIT_REPO_PATH": str(repo.path), "UPSTREAM_MODEL": SERVED_MODEL, **env}
        return run_proxy(server.url, root / f"proxy{next(counter)}", env)

    started = time.perf_counter()
    model = write_tiny_llama4(root / "model")
    with run_vllm_server(model, root) as server:
        print(f"vLLM on {server.url}, ready after {time.perf_counter() - started:.0f} s; log {server.log_path}")
        repo = new_repo("warm and cold")
        with proxy_for(server, repo) as proxy:
            snapshot = http_request("GET", proxy.base_url + "/health").json()["snapshot"]
            print(f"snapshot: {snapshot['bytes'] / 1000:.1f} KB, {snapshot['files']} files (about 1 token per byte)")
            cold = ask(proxy, "What does f_1_1 return?")
            warm = ask(proxy, "And f_2_2?")
            print(f"(i)  cold question: {cold.describe()}")
            print(f"     warm question: {warm.describe()}")

        results: dict[str, list[Asked]] = {}
        for layout in ("append", "per-commit"):
            repo = new_repo(f"{args.commits} commits, {layout}")
            with proxy_for(server, repo, LAYOUT=layout, MAX_TAIL_PERCENT=str(args.max_tail_percent)) as proxy:
                first = ask(proxy, "What does f_1_1 return?")
                results[layout] = run_commits(
                    repo,
                    commit_plan(args.modules, args.commits),
                    lambda head, proxy=proxy: wait_for_head(proxy, head),
                    lambda question, proxy=proxy: ask(proxy, question).asked(),
                )
            print(f"(ii) {layout:10s}: {summary(results[layout], first.base_commit)}")

    print()
    print(f"whole run: {time.perf_counter() - started:.0f} s; ratios measured in this one run:")
    print(
        f"(i)  warm/cold wall time: {warm.wall_seconds / cold.wall_seconds:.4f} "
        f"({warm.wall_seconds * 1000:.0f} / {cold.wall_seconds * 1000:.0f} ms); "
        f"tokens written warm/cold: {warm.written_tokens}/{cold.written_tokens}"
    )
    print(f"(ii) {ratio_line(args.commits, results['append'], results['per-commit'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=30, help="generated modules (plus two small files)")
    parser.add_argument("--module-bytes", type=int, default=360, help="approximate size of each module")
    parser.add_argument("--commits", type=int, default=20, help="commits in the sequence of (ii)")
    parser.add_argument(
        "--max-tail-percent",
        type=int,
        default=10,
        help="MAX_TAIL_PERCENT (default 10, the setting's): on a small snapshot the tail cap moves the base often",
    )
    args = parser.parse_args()
    run_in_temp_dir("scout-bench-vllm-", lambda root: run(args, root))


if __name__ == "__main__":
    main()
