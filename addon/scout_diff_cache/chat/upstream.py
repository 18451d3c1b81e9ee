"""Talking to the upstream outside mitmproxy's own connection: reachability, and small JSON posts.

Before a request is forwarded, ``probe_upstream`` opens (and resets) one TCP connection to the
upstream, bounded by UPSTREAM_CONNECT_TIMEOUT_MS: mitmproxy itself has no connect timeout and
answers a refused connection with an HTML page. ``post_json`` is the blocking client used for
token counts and prewarm requests (run in threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import urllib.request

from .errors import ApiError


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
    headers = {"content-type": "application/json"}
    if authorization:
        headers["authorization"] = authorization
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    context = None if verify_tls else ssl._create_unverified_context()
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        answer: bytes = response.read()
    return answer
