"""A model server that streams one very long event, through a real mitmdump."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable

from support import Proxy, Repo, Upstream

CHAT = "/v1/chat/completions"
LONG_EVENT_CHARS = 4 * 1024 * 1024


def test_a_long_event_reaches_the_client_as_it_is_streamed(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """It used to be held back until it ended (and split in quadratic time): the client saw nothing meanwhile."""
    repo = make_repo({"a.py": "x = 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    upstream.behaviour.engine = "vllm"  # usage is asked for, and must still be removed for this client
    upstream.behaviour.long_event_chars = LONG_EVENT_CHARS
    upstream.behaviour.piece_delay = 0.01  # 64 pieces over about 0.7 s
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "long"}]})
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    started = time.monotonic()
    connection.request("POST", CHAT, body=body, headers={"content-type": "application/json"})
    response = connection.getresponse()
    received = bytearray()
    first_mebibyte_at = None
    while chunk := response.read1(65536):
        received += chunk
        if first_mebibyte_at is None and len(received) >= 1024 * 1024:
            first_mebibyte_at = time.monotonic() - started
    finished_at = time.monotonic() - started
    connection.close()
    assert response.status == 200
    assert first_mebibyte_at is not None and first_mebibyte_at < 0.6 * finished_at, (first_mebibyte_at, finished_at)
    events = [e for e in bytes(received).split(b"\n\n") if e]
    assert len(json.loads(events[0].removeprefix(b"data: "))["choices"][0]["delta"]["content"]) == LONG_EVENT_CHARS
    assert not any(b'"usage"' in e and b'"choices": []' in e for e in events)  # the usage chunk was removed
    assert events[-1] == b"data: [DONE]"
