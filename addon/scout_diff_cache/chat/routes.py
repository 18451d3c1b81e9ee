"""The paths the proxy answers or rewrites, and how a request path is matched against them."""

from __future__ import annotations

import re

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"


def route_path(path: str) -> str:
    """The path as routes see it: no query, no repeated or trailing slashes.

    '/v1/chat/completions/' must not slip past the rewrite: a FastAPI upstream (vLLM) answers it
    with a redirect to its own address, which a client would follow around the proxy.
    """
    collapsed = re.sub(r"/{2,}", "/", path.partition("?")[0])
    return collapsed.rstrip("/") or "/"
