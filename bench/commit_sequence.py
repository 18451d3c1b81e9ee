"""What the engine benchmarks share: asking through the proxy, waiting for HEAD, a sequence of commits, and
how a benchmark runs (``run_in_temp_dir``).

Each commit edits one generated module (``tests/llama_server.repo_files``), chosen from a fixed
pseudo-random order, so some edits are early in path order and some late. What a question cost is
the number of prompt tokens the model server prefilled for it (vLLM: ``created_cache_tokens``;
llama.cpp: ``timings.prompt_n``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import Proxy, Repo, http_request

CHAT = "/v1/chat/completions"
TIMEOUT_SECONDS = 600

SEED = 20261129


@dataclass(frozen=True)
class Asked:
    prefilled_tokens: int
    wall_seconds: float
    verdict: str
    base_commit: str


def post_question(proxy: Proxy, question: str) -> tuple[dict[str, Any], dict[str, str], float]:
    """One question through the proxy (two tokens of answer): the answer, its headers, the wall time."""
    body = {"model": "llama-4-scout", "messages": [{"role": "user", "content": question}], "max_tokens": 2}
    started = time.perf_counter()
    result = http_request(
        "POST", proxy.base_url + CHAT, json.dumps(body).encode(), {"content-type": "application/json"}, TIMEOUT_SECONDS
    )
    wall = time.perf_counter() - started
    if result.status != 200:
        raise RuntimeError(f"HTTP {result.status}: {result.body[:500]!r}")
    answer: dict[str, Any] = result.json()
    return answer, result.headers, wall


def wait_for_head(proxy: Proxy, head: str) -> None:
    deadline = time.monotonic() + 30
    while http_request("GET", proxy.base_url + "/health").json().get("head") != head:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy never saw HEAD {head}")
        time.sleep(0.05)


def commit_plan(modules: int, commits: int) -> list[tuple[str, int]]:
    """Which module each commit edits, in a fixed pseudo-random order, and the commit's index."""
    chooser = random.Random(SEED)
    return [(f"pkg/mod_{chooser.randrange(modules):03d}.py", index) for index in range(commits)]


def run_commits(
    repo: Repo, plan: list[tuple[str, int]], wait_for_head: Callable[[str], None], ask: Callable[[str], Asked]
) -> list[Asked]:
    """Commit each edit, wait until the proxy sees the new HEAD, and ask one question about it."""
    answers = []
    for path, index in plan:
        text = (repo.path / path).read_text()
        repo.write({path: text.replace("return x * 1 ", f"return x * {index + 100} ", 1) + f"# edit {index}\n"})
        wait_for_head(repo.commit_all(f"edit {path} ({index})"))
        answers.append(ask(f"What changed in {path}?"))
    return answers


def summary(answers: list[Asked], first_base: str) -> str:
    prefilled = [answer.prefilled_tokens for answer in answers]
    verdicts = {verdict: [a.verdict for a in answers].count(verdict) for verdict in ("hit", "partial", "miss")}
    bases = [first_base, *(answer.base_commit for answer in answers)]
    moves = sum(1 for before, after in itertools.pairwise(bases) if before != after)
    return (
        f"prefilled per question mean {statistics.mean(prefilled):.0f}, median {statistics.median(prefilled):.0f}, "
        f"max {max(prefilled)}, total {sum(prefilled)} tokens; mean wall "
        f"{statistics.mean(a.wall_seconds for a in answers) * 1000:.0f} ms; verdicts {verdicts}; base moves {moves}\n"
        f"      per question: {' '.join(str(tokens) for tokens in prefilled)}"
    )


def ratio_line(commits: int, append: list[Asked], per_commit: list[Asked]) -> str:
    total_append = sum(a.prefilled_tokens for a in append)
    total_per_commit = sum(a.prefilled_tokens for a in per_commit)
    wall = statistics.mean(a.wall_seconds for a in per_commit) / statistics.mean(a.wall_seconds for a in append)
    return (
        f"over {commits} commits, tokens prefilled per-commit/append: "
        f"{total_per_commit / max(total_append, 1):.1f}x ({total_per_commit} vs {total_append}); "
        f"mean wall per-commit/append {wall:.2f}x"
    )


def run_in_temp_dir(prefix: str, run: Callable[[Path], None]) -> None:
    """A benchmark's body in a temp dir removed after, with hermetic git (no user or system config: signing,
    hooks, templates); SIGTERM unwinds like Ctrl-C, so its with-blocks stop every process it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ["GIT_CONFIG_GLOBAL"] = os.devnull
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            run(Path(tmp))
    except KeyboardInterrupt:
        sys.exit("interrupted; every process it started was stopped")
