"""Every path a model server routes as chat gets the codebase; near misses are answered, not forwarded bare.

Paths go out exactly as written (http.client does not normalise them), against a real mitmdump.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from support import Proxy, Repo, Upstream, raw_request

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
CHAT_ROUTES = [
    "/v1/chat/completions",
    "/chat/completions",  # llama-server's own route: an OpenAI client whose base URL lacks /v1
    "/api/chat",  # llama-server
    "/v1/%63hat/completions",  # uvicorn decodes it
    "/v1/chat%2Fcompletions",
    "/v1/./chat/completions",
    "/v1/x/../chat/completions",
    "//v1//chat/completions/",
    "/v1/chat/completions?stream=false",
]
NEAR_MISSES = ["/V1/chat/completions", "/v1/Chat/Completions", "/v1/chat/completions;x", "/v1/chat/completions%00"]


def post(proxy: Proxy, path: str) -> tuple[int, bytes]:
    answer = raw_request(proxy, "POST", path, BODY, {"content-type": "application/json"})
    return answer.status, answer.body


@pytest.fixture
def proxy(make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]) -> Proxy:
    repo = make_repo({"a.py": "x = 1\n"})
    return start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})


def test_every_chat_route_of_the_model_servers_gets_the_codebase(proxy: Proxy, upstream: Upstream) -> None:
    for path in CHAT_ROUTES:
        status, _ = post(proxy, path)
        assert status == 200, path
    assert len(upstream.recorded) == len(CHAT_ROUTES)  # each forwarded, on the path the client wrote
    assert upstream.recorded[3].path == "/v1/%63hat/completions"
    for record in upstream.recorded:
        roles = [m["role"] for m in record.json()["messages"]]
        assert roles == ["system", "system", "user"], record.path


def test_near_misses_are_answered_not_forwarded_without_context(proxy: Proxy, upstream: Upstream) -> None:
    for path in NEAR_MISSES:
        status, body = post(proxy, path)
        assert status == 404, path
        assert json.loads(body)["error"]["code"] == "unknown_route"
    assert upstream.recorded == []
