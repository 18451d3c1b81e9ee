"""mitmproxy's own error answers (upstream refused or dropped, a broken response, a bad client request) as envelopes.

A body over ``body_size_limit`` is refused by mitmproxy while the client is still sending it; the
connection then lingers (drained, bounded) so that the client reads the 413 rather than a reset.
"""

from __future__ import annotations

from mitmproxy import http

from ..chat.errors import proxy_error
from .hooks import error_response
from .internals import install_error_envelopes, linger_after_close, stop_lingering, uninstall_error_envelopes
from .state import ScoutState

BODY_SIZE_LIMIT_MESSAGE = "Request body exceeds mitmproxy's body_size_limit"


class ErrorEnvelopes:
    def __init__(self, state: ScoutState) -> None:
        self.state = state

    def load(self, loader: object) -> None:
        install_error_envelopes(self.render)

    def done(self) -> None:
        uninstall_error_envelopes()
        stop_lingering()

    def error(self, flow: http.HTTPFlow) -> None:
        message = flow.error.msg if flow.error is not None else ""
        if message.startswith(BODY_SIZE_LIMIT_MESSAGE):
            linger_after_close(flow)

    def render(self, status: int, message: str) -> http.Response:
        """One of mitmproxy's error answers, as an OpenAI envelope, counted."""
        self.state.metrics.error(status, "proxy")
        return error_response(proxy_error(status, message))
