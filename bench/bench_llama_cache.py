"""Prefix-cache payoff on a REAL model server: llama.cpp's llama-server behind mitmdump running the addon.

Starts llama-server on CPU with the tiny random-weight model of tests/llama_server.py, by default of
Scout's ``llama4`` architecture (``--architecture llama`` for the plain one; one token per byte, one
slot, token-exact prefix reuse; the binary is built once by .ci/llama-server)
and generates small repositories (default about 30 KB of snapshot, so about 30k tokens: a cold
prefill of seconds on 2 cores), each starting with its own marker file so no scenario finds
another's snapshot cached. Every figure comes from llama-server's answers (``timings.prompt_ms``,
``prompt_n``, ``usage.prompt_tokens_details.cached_tokens``) or the client's wall clock. Measures,
in one run:

(i)   a second question on the same state against the first: prefill time (timings.prompt_ms) and
      wall time, and their warm/cold ratios;
(ii)  the first question after a commit that edits a file early in path order, with LAYOUT=append
      (the commit only appends a history block) and LAYOUT=per-commit (the snapshot changes from
      that file on): prefill time, tokens prefilled, cached share, verdict; the ratio per-commit/append;
(iii) with LAYOUT=per-commit in both: the user-visible latency of that first question after the
      commit WITH PREWARM=true (asked once the proxy's log says the prewarm of the new commit
      finished) against WITHOUT prewarm (the per-commit measurement of (ii)), and the ratio;
(iv)  a sequence of commits (bench/commit_sequence.py, default 20), one question after each, with
      LAYOUT=append and LAYOUT=per-commit: tokens prefilled per question (timings.prompt_n), base
      moves, and the per-commit/append ratio.

Machines differ: compare ratios, not milliseconds. Every process it starts (llama-server, mitmdump)
is stopped before it returns, on errors, Ctrl-C and SIGTERM too.

Usage: .venv/bin/python bench/bench_llama_cache.py [--modules N] [--module-bytes B] [--threads T]
       [--architecture llama|llama4] [--swa-full]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from commit_sequence import (
    TIMEOUT_SECONDS,
    Asked,
    commit_plan,
    post_question,
    ratio_line,
    run_commits,
    run_in_temp_dir,
    summary,
    wait_for_head,
)
from llama_server import EARLY_FILE, LlamaServer, edit_early_file, repo_files, run_llama_server, write_tiny_gguf
from support import Proxy, Repo, http_request, run_proxy


@dataclass
class Answer:
    wall_seconds: float
    prompt_ms: float
    prompt_n: int
    prompt_tokens: int
    cached_tokens: int
    verdict: str
    base_commit: str

    def asked(self) -> Asked:
        return Asked(self.prompt_n, self.wall_seconds, self.verdict, self.base_commit)

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens

    def describe(self) -> str:
        return (
            f"wall {self.wall_seconds * 1000:8.0f} ms, prefill {self.prompt_ms:8.0f} ms for {self.prompt_n:6d} tokens, "
            f"cached {self.cached_tokens}/{self.prompt_tokens} ({self.cached_share * 100:5.1f}%), {self.verdict}"
        )


def ask(proxy: Proxy, question: str) -> Answer:
    answer, headers, wall = post_question(proxy, question)
    timings, usage = answer["timings"], answer["usage"]
    return Answer(
        wall,
        float(timings["prompt_ms"]),
        int(timings["prompt_n"]),
        int(usage["prompt_tokens"]),
        int(usage["prompt_tokens_details"]["cached_tokens"]),
        headers.get("x-scout-cache", "?").split(";")[0],
        headers.get("x-scout-base-commit", "?"),
    )


def wait_for_log(proxy: Proxy, pattern: str, timeout: float = TIMEOUT_SECONDS) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, proxy.log())
        if match:
            return match
        if proxy.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{pattern!r} not in the proxy log:\n{proxy.log()[-3000:]}")
        time.sleep(0.05)


def run(args: argparse.Namespace, root: Path) -> None:
    model = write_tiny_gguf(root / "tiny-model.gguf", architecture=args.architecture)
    counter = iter(range(100))

    def new_repo(marker: str) -> Repo:
        return Repo.create(root / f"repo{next(counter)}", repo_files(marker, args.modules, args.module_bytes))

    def proxy_for(server: LlamaServer, repo: Repo, **env: str) -> contextlib.AbstractContextManager[Proxy]:
        return run_proxy(server.url, root / f"proxy{next(counter)}", {"GIT_REPO_PATH": str(repo.path), **env})

    started = time.perf_counter()
    extra = ["--swa-full"] if args.swa_full else []
    with run_llama_server(
        model, ctx_size=args.ctx_size, slots=1, threads=args.threads, extra_args=extra, log_dir=root
    ) as server:
        print(
            f"llama-server on {server.url} ({args.threads or os.cpu_count()} threads, {args.architecture} model"
            f"{', --swa-full' if args.swa_full else ''}), logging to {server.log_path}"
        )

        # (i) and (ii) append: one repository, LAYOUT=append.
        repo = new_repo("warm and cold, append")
        with proxy_for(server, repo) as proxy:
            snapshot = http_request("GET", proxy.base_url + "/health").json()["snapshot"]
            print(f"snapshot: {snapshot['bytes'] / 1000:.1f} KB, {snapshot['files']} files (about 1 token per byte)")
            cold = ask(proxy, "What does f_1_1 return?")
            warm = ask(proxy, "And f_2_2?")
            print(f"(i)   cold question:           {cold.describe()}")
            print(f"      warm question:           {warm.describe()}")
            edit_early_file(repo)
            wait_for_head(proxy, repo.head())
            append = ask(proxy, "What is EARLY_6 now?")
            print(f"(ii)  append, after commit:    {append.describe()}")

        # (ii) per-commit, and (iii) without prewarm: LAYOUT=per-commit.
        repo = new_repo("per-commit, no prewarm")
        with proxy_for(server, repo, LAYOUT="per-commit") as proxy:
            ask(proxy, "What does f_1_1 return?")
            edit_early_file(repo)
            wait_for_head(proxy, repo.head())
            per_commit = ask(proxy, "What is EARLY_6 now?")
            print(f"      per-commit, after commit: {per_commit.describe()}")

        # (iii) with prewarm.
        repo = new_repo("per-commit with prewarm")
        with proxy_for(server, repo, LAYOUT="per-commit", PREWARM="true") as proxy:
            wait_for_log(proxy, rf"prewarm: base {repo.head()[:7]} prefilled")
            ask(proxy, "What does f_1_1 return?")
            committed = time.perf_counter()
            head = edit_early_file(repo)
            done = wait_for_log(proxy, rf"prewarm: base {head[:7]} prefilled in ([\d.]+) s \(.*\)")
            ready = time.perf_counter() - committed
            prewarmed = ask(proxy, "What is EARLY_6 now?")
            print(
                f"(iii) prewarm of the commit: {done.group(1)} s in llama-server, done {ready:.1f} s after the commit "
                f"({done.group(0)})"
            )
            print(f"      per-commit + prewarm:    {prewarmed.describe()}")

        # (iv) a sequence of commits, one question after each, append against per-commit.
        sequence: dict[str, list[Asked]] = {}
        for layout in ("append", "per-commit") if args.commits else ():
            repo = new_repo(f"{args.commits} commits, {layout}")
            with proxy_for(server, repo, LAYOUT=layout, MAX_TAIL_PERCENT=str(args.max_tail_percent)) as proxy:
                first = ask(proxy, "What does f_1_1 return?")
                sequence[layout] = run_commits(
                    repo,
                    commit_plan(args.modules, args.commits),
                    lambda head, proxy=proxy: wait_for_head(proxy, head),
                    lambda question, proxy=proxy: ask(proxy, question).asked(),
                )
            print(f"(iv)  {layout:10s}: {summary(sequence[layout], first.base_commit)}")

    print()
    print(f"whole run: {time.perf_counter() - started:.0f} s; ratios measured in this one run:")
    print(
        f"(i)   warm/cold prefill (timings.prompt_ms): {warm.prompt_ms / cold.prompt_ms:.4f}  "
        f"({warm.prompt_ms:.0f} / {cold.prompt_ms:.0f} ms; {cold.prompt_ms / warm.prompt_ms:.0f}x faster)"
    )
    print(f"      warm/cold wall time:                  {warm.wall_seconds / cold.wall_seconds:.4f}")
    print(
        f"(ii)  after a commit editing {EARLY_FILE}: append prefilled {append.prompt_n} tokens in "
        f"{append.prompt_ms:.0f} ms, cached {append.cached_share * 100:.1f}% ({append.verdict}); per-commit "
        f"{per_commit.prompt_n} tokens in {per_commit.prompt_ms:.0f} ms, cached "
        f"{per_commit.cached_share * 100:.1f}% ({per_commit.verdict})"
    )
    print(
        f"      per-commit/append prefill time: {per_commit.prompt_ms / append.prompt_ms:.1f}x; "
        f"wall {per_commit.wall_seconds / append.wall_seconds:.1f}x"
    )
    with_prewarm, without = prewarmed.wall_seconds, per_commit.wall_seconds
    print(
        f"(iii) first question after a commit, per-commit layout: with prewarm {with_prewarm * 1000:.0f} ms, "
        f"without {without * 1000:.0f} ms; with/without {with_prewarm / without:.4f} "
        f"({without / with_prewarm:.0f}x faster)"
    )
    if sequence:
        print(f"(iv)  {ratio_line(args.commits, sequence['append'], sequence['per-commit'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=70, help="generated modules (plus two small files)")
    parser.add_argument("--module-bytes", type=int, default=330, help="approximate size of each module")
    parser.add_argument("--threads", type=int, default=None, help="llama-server threads (default: every core)")
    parser.add_argument("--ctx-size", type=int, default=65536, help="llama-server context size")
    parser.add_argument(
        "--architecture",
        choices=("llama", "llama4"),
        default="llama4",
        help="llama4 (Scout's: chunked attention on llama.cpp's iSWA cache, MoE) or plain llama",
    )
    parser.add_argument("--swa-full", action="store_true", help="start llama-server with --swa-full")
    parser.add_argument("--commits", type=int, default=20, help="commits in the sequence of (iv); 0 skips it")
    parser.add_argument(
        "--max-tail-percent", type=int, default=10, help="MAX_TAIL_PERCENT in (iv) (default 10, the setting's)"
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the with-blocks stop mitmdump and llama-server.
    run_in_temp_dir("scout-bench-llama-", lambda root: run(args, root))


if __name__ == "__main__":
    main()
