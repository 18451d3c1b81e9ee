"""The two rules every request hook keeps, in one place: answer-first-wins, and fail closed.

mitmproxy runs each addon's ``request`` hook in turn; when one raises, it logs the exception and
goes on with the next addon, and then forwards the request as it is: a chat request would reach
the model server without its context. ``request_hook`` wraps an addon's hook so that it does
nothing once another addon has answered (``flow.response`` is set), and so that any exception
it raises becomes the client's answer: an ``ApiError`` as its own envelope, anything else as a
500, logged with its traceback. An answered flow is never forwarded.

``headers_hook`` does the same for ``requestheaders`` hooks, which judge a request by its headers
alone (Host, Origin, the proxy key): a refusal there is sent before the body is read, so a client
that may not use the proxy cannot make it hold a body.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from mitmproxy import http

from ..chat.errors import ApiError, internal_error
from .internals import answer_before_body
from .state import ScoutState

logger = logging.getLogger(__name__)


class HasState(Protocol):
    state: ScoutState


def json_response(status: int, payload: object, headers: dict[str, str] | None = None) -> http.Response:
    body = json.dumps(payload, ensure_ascii=False, indent=None).encode("utf-8")
    return http.Response.make(status, body, {"content-type": "application/json", **(headers or {})})


def error_response(error: ApiError) -> http.Response:
    response = json_response(error.status, error.envelope())
    if error.status == 401:
        response.headers["www-authenticate"] = 'Bearer realm="scout-diff-cache"'
    return response


def answer_error(state: ScoutState, flow: http.HTTPFlow, error: ApiError) -> None:
    """Answer the flow with an error envelope, counted; a rewritten chat is marked as answered here."""
    flow.response = error_response(error)
    state.metrics.error(error.status, "proxy")
    record = state.chats.get(flow.id)
    if record is not None:
        record.proxy_error = error


type Hook[A] = Callable[[A, http.HTTPFlow], Awaitable[None]]


def _guarded[A: HasState](hook: Hook[A], answer: Callable[[ScoutState, http.HTTPFlow, ApiError], None]) -> Hook[A]:
    """``hook``, skipped once the flow is answered, its every failure answered with ``answer``.

    (A refusal from the headers sets ``flow.response`` too, also when it was sent at once.)
    """

    @functools.wraps(hook)
    async def guarded(addon: A, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        try:
            await hook(addon, flow)
        except ApiError as e:
            answer(addon.state, flow, e)
        except Exception as e:
            logger.exception("scout-diff-cache: %s failed on %s", type(addon).__name__, flow.request.path)
            answer(addon.state, flow, internal_error(e))

    return guarded


def request_hook[A: HasState](hook: Hook[A]) -> Hook[A]:
    """Wrap an addon's ``request`` hook: skip answered flows; turn every failure into the answer."""
    return _guarded(hook, answer_error)


def expects_body(request: http.Request) -> bool:
    """Whether a body follows the request's headers (a length above 0, or a transfer coding)."""
    if "transfer-encoding" in request.headers:
        return True
    try:
        return int(request.headers.get("content-length", "0")) > 0
    except ValueError:
        return True  # mitmproxy refuses a malformed length itself; never wait for it here


def refuse_from_headers(state: ScoutState, flow: http.HTTPFlow, error: ApiError) -> None:
    """Answer ``error`` from a ``requestheaders`` hook: at once, without reading a body that follows."""
    response = error_response(error)
    state.metrics.error(error.status, "proxy")
    answered_early = expects_body(flow.request) and answer_before_body(flow, response.copy())
    flow.response = response  # what mitmweb shows; mitmproxy sends it after the (empty) body if not sent yet
    if answered_early:
        logger.info("refused %s %s before its body: %s", flow.request.method, flow.request.path, error.status)


def headers_hook[A: HasState](hook: Hook[A]) -> Hook[A]:
    """Wrap an addon's ``requestheaders`` hook: skip answered flows; refuse before the body on failure."""
    return _guarded(hook, refuse_from_headers)
