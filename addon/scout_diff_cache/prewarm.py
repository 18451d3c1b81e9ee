"""Prewarm: when HEAD gets a new base, have the upstream prefill it before anyone asks.

One ``max_tokens: 1`` chat request carrying the new snapshot and the current diff, sent to the
reverse-proxy target in a daemon thread. The next question then finds the prefix cached. With
the append-only layout that is once per base (every BASE_EVERY_COMMITS commits or so); with the
per-commit layout, every commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from .prompt import ChatRequest, assemble_body
from .usage import UpstreamUsage, usage_from_body

logger = logging.getLogger(__name__)

PREWARM_QUESTION = "."  # the smallest user turn; its tokens are not part of the reused prefix


@dataclass(frozen=True)
class PrewarmTarget:
    base_url: str  # scheme://host:port, as the addon names upstreams
    model: str
    authorization: str | None
    timeout_seconds: float | None
    verify_tls: bool


@dataclass(frozen=True)
class PrewarmResult:
    seconds: float
    usage: UpstreamUsage | None


def reverse_target(modes: Sequence[str]) -> str | None:
    """The upstream of the first ``reverse:`` mode, as scheme://host:port; None without one."""
    for spec in modes:
        mode = ProxyMode.parse(spec)
        if isinstance(mode, ReverseMode):
            host, port = mode.address
            return f"{mode.scheme}://{host}:{port}"
    return None


def prewarm_body(model: str, context_messages: list[bytes]) -> bytes:
    request = ChatRequest(
        fields={"model": model, "max_tokens": 1, "stream": False},
        messages=[{"role": "user", "content": PREWARM_QUESTION}],
    )
    return assemble_body(request, context_messages).body


def send_prewarm(target: PrewarmTarget, body: bytes) -> PrewarmResult:
    """Blocking: POST the body to the upstream's chat endpoint; raises on any failure."""
    headers = {"content-type": "application/json"}
    if target.authorization:
        headers["authorization"] = target.authorization
    request = urllib.request.Request(
        target.base_url + "/v1/chat/completions", data=body, headers=headers, method="POST"
    )
    context = None if target.verify_tls else ssl._create_unverified_context()
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=target.timeout_seconds, context=context) as response:
            answer = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        raise RuntimeError(f"the upstream answered {e.code}: {detail}") from None
    return PrewarmResult(time.perf_counter() - started, usage_from_body(answer))


def describe(result: PrewarmResult) -> str:
    usage = result.usage
    if usage is None or usage.prompt_tokens is None:
        return f"in {result.seconds:.2f} s"
    cached = f", {usage.cached_tokens} were cached already" if usage.cached_tokens is not None else ""
    return f"in {result.seconds:.2f} s ({usage.prompt_tokens} prompt tokens{cached})"


async def send_prewarm_in_background(target: PrewarmTarget, body: bytes) -> PrewarmResult:
    """send_prewarm in a daemon thread: a prefill of minutes must not hold up mitmdump's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[PrewarmResult] = loop.create_future()

    def deliver(outcome: PrewarmResult | BaseException) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        outcome: PrewarmResult | BaseException
        try:
            outcome = send_prewarm(target, body)
        except BaseException as e:  # handed to the waiting task
            outcome = e
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(deliver, outcome)

    threading.Thread(target=work, name="scout prewarm", daemon=True).start()
    return await future
