"""End to end: a real mitmdump running the addon, a recording upstream, real git repositories.

Most tests share one proxy in front of one read-only repository (``shared``); tests that change
the repository, the settings or the upstream start their own. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from mitmproxy.addons.view import View
from mitmproxy.net import encoding
from mitmproxy.test import taddons, tflow, tutils

from inprocess import ScoutAddons
from scout_diff_cache.context.framing import TRIMMED_SNAPSHOT_PREFIX
from scout_diff_cache.mitm.state import METADATA_KEY
from support import (
    CLEARED_ENV_NAMES,
    Proxy,
    Recorded,
    Repo,
    Upstream,
    UpstreamBehaviour,
    free_port,
    http_request,
    run_proxy,
    run_upstream,
)

CHAT = "/v1/chat/completions"
MODEL = "llama-4-scout"
JSON = {"content-type": "application/json"}

SHARED_FILES: dict[str, str | bytes] = {
    "README.md": "# demo\n",
    "src/app.py": "print('hello')\n",
    "src/util.py": "def add(a, b):\n    return a + b\n",
    "docs/naïve guide.md": "Ünïcödé text\n",
    ".env": "API_TOKEN=do-not-send\n",  # left out by the default exclusions
    "assets/logo.bin": b"\x89PNG\x00\x01\x02",  # binary: listed, not included
}
SHARED_EDIT = {"src/app.py": "print('hello, world')\n"}
SHARED_INCLUDED_FILES = 4  # README.md, src/app.py, src/util.py, docs/naïve guide.md


def openai_client(proxy: Proxy, api_key: str = "client-key", timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)


def chat_body(content: str = "hi", **fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}).encode()


def ask(proxy: Proxy, content: str = "hi") -> None:
    reply = openai_client(proxy).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}])
    assert reply.choices[0].message.content == "ok"


def last_chat(upstream: Upstream) -> Recorded:
    requests = upstream.chat_requests()
    assert requests, "the upstream received no chat request"
    return requests[-1]


def context_of(record: Recorded) -> tuple[str, str]:
    """(snapshot text, diff text) of an injected upstream request, checking both are system messages."""
    messages = record.json()["messages"]
    assert messages[0]["role"] == "system"
    assert messages[1]["role"] == "system"
    return messages[0]["content"], messages[1]["content"]


def assert_envelope(body: bytes, status: int, actual_status: int, param: str | None = None) -> dict[str, Any]:
    assert actual_status == status, body
    payload = json.loads(body)
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert isinstance(error["code"], str)
    assert error["param"] == param
    return dict(error)


# --- one proxy shared by the read-only tests -----------------------------------------------------


@dataclass
class Shared:
    repo: Repo
    upstream: Upstream
    proxy: Proxy

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai_client(self.proxy, **kwargs)


@pytest.fixture(scope="module")
def shared_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("shared")
    repo = Repo.create(root / "repo", SHARED_FILES)
    repo.write(SHARED_EDIT)
    with (
        run_upstream() as upstream,
        run_proxy(upstream.url, root / "proxy", {"GIT_REPO_PATH": str(repo.path)}) as proxy,
    ):
        yield Shared(repo, upstream, proxy)


@pytest.fixture
def shared(shared_setup: Shared) -> Shared:
    shared_setup.upstream.recorded.clear()
    shared_setup.upstream.server.behaviour = UpstreamBehaviour()
    return shared_setup


# --- the rewrite -----------------------------------------------------------------------------------


def test_messages_are_snapshot_then_diff_then_client_messages_with_other_fields_kept(shared: Shared) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    client_messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What does app.py print?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": [{"type": "text", "text": "and now? ünïcode ✓"}]},
    ]
    reply = shared.client().chat.completions.create(
        model=MODEL,
        messages=client_messages,
        temperature=0.25,
        max_tokens=64,
        seed=7,
        tools=tools,
        tool_choice="auto",
        extra_body={"top_k": 5, "cache_prompt": True},
    )
    assert reply.choices[0].message.content == "ok"

    sent = last_chat(shared.upstream).json()
    messages = sent.pop("messages")
    assert sent == {
        "model": MODEL,
        "temperature": 0.25,
        "max_tokens": 64,
        "seed": 7,
        "tools": tools,
        "tool_choice": "auto",
        "top_k": 5,
        "cache_prompt": True,
    }
    assert len(messages) == 2 + len(client_messages)
    snapshot, diff = messages[0]["content"], messages[1]["content"]
    assert set(messages[0]) == {"role", "content"} == set(messages[1])
    assert "<file path=\"src/app.py\">\nprint('hello')\n</file>" in snapshot  # HEAD's content
    assert '<file path="docs/naïve guide.md">\nÜnïcödé text\n</file>' in snapshot
    assert "diff --git a/src/app.py b/src/app.py" in diff
    assert "-print('hello')\n+print('hello, world')" in diff
    assert messages[2:] == client_messages

    # The same through a streaming request: stream and stream_options reach the upstream.
    stream = shared.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream it"}],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "part0 part1 part2 "
    streamed = last_chat(shared.upstream).json()
    assert streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True}
    assert streamed["temperature"] == 0
    assert [m["content"] for m in streamed["messages"]] == [snapshot, diff, "stream it"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages":[]}',
        b'{"messages": [] }',
        b'{ "model": "llama-4-scout", "messages" : [ ], "temperature": 0.5 }',
        b'{"messages":[],"model":"llama-4-scout"}',
    ],
)
def test_empty_messages_array_gets_just_the_context(shared: Shared, body: bytes) -> None:
    result = shared.proxy.post(CHAT, body)

    assert result.status == 200, result.body
    record = last_chat(shared.upstream)
    sent = json.loads(record.body)  # valid JSON: no dangling comma
    messages = sent.pop("messages")
    assert [m["role"] for m in messages] == ["system", "system"]
    assert len(record.raw_messages()) == 2
    expected = json.loads(body)
    del expected["messages"]
    assert sent == expected
    assert int(record.headers["content-length"]) == len(record.body)


def test_snapshot_and_diff_bytes_are_identical_across_requests(shared: Shared) -> None:
    client = shared.client()
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one"}])
    client.chat.completions.create(
        model="other-model", messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "two"}]
    )
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "3"}], stream=True))
    shared.proxy.post(CHAT, b'{"messages":[{"role":"user","content":"four"}],"n":1}')
    shared.proxy.post(CHAT, b'{"messages":[]}')

    records = shared.upstream.chat_requests()
    assert len(records) == 5
    raw = [r.raw_messages() for r in records]
    assert len({r[0] for r in raw}) == 1, "the snapshot message changed between requests"
    assert len({r[1] for r in raw}) == 1, "the diff message changed between requests"
    snapshot_raw = raw[0][0]
    assert json.loads(snapshot_raw)["content"] == records[0].json()["messages"][0]["content"]

    health = shared.proxy.get("/health").json()
    assert health["snapshot"]["bytes"] == len(snapshot_raw)
    assert health["snapshot"]["files"] == SHARED_INCLUDED_FILES
    assert health["diff"]["bytes"] == len(raw[0][1])


def test_snapshot_is_identical_across_proxy_processes_and_clones(shared: Shared, start_proxy, tmp_path: Path) -> None:
    ask(shared.proxy)
    first = last_chat(shared.upstream).raw_messages()

    second_proxy = start_proxy(shared.upstream.url, {"GIT_REPO_PATH": str(shared.repo.path)})
    ask(second_proxy, "from another process")
    second = last_chat(shared.upstream).raw_messages()

    clone = shared.repo.clone(tmp_path / "elsewhere" / "clone")
    assert clone.head() == shared.repo.head()
    clone.write(SHARED_EDIT)  # the same uncommitted edit
    clone_proxy = start_proxy(shared.upstream.url, {"GIT_REPO_PATH": str(clone.path)})
    ask(clone_proxy, "from a clone")
    cloned = last_chat(shared.upstream).raw_messages()

    assert second[0] == first[0]
    assert cloned[0] == first[0]
    # The diff holds no absolute path either: the same edit gives the same bytes.
    assert second[1] == first[1]
    assert cloned[1] == first[1]
    assert str(shared.repo.path) not in first[0].decode()


def test_default_exclusions_and_binary_files_stay_out_of_the_snapshot(shared: Shared) -> None:
    ask(shared.proxy)
    snapshot, _ = context_of(last_chat(shared.upstream))
    assert "do-not-send" not in snapshot
    assert '<file path=".env">' not in snapshot
    assert "files excluded by path pattern (1):\n  .env\n" in snapshot
    assert "binary files, not included (1):\n  assets/logo.bin (7 bytes)\n" in snapshot
    assert f"commit: {shared.repo.head()}\n" in snapshot


@pytest.mark.parametrize("content_encoding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_request_body_is_decoded_and_injected(shared: Shared, content_encoding: str) -> None:
    plain = chat_body("zipped question", temperature=0.1)
    compressed = gzip.compress(plain) if content_encoding == "gzip" else encoding.encode(plain, content_encoding)
    result = shared.proxy.post(CHAT, compressed, {"content-encoding": content_encoding})

    assert result.status == 200, result.body
    record = last_chat(shared.upstream)
    assert "content-encoding" not in record.headers
    assert int(record.headers["content-length"]) == len(record.body)
    sent = record.json()
    assert sent["temperature"] == 0.1
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert sent["messages"][2] == {"role": "user", "content": "zipped question"}


def test_a_body_that_does_not_decode_is_a_400(shared: Shared) -> None:
    result = shared.proxy.post(CHAT, b"not gzip at all", {"content-encoding": "gzip"})

    error = assert_envelope(result.body, 400, result.status)
    assert "not valid gzip data" in error["message"], error  # not "the request body is empty"
    assert shared.upstream.recorded == []


def test_chunked_request_body_is_injected(shared: Shared) -> None:
    plain = chat_body("sent in chunks")
    parts = iter([plain[:10], plain[10:25], plain[25:]])
    result = http_request("POST", shared.proxy.base_url + CHAT, parts, JSON)  # type: ignore[arg-type]

    assert result.status == 200, result.body
    sent = last_chat(shared.upstream).json()
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert sent["messages"][2]["content"] == "sent in chunks"


def test_concurrent_requests_share_one_snapshot(shared: Shared) -> None:
    builds_before = shared.proxy.get("/health").json()["snapshot_builds"]

    def one(index: int) -> str | None:
        reply = shared.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{index}"}]
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(one, range(16)))

    assert replies == ["ok"] * 16
    records = shared.upstream.chat_requests()
    assert sorted(r.json()["messages"][2]["content"] for r in records) == sorted(f"q{i}" for i in range(16))
    assert len({r.raw_messages()[0] for r in records}) == 1
    assert len({r.raw_messages()[1] for r in records}) == 1
    assert shared.proxy.get("/health").json()["snapshot_builds"] == builds_before


def test_upstream_errors_reach_the_client_unchanged(shared: Shared) -> None:
    shared.upstream.behaviour.status = 503
    shared.upstream.behaviour.error_body = b'{"error": {"message": "model is loading", "type": "overloaded"}}'

    result = shared.proxy.post(CHAT, chat_body())

    assert result.status == 503
    assert result.body == shared.upstream.behaviour.error_body
    with pytest.raises(openai.InternalServerError) as caught:
        shared.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert "model is loading" in caught.value.message


# --- errors answered by the proxy ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(b'{"messages": [', None, id="bad-json"),
        pytest.param(b"", None, id="empty-body"),
        pytest.param(b"\xff\xfe{}", None, id="not-utf8"),
        pytest.param(b'[{"role": "user", "content": "hi"}]', None, id="array-body"),
        pytest.param(b'"just a string"', None, id="string-body"),
        pytest.param(b'{"model": "llama-4-scout"}', "messages", id="missing-messages"),
        pytest.param(b'{"messages": {"role": "user", "content": "hi"}}', "messages", id="messages-object"),
        pytest.param(b'{"messages": "hi"}', "messages", id="messages-string"),
        pytest.param(b'{"messages": ["hi"]}', "messages[0]", id="message-not-object"),
        pytest.param(b'{"messages": [{"content": "hi"}]}', "messages[0].role", id="no-role"),
        pytest.param(b'{"messages": [{"role": "", "content": "hi"}]}', "messages[0].role", id="empty-role"),
        pytest.param(
            b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]}',
            "messages[1].content",
            id="content-number",
        ),
        pytest.param(
            b'{"messages": [{"role": "user", "content": {"text": "hi"}}]}', "messages[0].content", id="content-object"
        ),
        pytest.param(b'{"messages": [], "stream": "yes"}', "stream", id="stream-string"),
    ],
)
def test_invalid_chat_request_is_answered_400_and_not_forwarded(shared: Shared, body: bytes, param: str | None) -> None:
    result = shared.proxy.post(CHAT, body)

    error = assert_envelope(result.body, 400, result.status, param)
    assert error["type"] == "invalid_request_error"
    assert result.headers["content-type"] == "application/json"
    assert shared.upstream.recorded == []


def test_openai_client_gets_a_bad_request_error(shared: Shared) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        shared.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": 42}],  # type: ignore[list-item]
        )
    assert caught.value.status_code == 400
    assert caught.value.param == "messages[0].content"
    assert caught.value.type == "invalid_request_error"
    assert shared.upstream.recorded == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_non_json_content_type_is_415_and_not_forwarded(shared: Shared, content_type: str) -> None:
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    result = shared.proxy.request("POST", CHAT, body, {"content-type": content_type})

    error = assert_envelope(result.body, 415, result.status)
    assert error["code"] == "unsupported_media_type"
    assert content_type in error["message"]
    assert shared.upstream.recorded == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_on_chat_completions_get_405(shared: Shared, method: str) -> None:
    result = shared.proxy.request(method, CHAT)

    error = assert_envelope(result.body, 405, result.status)
    assert error["type"] == "invalid_request_error"
    assert "POST" in error["message"]
    assert result.headers["allow"] == "POST, OPTIONS"
    assert shared.upstream.recorded == []


def test_a_cors_preflight_from_a_page_not_allowed_is_refused_not_forwarded(shared: Shared) -> None:
    """It went to the upstream, whose 'access-control-allow-origin: *' let any page read the answers (issue 10)."""
    headers = {"origin": "http://localhost:3000", "access-control-request-method": "POST"}
    result = shared.proxy.request("OPTIONS", CHAT, headers=headers)

    assert result.status == 403
    assert result.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in result.headers
    assert shared.upstream.recorded == []


# --- local endpoints ---------------------------------------------------------------------------------


def test_health_is_answered_locally(shared: Shared) -> None:
    result = shared.proxy.get("/health")

    assert result.status == 200
    assert result.headers["content-type"] == "application/json"
    health = result.json()
    assert health["status"] == "ok"
    assert Path(health["repo"]) == shared.repo.path.resolve()
    assert health["head"] == shared.repo.head()
    assert health["snapshot"]["commit"] == shared.repo.head()
    assert health["snapshot"]["files"] == SHARED_INCLUDED_FILES
    assert health["snapshot"]["bytes"] > 0
    assert health["diff"]["files"] == 1
    assert health["inject_context"] is True
    assert shared.upstream.recorded == []


def test_models_are_answered_locally(shared: Shared) -> None:
    client = shared.client()

    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-unknown")
    assert caught.value.code == "model_not_found"
    result = shared.proxy.get("/v1/models/gpt-unknown")
    error = assert_envelope(result.body, 404, result.status, "model")
    assert "gpt-unknown" in error["message"]
    assert shared.upstream.recorded == []


# --- streaming -----------------------------------------------------------------------------------------


def test_sse_first_chunk_reaches_the_client_before_the_upstream_sends_the_rest(shared: Shared) -> None:
    gate = threading.Event()
    shared.upstream.behaviour.stream_gate = gate
    shared.upstream.behaviour.stream_chunks = 4
    # The upstream holds the rest for up to 20 s; a proxy that buffered would time this client out.
    client = shared.client(timeout=8)
    try:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "stream"}], stream=True
        )
        chunks = iter(stream)
        first = next(chunks)
        assert not gate.is_set()
        assert first.choices[0].delta.content == "part0 "
        gate.set()
        rest = [c.choices[0].delta.content for c in chunks]
    finally:
        gate.set()

    assert rest == ["part1 ", "part2 ", "part3 "]
    sent = last_chat(shared.upstream).json()
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]


def test_sse_stream_is_passed_through_byte_for_byte(shared: Shared) -> None:
    result = shared.proxy.post(CHAT, chat_body("raw stream", stream=True))

    assert result.status == 200
    assert result.headers["content-type"] == "text/event-stream"
    events = result.body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    assert [json.loads(e.removeprefix(b"data: "))["choices"][0]["delta"]["content"] for e in events[:-2]] == [
        "part0 ",
        "part1 ",
        "part2 ",
    ]


# --- pass-through ----------------------------------------------------------------------------------


def test_other_paths_pass_through_untouched(shared: Shared) -> None:
    body = b'{ "input" : ["caf\\u00e9", "\xc3\xa9"],\n  "model":"embed", "messages": [] }'
    result = shared.proxy.post("/v1/embeddings", body, {"authorization": "Bearer client-key"})
    assert result.status == 200

    other = shared.proxy.get("/v1/other?x=1&y=%20")
    assert other.json() == {"upstream": True, "path": "/v1/other?x=1&y=%20"}
    trailing = shared.proxy.post(CHAT + "/extra", b"not json")
    assert trailing.status == 200

    embed, get_other, post_extra = shared.upstream.recorded
    assert (embed.method, embed.path, embed.body) == ("POST", "/v1/embeddings", body)
    assert embed.headers["authorization"] == "Bearer client-key"
    assert (get_other.method, get_other.path, get_other.body) == ("GET", "/v1/other?x=1&y=%20", b"")
    assert (post_extra.path, post_extra.body) == (CHAT + "/extra", b"not json")


# --- proxies of their own ------------------------------------------------------------------------------


def test_diff_follows_edits_untracked_files_and_commits(make_repo, upstream: Upstream, start_proxy) -> None:
    repo: Repo = make_repo({"src/app.py": "VERSION = 1\n", "README.md": "# demo\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    first_commit = repo.head()

    ask(proxy)
    snapshot, diff = context_of(last_chat(upstream))
    assert diff == f"The working tree is clean: no uncommitted changes against commit {first_commit}.\n"
    first_snapshot_raw = last_chat(upstream).raw_messages()[0]

    # An edit shows within a quarter of a second.
    repo.write({"src/app.py": "VERSION = 2\n"})
    time.sleep(0.25)
    ask(proxy)
    _, diff = context_of(last_chat(upstream))
    assert "diff --git a/src/app.py b/src/app.py\n" in diff
    assert "-VERSION = 1\n+VERSION = 2\n" in diff
    assert last_chat(upstream).raw_messages()[0] == first_snapshot_raw

    # A second edit replaces the first.
    repo.write({"src/app.py": "VERSION = 3\n"})
    time.sleep(0.25)
    ask(proxy)
    _, diff = context_of(last_chat(upstream))
    assert "+VERSION = 3\n" in diff
    assert "VERSION = 2" not in diff

    # An untracked file is a new-file patch, exactly as git writes it.
    repo.write({"notes/new file.txt": "first line\nsecond line\n"})
    time.sleep(0.25)
    ask(proxy)
    _, diff = context_of(last_chat(upstream))
    expected = repo.git("diff", "--no-index", "--full-index", "--", "/dev/null", "notes/new file.txt", check=False)
    assert expected.startswith("diff --git a/notes/new file.txt b/notes/new file.txt\nnew file mode 100644\n")
    assert expected in diff
    assert "+VERSION = 3\n" in diff

    # After a commit the snapshot is the new commit and the diff is clean.
    new_commit = repo.commit_all("second")
    time.sleep(0.25)
    ask(proxy)
    snapshot, diff = context_of(last_chat(upstream))
    assert f"commit: {new_commit}\n" in snapshot
    assert '<file path="src/app.py">\nVERSION = 3\n</file>' in snapshot
    assert '<file path="notes/new file.txt">\nfirst line\nsecond line\n</file>' in snapshot
    assert diff == f"The working tree is clean: no uncommitted changes against commit {new_commit}.\n"
    health = proxy.get("/health").json()
    assert health["head"] == new_commit
    assert health["snapshot_builds"] == 2

    # A deleted file is a deletion patch against the new commit.
    (repo.path / "README.md").unlink()
    time.sleep(0.25)
    ask(proxy)
    _, diff = context_of(last_chat(upstream))
    assert "diff --git a/README.md b/README.md\ndeleted file mode 100644\n" in diff
    assert "-# demo\n" in diff


def test_serving_many_requests_leaves_dot_git_untouched(make_repo, upstream: Upstream, start_proxy) -> None:
    repo: Repo = make_repo({"a.txt": "a\n", "b.txt": "b\n", "dir/c.txt": "c\n"})
    repo.write({"a.txt": "a changed\n", "untracked.txt": "new\n"})
    time.sleep(0.05)
    (repo.path / "b.txt").write_text("b\n")  # same content, newer mtime: stat-dirty in the index
    before = repo.git_dir_fingerprint()

    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    client = openai_client(proxy)
    for index in range(20):
        if index % 5 == 0:
            repo.write({"a.txt": f"a changed {index}\n"})
            time.sleep(0.15)
        if index % 2:
            list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "s"}], stream=True))
        else:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": str(index)}])
    assert proxy.get("/health").status == 200

    assert len(upstream.chat_requests()) == 20
    _, diff = context_of(last_chat(upstream))
    assert "+a changed 15\n" in diff
    assert "b.txt" not in diff
    assert repo.git_dir_fingerprint() == before


def test_exclusions_and_limits_from_the_environment(make_repo, upstream: Upstream, start_proxy) -> None:
    repo: Repo = make_repo(
        {
            "a.py": "x = 1\n",
            "b.py": "y = 1\n",
            "big.py": "# " + "b" * 400 + "\n",
            "secret/token.txt": "hunter2\n",
            "build.log": "log line\n",
            "keep.log": "kept by a re-include\n",
            "package-lock.json": "{}\n",
            "zz_last.txt": "z" * 250 + "\n",
        }
    )
    repo.write(
        {
            "a.py": "x = 2\n",
            "b.py": "y = 2\n",
            "secret/token.txt": "hunter3\n",
            "debug.log": "new log\n",
            "a_huge_new.py": "#" * 500 + "\n",
        }
    )
    env = {
        "GIT_REPO_PATH": str(repo.path),
        "EXCLUDE_PATH_PATTERNS": "secret/, *.log ,!keep.log",
        "MAX_FILE_BYTES": "300",
        "MAX_SNAPSHOT_BYTES": "250",
        "MAX_DIFF_BYTES": "250",
        "USE_DEFAULT_EXCLUDES": "false",
        "UPSTREAM_MODEL": "served-model",
    }
    proxy = start_proxy(upstream.url, env)

    ask(proxy)
    record = last_chat(upstream)
    assert record.json()["model"] == "served-model"
    snapshot, diff = context_of(record)

    assert "hunter" not in snapshot
    assert "log line" not in snapshot
    assert '<file path="keep.log">\nkept by a re-include\n</file>' in snapshot
    assert '<file path="package-lock.json">\n{}\n</file>' in snapshot  # defaults are off
    assert "files excluded by path pattern (2):\n  build.log\n  secret/token.txt\n" in snapshot
    assert "files over the per-file limit of 300 bytes, not included (1):\n  big.py (403 bytes)\n" in snapshot
    assert "bbbb" not in snapshot
    assert "reached its limit of 250 bytes" in snapshot
    assert "  zz_last.txt (251 bytes)\n" in snapshot
    assert "zzzz" not in snapshot

    assert "hunter" not in diff
    assert "new log" not in diff
    assert "changed files excluded by path pattern (2):\n  debug.log\n  secret/token.txt\n" in diff
    assert "changed files over the per-file limit of 300 bytes (1):\n  a_huge_new.py\n" in diff
    assert "####" not in diff
    assert "+x = 2\n" in diff  # a.py fits in 250 bytes, b.py does not
    assert "+y = 2" not in diff
    assert "diff reached its limit of 250 bytes" in diff
    assert "  b.py\n" in diff

    health = proxy.get("/health").json()
    assert health["snapshot"]["left_out"] == 4
    assert health["diff"]["left_out"] == 4


def test_git_failure_is_a_500_envelope_and_recovers(make_repo, upstream: Upstream, start_proxy, tmp_path) -> None:
    repo: Repo = make_repo({"a.txt": "a\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    ask(proxy)

    moved = tmp_path / "git-moved-away"
    (repo.path / ".git").rename(moved)
    try:
        # watchdog holds a move out of the watched tree for 0.5 s (waiting for a matching move in).
        time.sleep(0.8)
        result = proxy.post(CHAT, chat_body())
        error = assert_envelope(result.body, 500, result.status)
        assert error["type"] == "server_error"
        assert error["code"] == "git_error"
        assert "git" in error["message"]
        assert len(upstream.chat_requests()) == 1

        health = proxy.get("/health")
        assert health.status == 503
        assert health.json()["status"] == "error"
        assert "git" in health.json()["error"]
        assert len(upstream.recorded) == 1
    finally:
        moved.rename(repo.path / ".git")

    time.sleep(0.25)
    ask(proxy)
    assert len(upstream.chat_requests()) == 2


def test_repository_moved_away_and_back_is_a_500_then_recovers(
    make_repo, upstream: Upstream, start_proxy, tmp_path
) -> None:
    repo: Repo = make_repo({"a.txt": "a\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    ask(proxy)

    elsewhere = tmp_path / "moved-work-tree"
    repo.path.rename(elsewhere)
    try:
        time.sleep(0.8)  # a move out of the watched tree reaches watchdog after 0.5 s
        result = proxy.post(CHAT, chat_body())
        error = assert_envelope(result.body, 500, result.status)
        assert error["code"] == "git_error"
        assert "no longer exists" in error["message"]
        assert len(upstream.chat_requests()) == 1
    finally:
        elsewhere.rename(repo.path)

    time.sleep(0.25)
    repo.write({"a.txt": "after the move\n"})
    time.sleep(0.25)
    ask(proxy)
    assert len(upstream.chat_requests()) == 2
    assert "+after the move" in upstream.chat_requests()[-1].json()["messages"][1]["content"]


def test_deleted_repository_is_a_500_envelope(make_repo, upstream: Upstream, start_proxy) -> None:
    repo: Repo = make_repo({"a.txt": "a\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    ask(proxy)

    shutil.rmtree(repo.path)
    time.sleep(0.25)
    result = proxy.post(CHAT, chat_body())

    error = assert_envelope(result.body, 500, result.status)
    assert error["code"] == "git_error"
    assert "git" in error["message"]
    assert str(repo.path) in error["message"]
    assert len(upstream.chat_requests()) == 1
    assert proxy.process.poll() is None


def test_local_endpoints_work_while_the_upstream_is_down(make_repo, start_proxy) -> None:
    repo: Repo = make_repo({"a.txt": "a\n"})
    key = "sk-upstream-secret-down-0123456789"
    closed = f"http://127.0.0.1:{free_port()}"
    model_id = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    env = {"GIT_REPO_PATH": str(repo.path), "MODEL_ID": model_id, "TARGET_API_KEY": key}
    proxy = start_proxy(closed, env, ("--set", "flow_detail=3"))
    client = openai_client(proxy)

    health = proxy.get("/health")
    assert health.status == 200
    assert health.json()["head"] == repo.head()
    assert health.json()["model"] == model_id
    assert [m.id for m in client.models.list()] == [model_id]
    assert client.models.retrieve(model_id).id == model_id  # sent as meta-llama%2FLlama-4-...
    assert proxy.get("/v1/models/" + model_id).json()["id"] == model_id
    missing = proxy.get("/v1/models/llama-4-scout")
    assert_envelope(missing.body, 404, missing.status, "model")

    # A chat request is prepared, then fails upstream; the proxy keeps answering afterwards.
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "upstream_unavailable"
    assert "Connection refused" in error["message"]
    assert proxy.get("/health").status == 200
    assert proxy.process.poll() is None
    assert key not in proxy.log()


def test_inject_context_false_is_a_byte_identical_pass_through(make_repo, upstream: Upstream, start_proxy) -> None:
    repo: Repo = make_repo({"a.txt": "a\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "INJECT_CONTEXT": "false"})
    body = b'{ "model" : "x",\n "messages":[{"role":"user","content":"caf\\u00e9 \xc3\xa9"}] , "temperature": 1e0 }'

    assert proxy.post(CHAT, body, {"authorization": "Bearer client-key"}).status == 200
    assert proxy.post(CHAT, b'{"messages": [').status == 200  # not validated either
    zipped = gzip.compress(body)
    assert proxy.post(CHAT, zipped, {"content-encoding": "gzip"}).status == 200
    models = proxy.get("/v1/models")
    assert models.json() == {"upstream": True, "path": "/v1/models"}
    assert proxy.get("/v1/models/anything").json()["upstream"] is True
    assert proxy.get(CHAT).json()["upstream"] is True
    health = proxy.get("/health").json()
    assert health["inject_context"] is False

    chat, broken, zipped_chat, list_models, one_model, get_chat = upstream.recorded
    assert (chat.path, chat.body) == (CHAT, body)
    assert chat.headers["authorization"] == "Bearer client-key"
    assert broken.body == b'{"messages": ['
    assert zipped_chat.body == zipped
    assert zipped_chat.headers["content-encoding"] == "gzip"
    assert (list_models.method, list_models.path) == ("GET", "/v1/models")
    assert one_model.path == "/v1/models/anything"
    assert (get_chat.method, get_chat.path) == ("GET", CHAT)


@pytest.mark.parametrize("flow_detail", [None, "2", "3", "4"])
def test_target_api_key_replaces_the_clients_and_never_reaches_the_log(
    make_repo, upstream: Upstream, start_proxy, flow_detail: str | None
) -> None:
    repo: Repo = make_repo({"a.txt": "a\n"})
    key = "sk-upstream-secret-0123456789abcdef"
    extra = ("--set", f"flow_detail={flow_detail}") if flow_detail else ()
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "TARGET_API_KEY": key}, extra)
    client = openai_client(proxy, api_key="client-key")

    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "s"}], stream=True))
    proxy.post("/v1/embeddings", b'{"input": "x"}', {"authorization": "Bearer client-key"})
    upstream.behaviour.status = 429
    upstream.behaviour.error_body = b'{"error": {"message": "slow down"}}'
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}])
    assert proxy.post(CHAT, b"{bad", {"authorization": "Bearer client-key"}).status == 400

    assert len(upstream.recorded) == 4
    for record in upstream.recorded:
        assert record.headers["authorization"] == f"Bearer {key}", record.path
    assert "client-key" not in json.dumps([r.headers for r in upstream.recorded])
    time.sleep(0.2)  # let mitmdump write the last flow
    log = proxy.log()
    assert key not in log
    if flow_detail in ("2", "3", "4"):
        assert "Bearer [TARGET_API_KEY]" in log  # headers are printed, masked


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(({"MAX_FILE_BYTES": "abc"}, (), "MAX_FILE_BYTES"), id="max-file-bytes-abc"),
        pytest.param(({"MAX_DIFF_BYTES": "0"}, (), "MAX_DIFF_BYTES"), id="max-diff-bytes-zero"),
        pytest.param(({"GIT_REPO_PATH": "{not_a_repo}"}, (), "git_repo_path"), id="not-a-repo"),
        pytest.param(({"GIT_REPO_PATH": "{missing}"}, (), "git_repo_path"), id="missing-dir"),
        pytest.param(({}, ("--set", "scout_inject_context=maybe"), "scout_inject_context"), id="inject-maybe"),
        pytest.param(({}, ("--set", "scout_max_file_bytes=abc"), "scout_max_file_bytes"), id="option-not-a-number"),
        pytest.param(({"TARGET_API_KEY": "has space"}, (), "TARGET_API_KEY"), id="key-with-space"),
    ],
)
def test_bad_setting_stops_mitmdump_at_start(
    make_repo, upstream: Upstream, start_proxy, tmp_path: Path, case: tuple[dict[str, str], tuple[str, ...], str]
) -> None:
    env, args, named = case
    repo: Repo = make_repo({"a.txt": "a\n"})
    not_a_repo = tmp_path / "plain-dir"
    not_a_repo.mkdir()
    values = {"not_a_repo": not_a_repo, "missing": tmp_path / "missing"}
    full_env = {"GIT_REPO_PATH": str(repo.path), **{k: v.format(**values) for k, v in env.items()}}

    proxy = start_proxy(upstream.url, full_env, args, wait=False)

    assert proxy.wait_exit() != 0
    log = proxy.log()
    assert named in log
    assert "has space" not in log  # a rejected key is not echoed either


# --- replays ---------------------------------------------------------------------------------------


async def test_a_replayed_flow_gets_its_context_once(
    make_repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CLEARED_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    repo: Repo = make_repo({"a.txt": "a\n"})
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    addon = ScoutAddons()

    with taddons.context(addon) as tctx:
        # tflow points at an unreachable "address:22": no reachability probe in-process
        tctx.configure(
            addon,
            scout_config=str(config),
            scout_git_repo_path=str(repo.path),
            scout_upstream_connect_timeout_ms="0",
        )
        try:
            flow = tflow.tflow(
                req=tutils.treq(method=b"POST", path=CHAT.encode(), content=chat_body("once")), resp=False
            )
            await addon.send_request(flow)
            assert flow.response is None
            injected = flow.request.content
            assert injected is not None
            assert [m["role"] for m in json.loads(injected)["messages"]] == ["system", "system", "user"]
            assert METADATA_KEY in flow.metadata

            # What client replay does: same flow, response cleared, is_replay set, request hook again.
            flow.is_replay = "request"
            await addon.send_request(flow)
            assert flow.request.content == injected

            # A copy (as mitmweb's duplicate, or a flow read back from a file) keeps the metadata.
            copy = flow.copy()
            copy.is_replay = "request"
            await addon.send_request(copy)
            assert copy.request.content == injected

            # A replayed flow that was never injected here gets its context once.
            fresh = tflow.tflow(
                req=tutils.treq(method=b"POST", path=CHAT.encode(), content=chat_body("fresh")), resp=False
            )
            fresh.is_replay = "request"
            await addon.send_request(fresh)
            assert fresh.request.content is not None
            assert len(json.loads(fresh.request.content)["messages"]) == 3
        finally:
            addon.stop()


async def test_a_replayed_trimmed_flow_gets_fresh_context_never_the_placeholder(make_repo, addon: ScoutAddons) -> None:
    repo: Repo = make_repo({"a.txt": "a\n"})
    store = View()  # mitmweb's flow store: trimming only happens where flows are kept
    with taddons.context(addon, store) as tctx:
        tctx.configure(
            addon,
            scout_git_repo_path=str(repo.path),
            scout_upstream_connect_timeout_ms="0",
            scout_keep_full_bodies="0",
        )
        flow = tflow.tflow(req=tutils.treq(method=b"POST", path=CHAT.encode(), content=chat_body("q")), resp=False)
        await addon.send_request(flow)
        sent = flow.request.content
        assert sent is not None
        store.add([flow])
        flow.response = tutils.tresp(content=b'{"choices": []}')
        await addon.send_response(flow)
        trimmed = flow.request.raw_content
        assert trimmed is not None and TRIMMED_SNAPSHOT_PREFIX.encode() in trimmed and len(trimmed) < len(sent)

        flow.response = None
        flow.is_replay = "request"
        await addon.send_request(flow)
        assert flow.response is None
        assert flow.request.content == sent  # same repository state: the very body sent the first time
        assert flow.request.headers["content-length"] == str(len(sent))

        # The question edited after the trim (mitmweb's editor): sent with it, context afresh.
        flow.response = tutils.tresp()
        await addon.send_response(flow)
        flow.request.raw_content = (flow.request.raw_content or b"").replace(b'"q"', b'"edited question"')
        flow.response = None
        await addon.send_request(flow)
        assert flow.response is None
        replayed = json.loads(flow.request.content or b"")
        assert replayed["messages"][0] == json.loads(sent)["messages"][0]
        assert replayed["messages"][2] == {"role": "user", "content": "edited question"}

        # The placeholder itself edited: the context can no longer be told apart; refused, never sent.
        flow.response = tutils.tresp()
        await addon.send_response(flow)
        flow.request.raw_content = (flow.request.raw_content or b"").replace(b"[scout-diff-cache", b"[edited")
        flow.response = None
        await addon.send_request(flow)
        assert flow.response is not None and flow.response.status_code == 400
        assert b"trimmed_flow_edited" in (flow.response.content or b"")


def test_client_replay_of_a_saved_flow_sends_the_same_body_when_nothing_changed(
    make_repo, upstream: Upstream, start_proxy, tmp_path
) -> None:
    repo: Repo = make_repo({"a.txt": "a\n"})
    flows = tmp_path / "flows.mitm"
    env = {"GIT_REPO_PATH": str(repo.path)}
    proxy = start_proxy(upstream.url, env, ("--set", f"save_stream_file={flows}"))
    ask(proxy, "captured")
    proxy.process.terminate()
    assert proxy.wait_exit() is not None
    assert flows.stat().st_size > 0

    replayer = start_proxy(upstream.url, env, ("--no-server", "--set", f"client_replay={flows}"), wait=False)
    assert replayer.wait_exit() == 0, replayer.log()

    original, replayed = upstream.chat_requests()
    assert replayed.body == original.body
    assert len(replayed.json()["messages"]) == 3


def test_message_1_is_built_at_start_and_the_first_question_does_not_build_it_again(
    make_repo: Any, upstream: Upstream, start_proxy: Any
) -> None:
    repo = make_repo(SHARED_FILES)
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    deadline = time.monotonic() + 30
    while "ready" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"message 1 for {repo.head()[:7]} ready" in proxy.log()
    assert not upstream.chat_requests()  # built, not sent: nobody asked yet

    ask(proxy)

    log = proxy.log()
    assert log.count(f"snapshot {repo.head()[:7]} built") == 1
    assert log.index(f"snapshot {repo.head()[:7]} built") < log.index("ready") < log.index("chat 200")
    metrics = http_request("GET", proxy.base_url + "/metrics").body.decode()
    assert 'scout_snapshot_cache_lookups_total{result="miss"} 1.0' in metrics  # the build at start, only
