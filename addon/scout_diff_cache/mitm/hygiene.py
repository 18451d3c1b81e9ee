"""Header hygiene: a request whose header block parsers disagree on is refused before anything else.

mitmproxy passes on header values with NUL, bare CR or folded lines, and names with spaces, as it
read them. The model server behind it may split such a value where the proxy did not, and so read
a header (a second ``Authorization``, a ``Transfer-Encoding``) that no check here has seen. They
are refused with a 400, before the body is read.
"""

from __future__ import annotations

from mitmproxy import http

from ..chat.access import malformed_header
from ..chat.errors import ApiError
from .hooks import headers_hook
from .state import ScoutState


class HeaderHygiene:
    def __init__(self, state: ScoutState) -> None:
        self.state = state

    @headers_hook
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        problem = malformed_header(flow.request.headers.fields)
        if problem is not None:
            raise ApiError(400, f"malformed request header: {problem}", "invalid_request_error", "invalid_header")
