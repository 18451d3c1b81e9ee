"""A coding agent's session through the proxy to a real llama-server: tokens prefilled per turn, by layout.

A scripted session of ``--turns`` turns (default 30) on a generated repository (about 10k tokens
of message 1 for the tiny test model, about one token per byte): each turn the agent edits one or
two modules, sometimes creates or deletes one, commits twice in the session, and adds about
``--tool-chars`` characters of tool output; the client then resends the whole conversation with
the model's answer and the new messages, as agents do. The same script runs twice, each on a
fresh copy of the repository and a fresh llama-server slot: ``CONVERSATION_LAYOUT=append`` and
``seed``. What a turn cost is what llama-server prefilled for it (``timings.prompt_n``).

Goals (printed, not asserted): with the append layout each turn prefills no more than the new
client messages, the change message and a small constant; over the session at least 10x fewer
tokens than the seed order.

Usage: .venv/bin/python bench/bench_conversation.py [--turns N] [--tool-chars C] [--architecture llama|llama4]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from commit_sequence import CHAT, SEED, TIMEOUT_SECONDS, run_in_temp_dir, wait_for_head
from llama_server import repo_files, run_llama_server, write_tiny_gguf
from support import Proxy, Repo, http_request, run_proxy

MODULES = 30
CONSTANT_TOKENS = 64  # what a turn may prefill beyond its new messages and its change message


@dataclass(frozen=True)
class Turn:
    prefilled: int
    new_tokens: int  # the new client messages and the change message, as llama-server counts them
    cached: int
    prompt: int


def script(turns: int, tool_chars: int) -> list[tuple[dict[str, str | None], bool, str]]:
    """Per turn: the files to write (None: delete), whether to commit after, the tool output."""
    rng = random.Random(SEED)
    steps = []
    for index in range(turns):
        edits: dict[str, str | None] = {}
        for _ in range(rng.choice((1, 2))):
            module = f"pkg/mod_{rng.randrange(MODULES):03d}.py"
            edits[module] = f"EDIT_{index} = {rng.randrange(1000)}\n"
        if index % 7 == 3:
            edits[f"pkg/new_{index}.py"] = f"def added_{index}(x):\n    return x + {index}\n"
        if index % 11 == 5:
            edits[f"pkg/new_{index - 2}.py"] = None  # one added earlier goes again (or never was)
        tool = "".join(rng.choice("abcdefghij klmnop\n") for _ in range(tool_chars))
        steps.append((edits, index in (turns // 3, 2 * turns // 3), f"Tool output of turn {index}:\n{tool}"))
    return steps


def apply(repo: Repo, edits: dict[str, str | None]) -> None:
    for path, text in edits.items():
        target = repo.path / path
        if text is None:
            target.unlink(missing_ok=True)
        elif target.exists():
            target.write_text(target.read_text() + text)
        else:
            repo.write({path: text})


def chat(proxy: Proxy, messages: list[dict[str, Any]]) -> dict[str, Any]:
    body = json.dumps({"model": "llama-4-scout", "messages": messages, "max_tokens": 2, "temperature": 0}).encode()
    result = http_request("POST", proxy.base_url + CHAT, body, {"content-type": "application/json"}, TIMEOUT_SECONDS)
    if result.status != 200:
        raise RuntimeError(f"HTTP {result.status}: {result.body[:500]!r}")
    answer: dict[str, Any] = result.json()
    return answer


def session(proxy: Proxy, repo: Repo, steps: list[tuple[dict[str, str | None], bool, str]]) -> list[Turn]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Help me change this code base."}]
    turns = []
    previous_prompt = 0
    for edits, commit, tool in steps:
        apply(repo, edits)
        if commit:
            wait_for_head(proxy, repo.commit_all("the agent commits"))
        time.sleep(0.3)  # the watcher sees the edits
        answer = chat(proxy, messages)
        usage, timings = answer["usage"], answer["timings"]
        cached = int(usage["prompt_tokens_details"]["cached_tokens"])
        turns.append(
            Turn(
                int(timings["prompt_n"]),
                int(usage["prompt_tokens"]) - previous_prompt,
                cached,
                int(usage["prompt_tokens"]),
            )
        )
        previous_prompt = int(usage["prompt_tokens"])
        reply = answer["choices"][0]["message"]["content"] or ""
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": tool}]
    return turns


def report(name: str, turns: list[Turn]) -> int:
    total = sum(turn.prefilled for turn in turns)
    mean = statistics.mean(turn.prefilled for turn in turns)
    print(
        f"{name:>7}: prefilled total {total:,} tokens; per turn mean {mean:,.0f}, "
        f"max {max(t.prefilled for t in turns):,}; last prompt {turns[-1].prompt:,} tokens"
    )
    print(f"         per turn: {' '.join(str(t.prefilled) for t in turns)}")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--tool-chars", type=int, default=1000, help="tool output per turn (about 1 token per char)")
    parser.add_argument("--architecture", choices=("llama", "llama4"), default="llama4")
    parser.add_argument("--ctx-size", type=int, default=65536)
    args = parser.parse_args()
    run_in_temp_dir("scout-bench-conversation-", lambda root: run(args, root))


def run(args: argparse.Namespace, root: Path) -> None:
    steps = script(args.turns, args.tool_chars)
    model = write_tiny_gguf(root / "tiny.gguf", architecture=args.architecture)
    results = {}
    for layout in ("append", "seed"):
        repo = Repo.create(root / f"repo-{layout}", repo_files(f"the {layout} session", MODULES, 330))
        with (
            run_llama_server(model, ctx_size=args.ctx_size, slots=1, log_dir=root) as server,
            run_proxy(
                server.url,
                root / f"proxy-{layout}",
                {"GIT_REPO_PATH": str(repo.path), "CONVERSATION_LAYOUT": layout},
            ) as proxy,
        ):
            results[layout] = session(proxy, repo, steps)
    print(f"{args.turns} turns, {args.tool_chars} characters of tool output each, {args.architecture} model")
    append, seed = report("append", results["append"]), report("seed", results["seed"])
    over = [
        (index, turn.prefilled, turn.new_tokens)
        for index, turn in enumerate(results["append"][1:], 1)
        if turn.prefilled > turn.new_tokens + CONSTANT_TOKENS
    ]
    print(
        f"seed/append tokens prefilled over the session: {seed / max(append, 1):.1f}x (goal >= 10x) "
        f"{'MET' if seed >= 10 * append else 'NOT MET'}"
    )
    print(
        f"append turns prefilling more than their new messages and change + {CONSTANT_TOKENS}: "
        f"{len(over)} of {args.turns - 1} (goal 0) {'MET' if not over else 'NOT MET: ' + str(over[:5])}"
    )


if __name__ == "__main__":
    main()
