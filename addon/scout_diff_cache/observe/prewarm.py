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
import threading
import time
import urllib.error
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..chat.request import ChatRequest, assemble_body
from ..chat.upstream import post_json
from ..chat.usage import UpstreamUsage, usage_from_body
from ..context.provider import RepoContext
from ..git.errors import GitError
from ..git.watcher import Generation
from ..text import human_bytes, short_commit
from .metrics import ProxyMetrics
from .verdict import CacheTracker

logger = logging.getLogger(__name__)

PREWARM_QUESTION = "."  # the smallest user turn; its tokens are not part of the reused prefix


@dataclass(frozen=True)
class PrewarmRequest:
    """What to send the upstream: the model, its credentials, how long to wait, whether to check TLS."""

    model: str
    authorization: str | None
    timeout_seconds: float | None
    verify_tls: bool


@dataclass(frozen=True)
class PrewarmResult:
    seconds: float
    usage: UpstreamUsage | None


def prewarm_body(model: str, context_messages: list[bytes]) -> bytes:
    request = ChatRequest(
        fields={"model": model, "max_tokens": 1, "stream": False},
        messages=[{"role": "user", "content": PREWARM_QUESTION}],
    )
    return assemble_body(request, context_messages).body


def send_prewarm(base_url: str, target: PrewarmRequest, body: bytes) -> PrewarmResult:
    """Blocking: POST the body to the upstream's chat endpoint; raises on any failure."""
    started = time.perf_counter()
    try:
        answer = post_json(
            base_url + "/v1/chat/completions", body, target.authorization, target.timeout_seconds, target.verify_tls
        )
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


async def send_prewarm_in_background(base_url: str, target: PrewarmRequest, body: bytes) -> PrewarmResult:
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
            outcome = send_prewarm(base_url, target, body)
        except BaseException as e:  # handed to the waiting task
            outcome = e
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(deliver, outcome)

    threading.Thread(target=work, name="scout prewarm", daemon=True).start()
    return await future


class Prewarmer:
    """Remembers which base each upstream was last prewarmed with; sends when HEAD's base is new."""

    def __init__(self, metrics: ProxyMetrics, tracker: CacheTracker) -> None:
        self.metrics = metrics
        self.tracker = tracker
        self._seen: Generation | None = None
        self._warmed: tuple[str, str | None] | None = None

    async def poll(
        self,
        generation: Generation,
        current: Callable[[], Awaitable[RepoContext]],
        base_url: str | None,
        request: PrewarmRequest,
    ) -> None:
        """If the repository changed since the last poll and its base is new, prefill it upstream.

        ``current`` gives HEAD's context as requests get it (message 1 fitted to the window).
        """
        if generation == self._seen:
            return
        self._seen = generation
        try:
            context = await current()
        except GitError:
            return  # the request path reports it
        base = (base_url or "", context.snapshot.base_commit)
        if base_url is None or context.snapshot.commit is None or self._warmed == base:
            return
        self._warmed = base
        await self.send(base_url, request, context)

    async def send(self, base_url: str, request: PrewarmRequest, context: RepoContext) -> None:
        snapshot = context.snapshot
        body = prewarm_body(request.model, [snapshot.message_json, context.diff.message_json])
        base = short_commit(snapshot.base_commit)
        logger.info("prewarm: sending base %s (%s) to %s", base, human_bytes(len(body)), base_url)
        try:
            result = await send_prewarm_in_background(base_url, request, body)
        except Exception as e:
            self.metrics.prewarms.labels("failed").inc()
            logger.warning("prewarm of base %s failed: %s: %s", base, type(e).__name__, e)
            return
        self.metrics.prewarms.labels("ok").inc()
        self.metrics.prewarm_seconds.observe(result.seconds)
        self.tracker.before_send(base_url, snapshot, None)  # the next question can expect a hit
        logger.info("prewarm: base %s prefilled %s", base, describe(result))
