"""Web pages and DNS rebinding: a page in the user's browser must not read the repository through the proxy.

A page can send the proxy a chat request without a CORS preflight (a POST whose body is a Blob
has no Content-Type: a "simple request"), and it can read the answer when the model server
allows its origin (llama-server reflects ``Origin``; vLLM allows ``*``). A page that rebinds its
own DNS name to 127.0.0.1 needs no CORS at all: the browser thinks it talks to its own site.

- A request whose ``Host`` is not an IP address, localhost, the listen host or a name in
  ALLOWED_HOSTS is refused (403): that is what a rebinding page sends. Replays are exempt: a
  stored flow holds the Host it was sent upstream with. mitmproxy rewrites ``Host``
  to the upstream before any hook runs, so ``keep_host_header`` is kept on and forwarding sets the
  upstream's Host itself.
- A request carrying an ``Origin`` not in ALLOWED_ORIGINS is refused (403); browsers send one on
  every cross-origin request and every POST. An allowed origin's preflight is answered here, its
  chat requests must be JSON, and its answers carry CORS headers for it.
- No CORS header from the upstream reaches a client: the proxy alone decides who may read.

All of it is judged on the request's headers, before the body is read (``headers_hook``).
"""

from __future__ import annotations

from mitmproxy import ctx, http

from ..chat.access import host_allowed
from ..chat.errors import ApiError
from ..chat.request import is_json_media_type
from ..chat.routes import is_chat_route
from .hooks import headers_hook
from .listen import listen_hosts
from .state import ScoutState

PREFLIGHT_MAX_AGE_SECONDS = 600
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "authorization, content-type"


class BrowserGuard:
    def __init__(self, state: ScoutState) -> None:
        self.state = state

    def configure(self, updated: set[str]) -> None:
        if "keep_host_header" in ctx.options and not ctx.options.keep_host_header:
            ctx.options.keep_host_header = True  # the client's Host, for the check; forwarding sets the upstream's

    @headers_hook
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        settings, _ = self.state.configured()
        host = flow.request.host_header
        # A replay (mitmweb's, client_replay) carries the Host it was sent upstream with, and no browser sends it.
        if (
            flow.is_replay is None
            and host is not None
            and not host_allowed(host, [*settings.allowed_hosts, *listen_hosts(ctx.options.listen_host)])
        ):
            raise ApiError(
                403,
                f"the Host {host!r} is not a name of this proxy (add it to ALLOWED_HOSTS if it is); "
                "a web page that rebinds its own name to this address sends such a Host",
                "invalid_request_error",
                "host_not_allowed",
            )
        origin = flow.request.headers.get("origin")
        if origin is None:
            return
        if origin not in settings.allowed_origins:
            raise ApiError(
                403,
                f"requests from web pages are refused: the Origin {origin!r} is not in ALLOWED_ORIGINS",
                "invalid_request_error",
                "origin_not_allowed",
            )
        method = flow.request.method.upper()
        if method == "OPTIONS":
            flow.response = http.Response.make(204)  # its CORS headers are added with every answer's
        elif method == "POST" and is_chat_route(flow.request.path):
            content_type = flow.request.headers.get("content-type")
            if content_type is None or not is_json_media_type(content_type):
                raise ApiError(
                    415,
                    "a chat request from a web page must be sent as application/json",
                    "invalid_request_error",
                    "unsupported_media_type",
                )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        for name in [name for name in response.headers if name.lower().startswith("access-control-")]:  # upstream's
            del response.headers[name]
        settings = self.state.settings
        origin = flow.request.headers.get("origin")
        if settings is not None and origin is not None and origin in settings.allowed_origins:
            response.headers["access-control-allow-origin"] = origin
            response.headers["access-control-expose-headers"] = (
                "x-scout-cache, x-scout-cache-expected, x-scout-window, x-scout-retrieval, x-scout-retrieved"
            )
            response.headers["vary"] = "Origin"
            if flow.request.method.upper() == "OPTIONS":
                response.headers.update(preflight_headers(origin))


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        "access-control-allow-origin": origin,
        "access-control-allow-methods": ALLOWED_METHODS,
        "access-control-allow-headers": ALLOWED_HEADERS,
        "access-control-max-age": str(PREFLIGHT_MAX_AGE_SECONDS),
        "vary": "Origin",
    }
