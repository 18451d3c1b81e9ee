"""Asking a real model server through the proxy with the real ``openai`` client, and reading what came back.

Shared by the llama.cpp and vLLM tiers: the answer's headers (the proxy's verdict), its usage,
waits on the proxy's log and its view of HEAD, and ``scout-diff-cache doctor`` against the server.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from support import Proxy, free_port, proxy_env


@dataclass
class Answer:
    headers: dict[str, str]
    body: dict[str, Any]
    wall_seconds: float

    @property
    def cached_tokens(self) -> int:
        return int(self.body["usage"]["prompt_tokens_details"]["cached_tokens"])

    @property
    def written_tokens(self) -> int | None:
        """vLLM's created_cache_tokens: the tokens this request wrote to the cache."""
        value = self.body["usage"]["prompt_tokens_details"].get("created_cache_tokens")
        return None if value is None else int(value)

    @property
    def prompt_tokens(self) -> int:
        return int(self.body["usage"]["prompt_tokens"])

    @property
    def timings(self) -> dict[str, Any]:
        return dict(self.body["timings"])

    @property
    def verdict(self) -> str:
        return self.headers["x-scout-cache"].split(";")[0]

    @property
    def cache_fields(self) -> dict[str, str]:
        fields = dict(re.findall(r'(\w+)=("[^"]*"|[^;]+)', self.headers["x-scout-cache"]))
        return {key: value.strip('"') for key, value in fields.items()}


def client_for(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="unused", max_retries=0, timeout=180)


def ask(proxy: Proxy, question: str) -> Answer:
    """One question, two tokens of answer; the model name is the client's (UPSTREAM_MODEL may replace it)."""
    return converse(proxy, [{"role": "user", "content": question}])


def converse(proxy: Proxy, messages: list[dict[str, Any]]) -> Answer:
    """A whole conversation as a client resends it, two tokens of answer."""
    started = time.perf_counter()
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="llama-4-scout",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=2,
        temperature=0,
    )
    wall = time.perf_counter() - started
    completion = raw.parse()  # the openai package accepts the answer
    assert completion.choices[0].finish_reason in ("length", "stop")
    return Answer({k.lower(): v for k, v in raw.headers.items()}, raw.http_response.json(), wall)


def next_turn(messages: list[dict[str, Any]], answer: Answer, said: str) -> list[dict[str, Any]]:
    """The conversation as the client resends it: the model's answer and what the user says next."""
    reply = answer.body["choices"][0]["message"]["content"] or ""
    return [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": said}]


def wait_for_log(proxy: Proxy, pattern: str, timeout: float = 60, count: int = 1) -> re.Match[str]:
    """The ``count``-th match of the regex ``pattern`` in the proxy's log, once it is there."""
    deadline = time.monotonic() + timeout
    while True:
        matches = list(re.finditer(pattern, proxy.log()))
        if len(matches) >= count:
            return matches[count - 1]
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} (x{count}) not in the proxy log:\n{proxy.log()[-5000:]}")
        time.sleep(0.05)


def wait_for_diff(proxy: Proxy, timeout: float = 10) -> None:
    """Until the proxy's working diff has a file in it (an uncommitted edit was seen)."""
    deadline = time.monotonic() + timeout
    while proxy.get("/health").json()["diff"]["files"] == 0:
        assert time.monotonic() < deadline, "the proxy never saw the working-tree edit"
        time.sleep(0.1)


def wait_for_head(proxy: Proxy, head: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while proxy.get("/health").json().get("head") != head:
        assert time.monotonic() < deadline, f"the proxy never saw HEAD {head}"
        time.sleep(0.05)


def doctor_verdicts(target_url: str, repo: Path, work_dir: Path, **env: str) -> dict[str, tuple[str, str]]:
    """``scout-diff-cache doctor`` against ``target_url``: check -> (level, detail); asserts it exits 0."""
    work_dir.mkdir(parents=True, exist_ok=True)
    environ = {
        **proxy_env({}, work_dir),
        "TARGET_API_URL": target_url,
        "GIT_REPO_PATH": str(repo),
        "PORT": str(free_port()),
        **env,
    }
    command = [str(Path(sys.executable).with_name("scout-diff-cache")), "doctor"]
    result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = {}
    for line in result.stdout.splitlines()[:-1]:
        level, _, rest = line.partition(" ")
        check, _, detail = rest.strip().partition(": ")
        verdicts[check] = (level, detail)
    return verdicts
