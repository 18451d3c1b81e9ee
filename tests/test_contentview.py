"""The "Scout chat" content view, through mitmproxy's own entry point (``contentviews.prettify_message``).

Request bodies are built by the real pipeline: a snapshot and a working diff of a real repository,
spliced by ``assemble_body``, with the spans the addon records in ``flow.metadata``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow

from scout_diff_cache.chat.errors import ApiError
from scout_diff_cache.chat.request import assemble_body, parse_chat_request
from scout_diff_cache.context.framing import TRIMMED_SNAPSHOT_PREFIX, system_message_json
from scout_diff_cache.context.history import History, HistoryLimits
from scout_diff_cache.context.snapshot import (
    PREAMBLE,
    SnapshotLimits,
    append_preamble,
    build_snapshot,
    with_history,
)
from scout_diff_cache.context.workdiff import DiffLimits, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.mitm.contentview import VIEW_NAME, ChatContentview
from scout_diff_cache.mitm.hooks import error_response
from scout_diff_cache.mitm.internals import remove_contentview
from scout_diff_cache.mitm.state import METADATA_KEY
from scout_diff_cache.view.request import SMALL_MESSAGE_BYTES, layout_from_spans
from scout_diff_cache.view.snapshot import SnapshotIndex
from support import Repo

MakeRepo = Callable[..., Repo]

CHAT_URL = "http://upstream.invalid:8000/v1/chat/completions"
SECRET_CONTENT = "only_inside_the_file_contents_0xC0FFEE"
CLIENT_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "Where is the parser?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "grep", "arguments": '{"q":"parse"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "src/parser.py:3: def parse(text):"},
    {"role": "user", "content": "And the tests?"},
]


# The view as the addon registers it; its index of snapshot regions stays empty unless a test fills it.
CHAT_VIEW = ChatContentview(SnapshotIndex())


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    """The view registered as the addon registers it, inside a mitmproxy context; removed after."""
    with taddons.context():
        contentviews.add(CHAT_VIEW)
        try:
            yield
        finally:
            remove_contentview(CHAT_VIEW)
    assert VIEW_NAME.lower() not in contentviews.registry


@dataclass
class ChatRequest:
    body: bytes
    metadata: dict[str, Any]
    commit: str


def limits(max_file_bytes: int = 1000, max_snapshot_bytes: int = 1 << 20) -> tuple[SnapshotLimits, DiffLimits]:
    path_filter = PathFilter.build((), True)
    return SnapshotLimits(max_file_bytes, max_snapshot_bytes, path_filter), DiffLimits(
        max_file_bytes, 1 << 20, path_filter
    )


def sample_repo(make_repo: MakeRepo) -> Repo:
    repo = make_repo(
        {
            "src/parser.py": "def parse(text):\n    return text\n",
            "src/ünïcode name.py": "x = 1\n",
            "docs/guide.md": f"# Guide\n{SECRET_CONTENT}\n",
            "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00binary",
            "data/huge.txt": "y" * 5000,
            "node_modules/dep/index.js": "module.exports = 1\n",
        }
    )
    (repo.path / "link").symlink_to("src/parser.py")
    repo.commit_all("with a link")
    repo.write({"src/parser.py": "def parse(text):\n    return text.split()\n", "notes.txt": "draft\n"})
    return repo


def build_request(repo: Repo, client: dict[str, Any], snapshot_limits: SnapshotLimits | None = None) -> ChatRequest:
    git_repo = GitRepo(str(repo.path))
    commit = git_repo.head_commit()
    default_snapshot_limits, diff_limits = limits()
    snapshot = build_snapshot(git_repo, commit, snapshot_limits or default_snapshot_limits)
    diff = build_working_diff(git_repo, commit, diff_limits)
    assembled = assemble_body(
        parse_chat_request(json.dumps(client).encode()), [snapshot.message_json, diff.message_json]
    )
    snapshot_span, diff_span = assembled.context_spans
    metadata = {
        "commit": snapshot.commit,
        "snapshot_bytes": snapshot.size,
        "snapshot_files": snapshot.file_count,
        "snapshot_span": snapshot_span,
        "diff_bytes": diff.size,
        "diff_span": diff_span,
    }
    return ChatRequest(assembled.body, metadata, commit or "")


def client_body(**fields: Any) -> dict[str, Any]:
    return {"model": "llama-4-scout", "stream": True, "max_tokens": 256, "messages": CLIENT_MESSAGES, **fields}


def chat_flow(
    body: bytes,
    metadata: dict[str, Any] | None = None,
    url: str = CHAT_URL,
    response: http.Response | None = None,
    comment: str = "",
) -> http.HTTPFlow:
    request = http.Request.make("POST", url, body, {"content-type": "application/json"})
    flow = tflow.tflow(req=request, resp=response or False)
    if metadata is not None:
        flow.metadata[METADATA_KEY] = metadata
    flow.comment = comment
    return flow


def shown(flow: http.HTTPFlow, message: http.Message) -> contentviews.ContentviewResult:
    return contentviews.prettify_message(message, flow)


def shown_request(flow: http.HTTPFlow) -> str:
    result = shown(flow, flow.request)
    assert result.view_name == VIEW_NAME, result.description
    return result.text


def shown_response(response: http.Response) -> str:
    flow = chat_flow(b'{"messages": []}', response=response)
    assert flow.response is not None
    result = shown(flow, flow.response)
    assert result.view_name == VIEW_NAME, result.description
    return result.text


def sse_response(events: list[str], line_end: str = "\n") -> http.Response:
    body = "".join(f"data: {event}{line_end}{line_end}" for event in events).encode()
    return http.Response.make(200, body, {"content-type": "text/event-stream; charset=utf-8"})


def chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None, **extra: Any) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return json.dumps(
        {"id": "chatcmpl-7", "object": "chat.completion.chunk", "model": "scout", "choices": choices, **extra}
    )


# --- which view is chosen ------------------------------------------------------------------------


def test_chosen_for_chat_requests_and_responses_over_json(make_repo: MakeRepo) -> None:
    request = build_request(sample_repo(make_repo), client_body())
    completion = http.Response.make(200, b'{"choices": []}', {"content-type": "application/json"})
    flow = chat_flow(request.body, request.metadata, response=completion)
    assert flow.response is not None
    assert shown(flow, flow.request).view_name == VIEW_NAME
    assert shown(flow, flow.response).view_name == VIEW_NAME
    assert "\nstreamed answer\n" in shown_response(sse_response([chunk({"content": "streamed answer"}), "[DONE]"]))


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "//v1//chat/completions?x=1"])
def test_chosen_for_the_chat_path_as_routes_normalise_it(path: str) -> None:
    flow = chat_flow(b'{"messages": []}', url=f"http://upstream.invalid{path}")
    assert shown(flow, flow.request).view_name == VIEW_NAME


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings", "/v1/chat/completions/extra", "/health"])
def test_not_chosen_for_other_paths(path: str) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    flow = chat_flow(body, url=f"http://upstream.invalid{path}")
    assert shown(flow, flow.request).view_name == "JSON"


def test_not_chosen_for_html_or_empty_bodies_on_the_chat_path() -> None:
    page = http.Response.make(502, b"<html><body>Bad Gateway</body></html>", {"content-type": "text/html"})
    flow = chat_flow(b'{"messages": []}', response=page)
    assert flow.response is not None
    assert shown(flow, flow.response).view_name != VIEW_NAME
    empty = chat_flow(b"")
    assert CHAT_VIEW.render_priority(b"", contentviews.Metadata(flow=empty, http_message=empty.request)) == 0


def test_unregistering_gives_chat_flows_back_to_the_json_view() -> None:
    flow = chat_flow(b'{"messages": []}')
    remove_contentview(CHAT_VIEW)
    assert VIEW_NAME.lower() not in contentviews.registry
    assert shown(flow, flow.request).view_name == "JSON"
    remove_contentview(CHAT_VIEW)  # a second call (e.g. done after a failed load) is harmless
    contentviews.add(CHAT_VIEW)
    assert shown(flow, flow.request).view_name == VIEW_NAME


# --- requests ------------------------------------------------------------------------------------


def test_request_summarises_the_snapshot_and_shows_diff_and_conversation(make_repo: MakeRepo) -> None:
    request = build_request(
        sample_repo(make_repo), client_body(stream_options={"include_usage": True}, temperature=0.2)
    )
    text = shown_request(chat_flow(request.body, request.metadata))

    assert "parsed in full" not in text
    assert f"commit: {request.commit}" in text
    assert "files: 3, symbolic links: 1," in text
    assert "left out: 3" in text
    assert "binary files, not included (1):\n    logo.png (16 bytes)" in text
    assert "files over the per-file limit of 1000 bytes, not included (1):\n    data/huge.txt (5000 bytes)" in text
    assert "files excluded by path pattern (1):\n    node_modules/dep/index.js" in text
    assert (
        "=== snapshot paths (4) ===\ndocs/guide.md\nlink -> src/parser.py\nsrc/parser.py\nsrc/ünïcode name.py" in text
    )
    assert SECRET_CONTENT not in text  # file contents are not shown
    # The diff, in full.
    assert "-    return text\n+    return text.split()" in text
    assert "+++ b/notes.txt\n@@ -0,0 +1 @@\n+draft" in text
    # Fields and the conversation.
    assert "model: llama-4-scout\nstream: true\nmax_tokens: 256\n" in text
    assert 'stream_options: {"include_usage": true}\ntemperature: 0.2' in text
    assert "7 messages: snapshot, working diff, 5 from the client" in text
    assert "=== messages[2] system ===\nAnswer briefly." in text
    assert "=== messages[3] user ===\nWhere is the parser?" in text
    assert '=== messages[4] assistant ===\ntool call call_1: grep({"q":"parse"})' in text
    assert "=== messages[5] tool · tool_call_id call_1 ===\nsrc/parser.py:3: def parse(text):" in text
    assert text.index("=== messages[6] user ===\nAnd the tests?") < text.index("=== snapshot paths")


def test_the_spans_path_is_taken_for_the_body_as_sent(make_repo: MakeRepo) -> None:
    request = build_request(sample_repo(make_repo), client_body())
    layout = layout_from_spans(request.body, request.metadata)
    assert layout is not None
    assert layout.conversation == CLIENT_MESSAGES
    assert layout.snapshot_bytes == request.metadata["snapshot_bytes"]
    assert layout.snapshot is not None
    assert layout.snapshot.buffer is request.body  # read in place: neither copied nor decoded


def test_a_large_context_message_in_another_encoding_is_parsed_in_full() -> None:
    text = PREAMBLE + '<file path="big.txt">\n' + "z" * SMALL_MESSAGE_BYTES + "\n</file>\n"
    compact = json.dumps({"role": "system", "content": text}, separators=(",", ":")).encode()
    diff = system_message_json("The working tree is clean.\n")
    assembled = assemble_body(parse_chat_request(json.dumps(client_body()).encode()), [compact, diff])
    snapshot_span, diff_span = assembled.context_spans
    metadata = {"snapshot_span": snapshot_span, "diff_span": diff_span}
    assert layout_from_spans(assembled.body, metadata) is None
    text = shown_request(chat_flow(assembled.body, metadata))
    assert "parsed in full" in text
    assert "=== snapshot paths (1) ===\nbig.txt\n" in text


def test_omitted_files_past_the_total_limit_and_an_unborn_head(make_repo: MakeRepo) -> None:
    repo = make_repo({f"f{i}.txt": f"{i}\n" * 20 for i in range(5)})
    snapshot_limits, _ = limits(max_snapshot_bytes=140)
    request = build_request(repo, client_body(), snapshot_limits)
    text = shown_request(chat_flow(request.body, request.metadata))
    assert "files: 2, symbolic links: 0," in text
    assert "(every file from this one on, in path order) (3):\n    f2.txt (40 bytes)\n    f3.txt" in text
    assert "=== snapshot paths (2) ===\nf0.txt\nf1.txt\n" in text

    unborn = build_request(make_repo(), client_body())
    text = shown_request(chat_flow(unborn.body, unborn.metadata))
    assert "commit: none (no commits yet)" in text
    assert "files: 0, symbolic links: 0, bytes of file blocks: 0" in text
    assert "The working tree is clean" in text


def test_a_file_line_that_looks_like_a_block_header_is_flagged(make_repo: MakeRepo) -> None:
    repo = make_repo(
        {
            "a.txt": 'line\n<file path="not/a/file">\n',
            "b.txt": 'an escaped newline, not a line start: \\n<file path="not/a/file">\n',
        }
    )
    request = build_request(repo, client_body())
    text = shown_request(chat_flow(request.body, request.metadata))
    assert "note: 3 block headers found in the text, the footer counts 2" in text
    assert "=== snapshot paths (3) ===\na.txt\nnot/a/file\nb.txt\n" in text


def test_flow_comment_is_the_first_line(make_repo: MakeRepo) -> None:
    request = build_request(sample_repo(make_repo), client_body())
    comment = "hit 99.8% · snap 1a2b3c4 · 41.7 MB · diff 3 KB"
    text = shown_request(chat_flow(request.body, request.metadata, comment=comment))
    assert text.splitlines()[0] == comment
    response = sse_response([chunk({"content": "ok"}), "[DONE]"])
    flow = chat_flow(request.body, request.metadata, response=response, comment=comment)
    assert shown(flow, response).text.splitlines()[0] == comment


def trimmed(request: ChatRequest, update_span: bool) -> ChatRequest:
    """The request as the proxy keeps it once the snapshot is trimmed from memory."""
    start, end = request.metadata["snapshot_span"]
    placeholder = system_message_json(f"{TRIMMED_SNAPSHOT_PREFIX} {request.commit[:7]} removed from memory]")
    body = request.body[:start] + placeholder + request.body[end:]
    metadata = {**request.metadata, "snapshot_trimmed": True}
    if update_span:
        shift = len(placeholder) - (end - start)
        diff_start, diff_end = request.metadata["diff_span"]
        metadata.update(
            snapshot_span=(start, start + len(placeholder)), diff_span=(diff_start + shift, diff_end + shift)
        )
    return ChatRequest(body, metadata, request.commit)


@pytest.mark.parametrize("update_span", [True, False])
def test_trimmed_snapshot_shows_its_placeholder_and_what_was_sent(make_repo: MakeRepo, update_span: bool) -> None:
    request = trimmed(build_request(sample_repo(make_repo), client_body()), update_span)
    text = shown_request(chat_flow(request.body, request.metadata))
    assert ("parsed in full" in text) is not update_span
    assert "=== messages[0] system · snapshot, trimmed from memory ===" in text
    assert f"{TRIMMED_SNAPSHOT_PREFIX} {request.commit[:7]} removed from memory]" in text
    assert f"as sent: commit {request.commit}, files: 3, bytes: {request.metadata['snapshot_bytes']}" in text
    assert "+    return text.split()" in text
    assert "=== messages[6] user ===\nAnd the tests?" in text
    assert "snapshot paths" not in text


def stale_metadata(request: ChatRequest) -> list[dict[str, Any]]:
    (start, end), (diff_start, diff_end) = request.metadata["snapshot_span"], request.metadata["diff_span"]
    client_system = b'{"role":"system","content":"Answer briefly."}'
    client_system_start = request.body.index(client_system)
    return [
        # Two whole system messages, but not the context ones: the body parses around them.
        {**request.metadata, "diff_span": (client_system_start, client_system_start + len(client_system))},
        {**request.metadata, "snapshot_span": (start + 1, end + 1)},
        {**request.metadata, "diff_span": (diff_start, diff_end - 1)},
        {**request.metadata, "snapshot_span": (diff_start, diff_end), "diff_span": (start, end)},
        {**request.metadata, "snapshot_span": (start, len(request.body) + 10)},
        {**request.metadata, "snapshot_span": (-5, end)},
        {**request.metadata, "snapshot_span": "0-10"},
        {**request.metadata, "diff_span": None},
    ]


def test_stale_or_invalid_spans_fall_back_to_a_full_parse(make_repo: MakeRepo) -> None:
    request = build_request(sample_repo(make_repo), client_body())
    for metadata in stale_metadata(request):
        text = shown_request(chat_flow(request.body, metadata))
        assert "no longer matches the context spans" in text, metadata
        assert f"commit: {request.commit}" in text
        assert "=== snapshot paths (4) ===" in text
        assert "+    return text.split()" in text
        assert "=== messages[6] user ===\nAnd the tests?" in text


def test_a_body_edited_in_mitmweb_is_parsed_in_full(make_repo: MakeRepo) -> None:
    request = build_request(sample_repo(make_repo), client_body())
    edited = json.loads(request.body)
    edited["messages"][-1]["content"] = "An edited question"
    edited["temperature"] = 0
    body = json.dumps(edited, indent=1).encode()  # everything moves
    text = shown_request(chat_flow(body, request.metadata))
    assert "parsed in full" in text
    assert "temperature: 0" in text
    assert "=== messages[6] user ===\nAn edited question" in text
    assert "files: 3, symbolic links: 1," in text


def test_a_request_the_proxy_did_not_rewrite_shows_its_messages() -> None:
    body = json.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {
                    "role": "user",
                    "name": "dev",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}},
                    ],
                },
            ],
        }
    ).encode()
    text = shown_request(chat_flow(body))
    assert "note: not rewritten by scout-diff-cache: no context added" in text
    assert "2 messages: 2 from the client" in text
    assert "=== messages[0] system ===\nYou are terse." in text
    assert "=== messages[1] user · name dev ===\nWhat is in this picture?\n[image: data:image/png;base64,AAA" in text
    assert "(5,022 characters)]" in text
    assert "A" * 1000 not in text


def test_tools_are_listed_with_the_llama4_template_note(make_repo: MakeRepo) -> None:
    tool = {"type": "function", "function": {"name": "grep", "parameters": {"type": "object"}}}
    request = build_request(sample_repo(make_repo), client_body(tools=[tool]))
    text = shown_request(chat_flow(request.body, request.metadata))
    assert "tools (1): grep\n  note: with tools, Llama 4's chat template" in text
    assert "prefix cache reuses it only for requests that carry exactly these tools" in text
    assert '  {"type": "function", "function": {"name": "grep", "parameters": {"type": "object"}}}' in text


@pytest.mark.parametrize("body", [b'{"messages": [', b"not json at all", b"[1, 2]", b"\xff\xfe{}"])
def test_malformed_requests_fall_back_to_the_raw_view(body: bytes) -> None:
    flow = chat_flow(body)
    result = shown(flow, flow.request)
    assert result.view_name == "Raw"
    assert "failed to parse as Scout chat" in result.description


def test_a_json_object_without_messages_is_still_shown() -> None:
    text = shown_request(chat_flow(b'{"model": "m", "prompt": "hi"}'))
    assert "no 'messages' array (messages: null)" in text
    assert "prompt: hi" in text


# --- responses -----------------------------------------------------------------------------------


def test_completion_with_reasoning_tool_calls_usage_and_timings() -> None:
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "scout",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "reasoning_content": "The user wants the tests.",
                    "content": "Looking.",
                    "tool_calls": [
                        {"id": "call_9", "type": "function", "function": {"name": "ls", "arguments": '{"dir":"tests"}'}}
                    ],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 1_000_000,
            "completion_tokens": 12,
            "total_tokens": 1_000_012,
            "prompt_tokens_details": {"cached_tokens": 998_000},
        },
        "timings": {"cache_n": 998_000, "prompt_n": 2000, "prompt_ms": 812.5, "predicted_n": 12},
        "system_fingerprint": "b1234",
    }
    text = shown_response(
        http.Response.make(200, json.dumps(completion).encode(), {"content-type": "application/json"})
    )
    assert text.startswith("chat completion · model scout · id chatcmpl-1\n")
    assert "=== choices[0] · finish_reason: tool_calls ===" in text
    assert "[reasoning]\nThe user wants the tests.\n[content]\nLooking.\n" in text
    assert 'tool call call_9: ls({"dir":"tests"})' in text
    assert "prompt_tokens: 1,000,000\n" in text
    assert "prompt_tokens_details.cached_tokens: 998,000 (99.8% of the prompt)" in text
    assert "cache_n: 998,000\nprompt_n: 2,000\nprompt_ms: 812.5\npredicted_n: 12" in text
    assert "prompt tokens reused from the cache: 998,000 of 1,000,000" in text
    assert "system_fingerprint: b1234" in text


def test_error_envelopes_are_shown_plainly() -> None:
    ours = error_response(
        ApiError(400, "'messages' is required", "invalid_request_error", "invalid_request", "messages")
    )
    text = shown_response(ours)
    assert (
        text == "error · type invalid_request_error · code invalid_request · param messages\n'messages' is required\n"
    )
    vllm_style = {"object": "error", "message": "context too long", "type": "BadRequestError", "code": 400}
    text = shown_response(
        http.Response.make(400, json.dumps(vllm_style).encode(), {"content-type": "application/json"})
    )
    assert text.startswith("error · type BadRequestError · code 400\ncontext too long\n")


def test_vllm_stream_with_a_final_usage_chunk() -> None:
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": ", world"}),
        chunk({}, finish_reason="stop"),
        chunk(
            None,
            usage={"prompt_tokens": 4000, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 3984}},
        ),
        "[DONE]",
    ]
    text = shown_response(sse_response(events))
    assert text.startswith("streamed chat completion · 6 events · model scout · id chatcmpl-7 · ended with [DONE]\n")
    assert "=== choices[0] · finish_reason: stop ===\nHello, world\n" in text
    assert "prompt_tokens_details.cached_tokens: 3,984 (99.6% of the prompt)" in text


def test_llama_cpp_stream_with_crlf_reasoning_and_timings() -> None:
    timings = {"cache_n": 19_990, "prompt_n": 10, "prompt_ms": 110.2, "predicted_n": 3, "predicted_ms": 40.0}
    events = [
        chunk({"role": "assistant", "content": None}),
        chunk({"reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing."}),
        chunk({"content": "Done"}),
        chunk(
            {},
            finish_reason="length",
            usage={"prompt_tokens": 20_000, "completion_tokens": 3, "total_tokens": 20_003},
            timings=timings,
        ),
        "[DONE]",
    ]
    text = shown_response(sse_response(events, line_end="\r\n"))
    assert "=== choices[0] · finish_reason: length ===\n[reasoning]\nThinking.\n[content]\nDone\n" in text
    assert "=== timings (llama.cpp) ===\ncache_n: 19,990\nprompt_n: 10\nprompt_ms: 110.2" in text
    assert "prompt tokens reused from the cache: 19,990 of 20,000" in text
    assert "ended with [DONE]" in text


def test_streamed_tool_calls_are_joined_by_index() -> None:
    def call(index: int, **function: str) -> dict[str, Any]:
        fragment: dict[str, Any] = {"index": index, "function": function}
        if "name" in function:
            fragment.update(id=f"call_{index}", type="function")
        return fragment

    events = [
        chunk({"role": "assistant", "tool_calls": [call(1, name="ls", arguments=""), call(0, name="grep")]}),
        chunk({"tool_calls": [call(0, arguments='{"q":')]}),
        chunk({"tool_calls": [call(1, arguments='{"dir"')]}),
        chunk({"tool_calls": [call(0, name="grep", arguments=' "parse"}')]}),  # some engines repeat the name
        chunk({"tool_calls": [call(1, arguments=': "src"}')]}),
        chunk({}, finish_reason="tool_calls"),
        "[DONE]",
    ]
    text = shown_response(sse_response(events))
    assert (
        '=== choices[0] · finish_reason: tool_calls ===\ntool call call_0: grep({"q": "parse"})\n'
        'tool call call_1: ls({"dir": "src"})\n'
    ) in text


def test_a_stream_cut_off_mid_event_shows_what_arrived() -> None:
    body = sse_response([chunk({"content": "Partial answer"})]).content or b""
    body += b'data: {"id": "chatcmpl-7", "choi'
    text = shown_response(http.Response.make(200, body, {"content-type": "text/event-stream"}))
    assert "no [DONE]: cut off, or not finished" in text
    assert "=== choices[0] · finish_reason: None ===\nPartial answer\n" in text
    assert '=== events that are not JSON objects (1) ===\n{"id": "chatcmpl-7", "choi' in text


def test_an_error_event_in_a_stream() -> None:
    events = [json.dumps({"error": {"message": "upstream overloaded", "type": "server_error", "code": 503}})]
    text = shown_response(sse_response(events))
    assert "error · type server_error · code 503\nupstream overloaded" in text


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b"data: nonsense\n\n", "text/event-stream"), (b"{truncated", "application/json"), (b"[]", "application/json")],
)
def test_undecodable_responses_fall_back_to_the_raw_view(body: bytes, content_type: str) -> None:
    flow = chat_flow(b'{"messages": []}', response=http.Response.make(200, body, {"content-type": content_type}))
    assert flow.response is not None
    result = shown(flow, flow.response)
    assert result.view_name == "Raw"
    assert "failed to parse as Scout chat" in result.description


# --- the append-only layout ------------------------------------------------------------------------


def append_layout_request(repo: Repo) -> tuple[ChatRequest, list[str]]:
    """A request whose snapshot is a base plus history blocks, as the provider builds it."""
    git_repo = GitRepo(str(repo.path))
    snapshot_limits, diff_limits = limits()
    history = History(
        git_repo, snapshot_limits, HistoryLimits(base_every_commits=64, max_tail_percent=100_000, full_files=False)
    )
    head = git_repo.head_commit()
    assert head is not None
    tail = history.tail_for(head)
    base = build_snapshot(git_repo, tail.base, snapshot_limits, append_preamble(tail.base))
    snapshot = with_history(base, head, list(zip(tail.commits, tail.blocks, strict=True)))
    diff = build_working_diff(git_repo, head, diff_limits)
    assembled = assemble_body(
        parse_chat_request(json.dumps(client_body()).encode()), [snapshot.message_json, diff.message_json]
    )
    snapshot_span, diff_span = assembled.context_spans
    assert snapshot.history_start is not None
    metadata = {
        "commit": head,
        "snapshot_span": snapshot_span,
        "diff_span": diff_span,
        "history_start": snapshot_span[0] + snapshot.history_start,
    }
    return ChatRequest(assembled.body, metadata, head), list(tail.commits)


@pytest.mark.usefixtures("registered")
def test_an_append_layout_snapshot_shows_its_base_and_one_line_per_commit(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.py": "A = 1\n", "b.py": "B = 1\n"})
    repo.write({"a.py": "A = 2\n"})
    repo.commit_all("Change a\n\nThe body is not shown.")
    repo.write({"c d.py": "C = 1\n"})
    (repo.path / "b.py").unlink()
    repo.commit_all("Add c d, remove b")
    request, commits = append_layout_request(repo)
    base = repo.git("rev-list", "--max-parents=0", "HEAD").strip()
    for metadata in (request.metadata, None):  # through the recorded offsets, and by search when edited
        text = shown_request(chat_flow(request.body, metadata))
        assert f"commit: {base}" in text
        assert "history since the base: 2 commits" in text
        assert f"  {commits[0][:7]} Change a  [a.py]" in text
        assert f"  {commits[1][:7]} Add c d, remove b  [b.py, c d.py]" in text
        assert "The body is not shown." not in text
        assert "files: 2, symbolic links: 0" in text


def test_with_the_recorded_regions_a_header_like_line_in_a_file_is_not_a_path(make_repo: MakeRepo) -> None:
    """The proxy records where every block is when it builds a snapshot: the view lists exactly those."""
    repo = make_repo({"a.txt": 'line\n<file path="not/a/file">\n', "z.txt": "z\n"})
    (repo.path / "link").symlink_to("a.txt")
    repo.commit_all("with a link")
    request = build_request(repo, client_body())
    snapshot = build_snapshot(GitRepo(str(repo.path)), request.commit, limits()[0])
    index = SnapshotIndex()
    index.remember(snapshot)
    view = ChatContentview(index)
    flow = chat_flow(request.body, request.metadata)
    text = view.prettify(request.body, contentviews.Metadata(flow=flow, http_message=flow.request))
    assert "=== snapshot paths (3) ===\na.txt\nlink -> a.txt\nz.txt\n" in text
    assert "not/a/file" not in text
    assert "block headers found in the text" not in text
