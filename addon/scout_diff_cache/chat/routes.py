"""The paths the proxy answers or rewrites, and how a request path is matched against them.

A path is matched the way the model servers route it: the query dropped, percent-escapes decoded
(uvicorn decodes ``/v1/%63hat/completions``, ``%2F`` included), dot segments resolved, repeated
and trailing slashes collapsed. Every route that is a chat route upstream gets the context: vLLM,
SGLang and TGI serve ``/v1/chat/completions``; llama-server also ``/chat/completions`` and
``/api/chat`` (an OpenAI client whose base URL lacks ``/v1`` lands there). A path that is a chat
route except for its letters' case, a ``;parameter`` or a control character is a near miss: no
server routes it as chat, and the proxy answers it rather than forwarding a chat body bare.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

CHAT_PATH = "/v1/chat/completions"
CHAT_PATHS = frozenset({CHAT_PATH, "/chat/completions", "/api/chat"})
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"

_PARAMETERS = re.compile(r";[^/]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def route_path(path: str) -> str:
    """The path as routes see it: no query, escapes decoded, no dot segments, no repeated or trailing slashes.

    '/v1/chat/completions/' must not slip past the rewrite: a FastAPI upstream (vLLM) answers it
    with a redirect to its own address, which a client would follow around the proxy.
    """
    decoded = unquote(path.partition("?")[0], errors="surrogateescape")
    resolved = posixpath.normpath("/" + decoded)  # "." and "..", and repeated slashes
    collapsed = re.sub(r"/{2,}", "/", resolved)
    return collapsed.rstrip("/") or "/"


def is_chat_route(path: str) -> bool:
    return route_path(path) in CHAT_PATHS


def is_near_chat_route(path: str) -> bool:
    """Not a chat route, but one once case, ``;parameters`` and control characters are ignored."""
    loose = _CONTROL.sub("", _PARAMETERS.sub("", route_path(path))).lower()
    return not is_chat_route(path) and route_path(loose) in CHAT_PATHS
