"""Upstream faults: an unreachable upstream is a 503, a silent one a 504, both as OpenAI envelopes.

Before a request is forwarded, ``probe_upstream`` opens (and resets) one TCP connection to the
upstream, bounded by UPSTREAM_CONNECT_TIMEOUT_MS: mitmproxy itself has no connect timeout and
answers a refused connection with an HTML page. A server that dies between the probe and the
real connection is answered through ``mitm_internals.install_error_envelopes``.

UPSTREAM_TIMEOUT_MS: a timer starts when a request is forwarded and stops at the upstream's
response headers (or an error). When it fires, the waiting flow is answered with a 504 in the
OpenAI envelope and, once that has reached the client, the upstream connection is closed so the
model server stops working on a request nobody waits for. The mitmproxy internals this needs
live in ``mitm_internals``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import urllib.request

from mitmproxy import http

from .errors import ApiError, error_response
from .mitm_internals import answer_waiting_flow, close_server_connection, close_server_connection_when_done

logger = logging.getLogger(__name__)

TIMED_OUT_KEY = "scout_diff_cache.upstream_timeout_ms"


async def probe_upstream(host: str, port: int, timeout_ms: int) -> ApiError | None:
    """None if the upstream accepts a TCP connection in time, else the 503 to answer with."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_ms / 1000)
    except TimeoutError:
        return _unavailable(
            f"the upstream {host}:{port} did not accept a connection within {timeout_ms} ms "
            "(UPSTREAM_CONNECT_TIMEOUT_MS)"
        )
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        return _unavailable(f"the upstream {host}:{port} cannot be reached: {reason}")
    with contextlib.suppress(OSError):
        writer.transport.abort()  # a reset, not a FIN: no TIME_WAIT socket per request
    return None


def _unavailable(message: str) -> ApiError:
    return ApiError(503, message, "server_error", "upstream_unavailable")


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


def post_json(url: str, body: bytes, authorization: str | None, timeout: float | None, verify_tls: bool) -> bytes:
    """Blocking: POST a JSON body to the upstream (token counts, prewarm) and return the answer's body.

    An HTTP error status raises urllib.error.HTTPError, a network failure OSError.
    """
    headers = {"content-type": "application/json"}
    if authorization:
        headers["authorization"] = authorization
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    context = None if verify_tls else ssl._create_unverified_context()
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        answer: bytes = response.read()
    return answer
