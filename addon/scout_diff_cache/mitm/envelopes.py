"""mitmproxy's own error answers (upstream refused or dropped, a broken response, a bad client request) as envelopes."""

from __future__ import annotations

from mitmproxy import http

from ..chat.errors import proxy_error
from .hooks import error_response
from .internals import install_error_envelopes, uninstall_error_envelopes
from .state import ScoutState


class ErrorEnvelopes:
    def __init__(self, state: ScoutState) -> None:
        self.state = state

    def load(self, loader: object) -> None:
        install_error_envelopes(self.render)

    def done(self) -> None:
        uninstall_error_envelopes()

    def render(self, status: int, message: str) -> http.Response:
        """One of mitmproxy's error answers, as an OpenAI envelope, counted."""
        self.state.metrics.error(status, "proxy")
        return error_response(proxy_error(status, message))
