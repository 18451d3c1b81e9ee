"""Talking to the upstream outside mitmproxy's own connection: reachability, and small JSON posts.

Before a request is forwarded, ``probe_upstream`` opens (and resets) one TCP connection to the
upstream, bounded by UPSTREAM_CONNECT_TIMEOUT_MS: mitmproxy itself has no connect timeout and
answers a refused connection with an HTML page. ``ReachabilityProbe`` keeps that from costing the
model server a connection per request: concurrent requests share one probe, and a success is
trusted for ``PROBE_FRESH_SECONDS`` (a failure never is: recovery is seen at once). An upstream
that goes away inside that window is still answered: a refused connect by mitmproxy (503), a
silent one by UPSTREAM_TIMEOUT_MS (504). ``post_json`` is the blocking client used for
token counts and prewarm requests, ``get_json`` the one for the model list and server properties
(run in threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import urllib.request

from .. import __version__
from .errors import ApiError

# The proxy's own requests to the upstream (token counts, prewarm, the window) say who sends them.
USER_AGENT = f"scout-diff-cache/{__version__}"

PROBE_FRESH_SECONDS = 1.0


class ReachabilityProbe:
    """``probe_upstream`` shared: one probe in flight per upstream, and a recent success reused."""

    def __init__(self, fresh_seconds: float = PROBE_FRESH_SECONDS) -> None:
        self.fresh_seconds = fresh_seconds
        self._in_flight: dict[tuple[str, int], asyncio.Future[ApiError | None]] = {}
        self._reachable_until: dict[tuple[str, int], float] = {}

    async def check(self, host: str, port: int, timeout_ms: int) -> ApiError | None:
        loop = asyncio.get_running_loop()
        key = (host, port)
        if self._reachable_until.get(key, 0.0) > loop.time():
            return None
        pending = self._in_flight.get(key)
        if pending is None:
            pending = loop.create_task(probe_upstream(host, port, timeout_ms))
            self._in_flight[key] = pending
            pending.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(pending)

    def _settle(self, key: tuple[str, int], done: asyncio.Future[ApiError | None]) -> None:
        self._in_flight.pop(key, None)
        if not done.cancelled() and done.exception() is None and done.result() is None:
            self._reachable_until[key] = asyncio.get_running_loop().time() + self.fresh_seconds
        else:
            self._reachable_until.pop(key, None)


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


def post_json(url: str, body: bytes, authorization: str | None, timeout: float | None, verify_tls: bool) -> bytes:
    """Blocking: POST a JSON body to the upstream (token counts, prewarm) and return the answer's body.

    An HTTP error status raises urllib.error.HTTPError, a network failure OSError.
    """
    return _fetch(url, body, authorization, timeout, verify_tls)


def get_json(url: str, authorization: str | None, timeout: float | None, verify_tls: bool) -> bytes:
    """Blocking: GET from the upstream (its model list, its properties); errors as for ``post_json``."""
    return _fetch(url, None, authorization, timeout, verify_tls)


def _fetch(url: str, body: bytes | None, authorization: str | None, timeout: float | None, verify_tls: bool) -> bytes:
    headers = {"user-agent": USER_AGENT}
    if body is not None:
        headers["content-type"] = "application/json"
    if authorization:
        headers["authorization"] = authorization
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    context = None if verify_tls else ssl._create_unverified_context()
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        answer: bytes = response.read()
    return answer
