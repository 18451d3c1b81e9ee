"""Client auth: with PROXY_API_KEY set, every request must carry it; the header is masked at once.

Checked on the request's headers: a client without the key gets its 401 before it has sent its
body, and the proxy never reads that body (it is drained and discarded, bounded, so the client
can read the answer).
"""

from __future__ import annotations

from mitmproxy import http

from ..chat.access import is_authorized
from ..chat.errors import ApiError
from .hooks import headers_hook
from .state import ScoutState

MASKED_CLIENT_AUTHORIZATION = "Bearer [PROXY_API_KEY]"
REJECTED_AUTHORIZATION = "[rejected]"


class ClientAuth:
    def __init__(self, state: ScoutState) -> None:
        self.state = state

    @headers_hook
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        settings, _ = self.state.configured()
        if settings.proxy_api_key is None:
            return
        authorized = is_authorized(flow.request.headers.get("authorization"), settings.proxy_api_key)
        if "authorization" in flow.request.headers:
            # Masked either way: a rejected header may hold the key with a typo or the wrong scheme.
            flow.request.headers["authorization"] = (
                MASKED_CLIENT_AUTHORIZATION if authorized else REJECTED_AUTHORIZATION
            )
        if not authorized:
            raise ApiError(
                401,
                "missing or wrong proxy key: send 'Authorization: Bearer <PROXY_API_KEY>'",
                "invalid_request_error",
                "invalid_api_key",
            )
