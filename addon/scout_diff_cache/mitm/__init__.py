"""The proxy as a list of small mitmproxy addons sharing one state object; the list is the table of contents.

Order matters where hooks of several addons meet: the settings first (every other addon reads
them in its own ``configure``), the request hooks in the order a request needs them (header
hygiene, Host and Origin, then auth, all judged on the headers before the body is read; the
proxy's own endpoints, the rewrite, then forwarding), the verdict before body retention.
"""

from __future__ import annotations

from .auth import ClientAuth
from .browser import BrowserGuard
from .contentview import ChatView
from .endpoints import LocalEndpoints
from .envelopes import ErrorEnvelopes
from .forward import UpstreamForwarding
from .gc import GcPacing
from .hygiene import HeaderHygiene
from .inject import ContextInjection
from .listen import ListenGuard
from .options import ScoutOptions
from .prewarm import Prewarm
from .retention import BodyRetention
from .shutdown import GracefulStop
from .state import ScoutState
from .verdicts import CacheVerdicts
from .warmstart import WarmStart
from .window import WindowLearner


def make_addons(state: ScoutState | None = None) -> list[object]:
    """The addons, in order, over one shared state."""
    state = state or ScoutState()
    return [
        ScoutOptions(state),  # settings: scout_* options, the repository context
        ListenGuard(state),  # loopback by default, lazy connections, tcp_timeout
        ErrorEnvelopes(state),  # mitmproxy's own error answers as OpenAI envelopes
        GracefulStop(state),  # running: SIGTERM/SIGINT drain the requests in flight; requestheaders: 503 then
        ChatView(state),  # mitmweb's "Scout chat" content view
        HeaderHygiene(state),  # requestheaders: control characters, folded lines, bad names (400)
        BrowserGuard(state),  # requestheaders: Host and Origin (DNS rebinding, web pages); CORS headers
        ClientAuth(state),  # requestheaders: PROXY_API_KEY (before the body is read)
        LocalEndpoints(state),  # request: /health, /metrics, /v1/models
        ContextInjection(state),  # request: snapshot + working diff + the client's messages
        UpstreamForwarding(state),  # request: TARGET_API_KEY, reachability, the response deadline
        CacheVerdicts(state),  # response: usage, verdict, headers, log line, metrics
        BodyRetention(state),  # response: trim old flows' snapshots in mitmweb
        Prewarm(state),  # running: prefill a new base upstream
        WindowLearner(state),  # running, response: the upstream's window and tokenizer
        WarmStart(state),  # running: message 1 built before the first request (after the window is asked)
        GcPacing(state),  # response: full collections paced by spliced bytes
    ]
