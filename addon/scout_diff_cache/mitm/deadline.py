"""UPSTREAM_TIMEOUT_MS: a silent upstream is answered with a 504, and its connection is closed.

A timer starts when a request is forwarded and stops at the upstream's response headers (or an
error). When it fires, the waiting flow is answered with a 504 in the OpenAI envelope and, once
that has reached the client, the upstream connection is closed so the model server stops working
on a request nobody waits for. The mitmproxy internals this needs live in ``internals``.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import http

from ..chat.errors import ApiError
from .hooks import error_response
from .internals import answer_waiting_flow, close_server_connection, close_server_connection_when_done

logger = logging.getLogger(__name__)

TIMED_OUT_KEY = "scout_diff_cache.upstream_timeout_ms"


class UpstreamDeadlines:
    def __init__(self) -> None:
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closers: set[asyncio.Task[None]] = set()

    def start(self, flow: http.HTTPFlow, timeout_ms: int) -> None:
        """Arm the deadline for a request about to be forwarded (0 disables it)."""
        self.stop(flow)
        if timeout_ms > 0:
            loop = asyncio.get_running_loop()
            self._timers[flow.id] = loop.call_later(timeout_ms / 1000, self._expire, flow, timeout_ms)

    def stop(self, flow: http.HTTPFlow) -> None:
        """Disarm it: the upstream answered (or failed) in time."""
        timer = self._timers.pop(flow.id, None)
        if timer is not None:
            timer.cancel()

    def stop_all(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def response_sent(self, flow: http.HTTPFlow) -> None:
        """Call from the ``response`` hook: after a timeout answer, close the upstream connection."""
        if TIMED_OUT_KEY in flow.metadata:
            task = asyncio.create_task(close_server_connection_when_done(flow))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    def _expire(self, flow: http.HTTPFlow, timeout_ms: int) -> None:
        self._timers.pop(flow.id, None)
        if flow.response is not None or flow.error is not None:
            return
        flow.metadata[TIMED_OUT_KEY] = timeout_ms
        answer = error_response(
            ApiError(
                504,
                f"the upstream sent no response headers within {timeout_ms} ms (UPSTREAM_TIMEOUT_MS); "
                "the proxy closed its connection to the upstream",
                "server_error",
                "upstream_timeout",
            )
        )
        if answer_waiting_flow(flow, answer):
            logger.warning("upstream timeout after %d ms on %s: answered 504", timeout_ms, flow.request.path)
        else:
            # Still connecting: closing the attempt makes mitmproxy answer the client itself.
            close_server_connection(flow)
            logger.warning("upstream timeout after %d ms while connecting: connection attempt closed", timeout_ms)
