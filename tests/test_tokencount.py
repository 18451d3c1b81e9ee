"""The snapshot's exact token count, asked of a fake upstream on 127.0.0.1 (vLLM and llama.cpp APIs)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from scout_diff_cache.context.snapshot import Snapshot, SnapshotContent, SnapshotLimits, file_block, render_snapshot
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.observe import tokencount
from scout_diff_cache.observe.tokencount import (
    KEPT_COUNTS,
    RETRY_AFTER_SECONDS,
    CountRequest,
    NoCountApi,
    TokenCounter,
    count_snapshot_tokens,
)
from support import BOS, FakePrefixCache, Upstream, UpstreamBehaviour, run_upstream

LIMITS = SnapshotLimits(1 << 20, 1 << 26, PathFilter.build([], True))
WORKER_NAME = "scout token count"


def make_snapshot(commit: str | None, files: dict[str, str]) -> Snapshot:
    content = SnapshotContent()
    for path in sorted(files, key=str.encode):
        block = file_block(path.encode(), files[path].encode())
        content.add_block(path.encode(), block, len(block.encode()))
    return render_snapshot(commit, content, LIMITS)


SNAPSHOT = make_snapshot("1" * 40, {"main.py": 'print("héllo ✓")\n' * 40, 'we"ird\npath.txt': "\\n\t\x01\n"})
OTHER = make_snapshot("2" * 40, {"main.py": "print(2)\n"})


def fake_count(snapshot: Snapshot) -> tuple[int, str]:
    """What the fake upstream counts for the snapshot prefix: (tokens, the rendered prompt)."""
    prompt = FakePrefixCache.render({"messages": [json.loads(snapshot.message_json)]}, generation_prompt=False)
    return FakePrefixCache.tokens(prompt), prompt


def request_for(
    upstream: Upstream | str, model: str | None = "scout", authorization: str | None = None
) -> CountRequest:
    url = upstream if isinstance(upstream, str) else upstream.url
    return CountRequest(url, model, authorization, verify_tls=True)


def join_workers(timeout: float = 10) -> None:
    """Wait for every counting thread, those started by other counting threads included."""
    deadline = time.monotonic() + timeout
    while workers := [t for t in threading.enumerate() if t.name == WORKER_NAME]:
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            assert not worker.is_alive(), "a token count thread is still running"


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@contextlib.contextmanager
def scripted_server(answer: Callable[[str, dict[str, Any]], tuple[int, bytes]]) -> Iterator[str]:
    """A POST-only server on 127.0.0.1 whose answers come from ``answer(path, json_body)``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            status, payload = answer(self.path, json.loads(body))
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def shared_upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    """Two fake upstreams for the whole module (stopping one takes half a second)."""
    with run_upstream() as first, run_upstream() as second:
        yield first, second


def _reset(upstream: Upstream) -> Upstream:
    upstream.recorded.clear()
    upstream.server.behaviour = UpstreamBehaviour()
    return upstream


@pytest.fixture
def upstream(shared_upstreams: tuple[Upstream, Upstream]) -> Iterator[Upstream]:
    """The fake upstream, with nothing recorded and its default behaviour."""
    yield _reset(shared_upstreams[0])
    join_workers()


@pytest.fixture
def second(shared_upstreams: tuple[Upstream, Upstream]) -> Upstream:
    return _reset(shared_upstreams[1])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


# --- count_snapshot_tokens ------------------------------------------------------------------------


def test_vllm_tokenize_with_messages(upstream: Upstream) -> None:
    expected, prompt = fake_count(SNAPSHOT)
    with_generation_prompt = FakePrefixCache.tokens(
        FakePrefixCache.render({"messages": [json.loads(SNAPSHOT.message_json)]}, generation_prompt=True)
    )
    assert expected != with_generation_prompt
    upstream.behaviour.engine = "vllm"
    count = count_snapshot_tokens(request_for(upstream, authorization="Bearer sk-up"), SNAPSHOT)

    assert count == expected
    (sent,) = upstream.recorded
    assert (sent.method, sent.path) == ("POST", "/tokenize")
    assert sent.json() == {
        "model": "scout",
        "add_generation_prompt": False,
        "messages": [json.loads(SNAPSHOT.message_json)],
    }
    assert sent.raw_messages() == [SNAPSHOT.message_json]
    assert sent.headers["authorization"] == "Bearer sk-up"
    assert sent.headers["content-type"] == "application/json"
    assert prompt.startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\nThis is a snapshot")


def test_vllm_without_model_or_authorization(upstream: Upstream) -> None:
    upstream.behaviour.engine = "vllm"
    assert count_snapshot_tokens(request_for(upstream, model=None), OTHER) == fake_count(OTHER)[0]
    (sent,) = upstream.recorded
    assert sent.json()["model"] is None
    assert "authorization" not in sent.headers


def test_llamacpp_apply_template_then_tokenize(upstream: Upstream) -> None:
    expected, prompt = fake_count(SNAPSHOT)
    upstream.behaviour.engine = "llamacpp"
    count = count_snapshot_tokens(request_for(upstream, authorization="Bearer k"), SNAPSHOT)

    assert count == expected
    assert [(r.method, r.path) for r in upstream.recorded] == [
        ("POST", "/tokenize"),
        ("POST", "/apply-template"),
        ("POST", "/tokenize"),
    ]
    first, template, tokenize = upstream.recorded
    assert first.raw_messages() == [SNAPSHOT.message_json]
    assert template.json() == {"add_generation_prompt": False, "messages": [json.loads(SNAPSHOT.message_json)]}
    assert template.raw_messages() == [SNAPSHOT.message_json]
    # llama.cpp's template answer has no BOS text; /tokenize adds the BOS token with add_special.
    assert tokenize.json() == {"content": prompt.removeprefix(BOS), "add_special": True, "parse_special": True}
    assert all(r.headers["authorization"] == "Bearer k" for r in upstream.recorded)


@pytest.mark.parametrize("engine", [None, "tgi", "sglang"])
def test_no_count_api(engine: str | None, upstream: Upstream) -> None:
    upstream.behaviour.engine = engine
    with pytest.raises(NoCountApi, match="404"):
        count_snapshot_tokens(request_for(upstream), SNAPSHOT)
    assert [r.path for r in upstream.recorded] == ["/tokenize", "/apply-template"]


@pytest.mark.parametrize("status", [404, 405, 501])
def test_statuses_that_mean_no_api(status: int, upstream: Upstream) -> None:
    upstream.behaviour.status = status
    with pytest.raises(NoCountApi):
        count_snapshot_tokens(request_for(upstream), SNAPSHOT)


@pytest.mark.parametrize("status", [500, 503, 401])
def test_a_failing_upstream_is_an_error_not_a_missing_api(status: int, upstream: Upstream) -> None:
    upstream.behaviour.engine = "vllm"
    upstream.behaviour.status = status
    with pytest.raises(urllib.error.HTTPError) as raised:
        count_snapshot_tokens(request_for(upstream), SNAPSHOT)
    assert not isinstance(raised.value, NoCountApi)
    assert raised.value.code == status


def test_vllm_refusing_the_prompt_is_an_error_not_a_missing_api() -> None:
    def answer(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        if path == "/tokenize":
            return 400, b'{"error": {"message": "prompt too long"}}'
        return 404, b"{}"

    with scripted_server(answer) as url, pytest.raises(urllib.error.HTTPError) as raised:
        count_snapshot_tokens(request_for(url), SNAPSHOT)
    assert raised.value.code == 400


@pytest.mark.parametrize(
    ("tokenize", "template", "second_tokenize", "message"),
    [
        ({"count": "12"}, None, None, "answered 404"),
        ({"count": True}, None, None, "answered 404"),
        ({"count": 12.0}, None, None, "answered 404"),
        ({}, {"prompt": 5}, None, "without a prompt"),
        ({}, ["prompt"], None, "without a prompt"),
        ({}, {"prompt": "x"}, {"tokens": "abc"}, "without tokens"),
        ({}, {"prompt": "x"}, {"count": 3}, "without tokens"),
    ],
)
def test_answers_without_a_count(tokenize: object, template: object, second_tokenize: object, message: str) -> None:
    def answer(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        if path == "/tokenize":
            return 200, json.dumps(second_tokenize if "content" in body else tokenize).encode()
        if path == "/apply-template" and template is not None:
            return 200, json.dumps(template).encode()
        return 404, b"{}"

    with scripted_server(answer) as url, pytest.raises(NoCountApi, match=message):
        count_snapshot_tokens(request_for(url), SNAPSHOT)


def test_vllm_count_of_zero_is_a_count() -> None:
    with scripted_server(lambda path, body: (200, b'{"count": 0}')) as url:
        assert count_snapshot_tokens(request_for(url), SNAPSHOT) == 0


# --- TokenCounter ---------------------------------------------------------------------------------


def test_counts_in_the_background_once_per_upstream_and_snapshot(upstream: Upstream, second: Upstream) -> None:
    counter = TokenCounter()
    upstream.behaviour.engine = "vllm"
    second.behaviour.engine = "llamacpp"
    assert counter.exact(upstream.url, SNAPSHOT) is None

    counter.request(request_for(upstream), SNAPSHOT)
    wait_for(lambda: counter.exact(upstream.url, SNAPSHOT) is not None)
    assert counter.exact(upstream.url, SNAPSHOT) == fake_count(SNAPSHOT)[0]
    assert counter.exact(second.url, SNAPSHOT) is None
    assert counter.exact(upstream.url, OTHER) is None

    for _ in range(3):
        counter.request(request_for(upstream), SNAPSHOT)
    join_workers()
    assert len(upstream.recorded) == 1

    counter.request(request_for(upstream), OTHER)
    counter.request(request_for(second), SNAPSHOT)
    wait_for(lambda: None not in (counter.exact(upstream.url, OTHER), counter.exact(second.url, SNAPSHOT)))
    join_workers()
    assert counter.exact(upstream.url, OTHER) == fake_count(OTHER)[0]
    assert counter.exact(second.url, SNAPSHOT) == fake_count(SNAPSHOT)[0]
    assert counter.exact(upstream.url, SNAPSHOT) == fake_count(SNAPSHOT)[0]
    assert len(upstream.recorded) == 2
    assert len(second.recorded) == 3  # /tokenize, /apply-template, /tokenize


def test_an_upstream_without_the_api_is_not_asked_again(caplog: pytest.LogCaptureFixture, upstream: Upstream) -> None:
    counter = TokenCounter()
    caplog.set_level("INFO", logger="scout_diff_cache.observe.tokencount")
    upstream.behaviour.engine = None
    counter.request(request_for(upstream), SNAPSHOT)
    join_workers()
    assert [r.path for r in upstream.recorded] == ["/tokenize", "/apply-template"]
    assert "offers no token count API" in caplog.text

    upstream.behaviour.engine = "vllm"  # even if it would answer now: remembered per upstream
    counter.request(request_for(upstream), SNAPSHOT)
    counter.request(request_for(upstream), OTHER)
    join_workers()
    assert len(upstream.recorded) == 2
    assert counter.exact(upstream.url, SNAPSHOT) is None
    assert counter.exact(upstream.url, OTHER) is None


def test_no_second_count_while_one_is_under_way(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    calls: list[tuple[str, int]] = []

    def slow_count(request: CountRequest, snapshot: Snapshot) -> int:
        calls.append((request.base_url, snapshot.size))
        assert release.wait(10)
        return 4242

    monkeypatch.setattr(tokencount, "count_snapshot_tokens", slow_count)
    counter = TokenCounter()
    request = request_for("http://127.0.0.1:1")
    counter.request(request, SNAPSHOT)
    wait_for(lambda: len(calls) == 1)
    for _ in range(5):
        counter.request(request, SNAPSHOT)
    assert counter.exact(request.base_url, SNAPSHOT) is None
    assert len(calls) == 1

    release.set()
    wait_for(lambda: counter.exact(request.base_url, SNAPSHOT) == 4242)
    join_workers()
    counter.request(request, SNAPSHOT)
    join_workers()
    assert calls == [(request.base_url, SNAPSHOT.size)]


def test_a_failure_is_retried_only_after_the_pause(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, upstream: Upstream
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(tokencount, "time", clock)
    counter = TokenCounter()
    upstream.behaviour.engine = "vllm"
    upstream.behaviour.status = 500
    counter.request(request_for(upstream), SNAPSHOT)
    join_workers()
    assert [r.path for r in upstream.recorded] == ["/tokenize", "/apply-template"]
    assert counter.exact(upstream.url, SNAPSHOT) is None
    assert f"failed (next try in {RETRY_AFTER_SECONDS} s): HTTPError" in caplog.text

    upstream.behaviour.status = 200
    counter.request(request_for(upstream), SNAPSHOT)
    clock.now += RETRY_AFTER_SECONDS - 1
    counter.request(request_for(upstream), SNAPSHOT)
    join_workers()
    assert len(upstream.recorded) == 2

    counter.request(request_for(upstream), OTHER)  # the pause is per snapshot, not per upstream
    join_workers()
    assert counter.exact(upstream.url, OTHER) == fake_count(OTHER)[0]

    clock.now += 1
    counter.request(request_for(upstream), SNAPSHOT)
    join_workers()
    assert counter.exact(upstream.url, SNAPSHOT) == fake_count(SNAPSHOT)[0]
    assert [r.path for r in upstream.recorded] == ["/tokenize", "/apply-template", "/tokenize", "/tokenize"]


def test_only_the_latest_counts_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str | None] = []

    def count(request: CountRequest, snapshot: Snapshot) -> int:
        calls.append(snapshot.commit)
        return snapshot.size

    monkeypatch.setattr(tokencount, "count_snapshot_tokens", count)
    counter = TokenCounter()
    request = request_for("http://127.0.0.1:1")
    snapshots = [make_snapshot(f"{i:040x}", {"f.txt": f"{i}\n"}) for i in range(KEPT_COUNTS + 1)]
    for snapshot in snapshots:
        counter.request(request, snapshot)
        join_workers()
    assert counter.exact(request.base_url, snapshots[0]) is None
    assert [counter.exact(request.base_url, s) for s in snapshots[1:]] == [s.size for s in snapshots[1:]]
    counter.request(request, snapshots[0])  # forgotten: counted again
    join_workers()
    assert counter.exact(request.base_url, snapshots[0]) == snapshots[0].size
    assert calls == [s.commit for s in snapshots] + [snapshots[0].commit]


class _HookedLock:
    """A lock that runs a hook once, in a counting thread, right after its first release there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hook: Callable[[], None] | None = None

    def __enter__(self) -> _HookedLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if threading.current_thread().name == WORKER_NAME and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()


def test_a_request_as_a_count_finishes_does_not_count_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between 'no longer pending' and 'count stored' another request must not start a second count."""
    calls: list[str | None] = []

    def count(request: CountRequest, snapshot: Snapshot) -> int:
        calls.append(snapshot.commit)
        return 7

    monkeypatch.setattr(tokencount, "count_snapshot_tokens", count)
    counter = TokenCounter()
    request = request_for("http://127.0.0.1:1")
    lock = _HookedLock()
    lock.hook = lambda: counter.request(request, SNAPSHOT)
    counter._lock = lock  # type: ignore[assignment]
    counter.request(request, SNAPSHOT)
    join_workers()
    assert counter.exact(request.base_url, SNAPSHOT) == 7
    assert calls == [SNAPSHOT.commit]
