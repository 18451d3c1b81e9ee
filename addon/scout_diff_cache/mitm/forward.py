"""Upstream forwarding: credentials, reachability, the response deadline, and masking the upstream key.

The last request hook before mitmproxy sends a request upstream. It swaps the client's key for
TARGET_API_KEY (or drops PROXY_API_KEY), answers a 503 at once when the upstream does not accept
a connection (a shared probe, skipped on an open upstream connection), and arms
UPSTREAM_TIMEOUT_MS. It also refuses a chat request that should carry context and does not:
nothing upstream of it may forward a bare chat request by mistake. While it is loaded, interim
(1xx) answers from the upstream are passed over: mitmproxy would take the first one for the answer.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http.url import hostport

from ..chat.errors import ApiError
from ..chat.routes import is_chat_route
from ..chat.upstream import ReachabilityProbe
from .deadline import UpstreamDeadlines
from .hooks import request_hook
from .internals import install_interim_skipping, uninstall_interim_skipping, upstream_connected
from .state import METADATA_KEY, ScoutState

MASKED_AUTHORIZATION = "Bearer [TARGET_API_KEY]"
FORWARDED_KEY = "scout_diff_cache.forwarded"
# mitmweb shows a reverse proxy's flows with the upstream's URL; this comment says which never went there.
LOCAL_ANSWER = "answered by scout-diff-cache, not sent upstream"


class UpstreamForwarding:
    def __init__(self, state: ScoutState) -> None:
        self.state = state
        self.deadlines = UpstreamDeadlines()
        self.probe = ReachabilityProbe()

    def load(self, loader: object) -> None:
        install_interim_skipping()

    @request_hook
    async def request(self, flow: http.HTTPFlow) -> None:
        settings, _ = self.state.configured()
        if settings.inject_context and self._bare_chat(flow):
            raise ApiError(500, "internal proxy error: a chat request has no context", "server_error", "internal_error")
        # The upstream's own Host (mitmproxy's reverse-mode rewrite, made here: BrowserGuard keeps the client's).
        flow.request.host_header = hostport(flow.request.scheme, flow.request.host, flow.request.port)
        if settings.target_api_key is not None:
            flow.request.headers["authorization"] = f"Bearer {settings.target_api_key}"
        elif settings.proxy_api_key is not None:
            flow.request.headers.pop("authorization", None)  # the proxy's key is not the upstream's
        # A kept-alive client's upstream connection is open already: it needs no probe.
        if settings.upstream_connect_timeout_ms and not upstream_connected(flow):
            unreachable = await self.probe.check(
                flow.request.host, flow.request.port, settings.upstream_connect_timeout_ms
            )
            if unreachable is not None:
                raise unreachable
        record = self.state.chats.get(flow.id)
        if record is not None:
            record.authorization = flow.request.headers.get("authorization")
        flow.metadata[FORWARDED_KEY] = True
        self.deadlines.start(flow, settings.upstream_timeout_ms)

    def _bare_chat(self, flow: http.HTTPFlow) -> bool:
        """A chat POST that got no context: neither rewritten now nor a replay sent as edited."""
        if not is_chat_route(flow.request.path) or flow.request.method.upper() != "POST":
            return False
        replayed_as_edited = flow.is_replay == "request" and METADATA_KEY in flow.metadata
        return flow.id not in self.state.chats and not replayed_as_edited

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.deadlines.stop(flow)
        self._mask_upstream_key(flow)
        if flow.response is not None and "text/event-stream" in flow.response.headers.get("content-type", ""):
            flow.response.stream = True  # passed on event by event, not buffered (chat answers get a usage tap)

    def response(self, flow: http.HTTPFlow) -> None:
        self.deadlines.response_sent(flow)
        if not flow.metadata.get(FORWARDED_KEY) and not flow.comment.startswith(LOCAL_ANSWER):
            flow.comment = f"{LOCAL_ANSWER} · {flow.comment}" if flow.comment else LOCAL_ANSWER

    def error(self, flow: http.HTTPFlow) -> None:
        self.deadlines.stop(flow)
        self._mask_upstream_key(flow)

    def done(self) -> None:
        self.deadlines.stop_all()
        uninstall_interim_skipping()

    def _mask_upstream_key(self, flow: http.HTTPFlow) -> None:
        """Keep TARGET_API_KEY out of what mitmweb and mitmdump show once the request has gone."""
        settings = self.state.settings
        key = settings.target_api_key if settings is not None else None
        if key is not None and flow.request.headers.get("authorization") == f"Bearer {key}":
            flow.request.headers["authorization"] = MASKED_AUTHORIZATION
