"""BodyRetention and strip_context: unit tests on flows in a real View, and a real mitmweb end to end."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import secrets
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
from mitmproxy import http
from mitmproxy.addons.view import View
from mitmproxy.flow import Flow
from mitmproxy.test import taddons, tflow

from scout_diff_cache.chat.request import assemble_body, parse_chat_request
from scout_diff_cache.context.framing import TRIMMED_SNAPSHOT_PREFIX, strip_context, system_message_json
from scout_diff_cache.mitm.retention import BodyRetention, placeholder_text
from scout_diff_cache.mitm.state import METADATA_KEY, ScoutState
from support import MitmwebApi, Repo, Upstream, free_port, mitmweb_args, run_proxy

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SNAPSHOT = system_message_json('<file path="a.py">\nprint("é")\n</file>\n' * 200)
DIFF = system_message_json("diff --git a/a.py b/a.py\n+print('new')\n")
CLIENT_MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def keeping(keep: int) -> BodyRetention:
    """The retention addon keeping the last ``keep`` full bodies."""
    retention = BodyRetention(ScoutState())
    retention.keep = keep
    return retention


def client_body(messages: list[dict[str, Any]] | None = None, **fields: Any) -> bytes:
    return json.dumps({"model": "m", "temperature": 0.5, **fields, "messages": messages or []}).encode()


def chat_flow(client: bytes | None = None, commit: str | None = COMMIT) -> http.HTTPFlow:
    """A finished chat flow as the addon leaves it: the spliced body and its metadata record."""
    assembled = assemble_body(parse_chat_request(client or client_body(CLIENT_MESSAGES)), [SNAPSHOT, DIFF])
    flow = tflow.tflow(resp=True, live=False)
    flow.request.path = "/v1/chat/completions"
    flow.request.content = assembled.body
    snapshot_span, diff_span = assembled.context_spans
    flow.metadata[METADATA_KEY] = {
        "commit": commit,
        "snapshot_bytes": len(SNAPSHOT),
        "snapshot_files": 200,
        "snapshot_span": snapshot_span,
        "diff_bytes": len(DIFF),
        "diff_files": 1,
        "diff_span": diff_span,
        "body_bytes": len(assembled.body),
    }
    return flow


def is_trimmed(flow: http.HTTPFlow) -> bool:
    body = flow.request.raw_content
    assert body is not None
    messages = json.loads(body)["messages"]
    trimmed = bool(messages[0]["content"].startswith(TRIMMED_SNAPSHOT_PREFIX))
    assert trimmed == bool(flow.metadata[METADATA_KEY].get("snapshot_trimmed"))
    return trimmed


@pytest.fixture
def view() -> Iterator[View]:
    """A real flow store, as mitmweb has; the retention finds it through ctx.master."""
    store = View()
    with taddons.context(store):  # type: ignore[no-untyped-call]
        yield store


def finish(view: View, retention: BodyRetention, *flows: http.HTTPFlow) -> None:
    for flow in flows:
        if view.get_by_id(flow.id) is None:
            view.add([flow])
        retention.flow_done(flow)


def test_only_the_last_keep_flows_keep_their_snapshot(view: View) -> None:
    retention = keeping(2)
    flows = [chat_flow() for _ in range(5)]
    for done, flow in enumerate(flows, start=1):
        finish(view, retention, flow)
        assert [is_trimmed(f) for f in flows[:done]] == [True] * max(0, done - 2) + [False] * min(done, 2)


def test_keep_zero_trims_each_flow_when_it_is_done(view: View) -> None:
    retention = keeping(0)
    flow = chat_flow()
    finish(view, retention, flow)
    assert is_trimmed(flow)


def test_trimmed_body_is_valid_json_with_every_other_part_unchanged(view: View) -> None:
    flow = chat_flow(client_body(CLIENT_MESSAGES, stream=True, tools=[{"type": "function"}]))
    original = json.loads(flow.request.raw_content or b"")
    headers = flow.request.headers.copy()
    finish(view, keeping(0), flow)
    trimmed = json.loads(flow.request.raw_content or b"")
    assert {k: v for k, v in trimmed.items() if k != "messages"} == {
        k: v for k, v in original.items() if k != "messages"
    }
    assert trimmed["messages"][0]["role"] == "system"
    assert trimmed["messages"][1:] == original["messages"][1:]
    # The headers still say what was sent upstream.
    assert flow.request.headers == headers
    assert flow.request.headers["content-length"] == str(flow.metadata[METADATA_KEY]["body_bytes"])


def test_spans_point_at_the_placeholder_and_the_diff(view: View) -> None:
    flow = chat_flow()
    finish(view, keeping(0), flow)
    record = flow.metadata[METADATA_KEY]
    body = flow.request.raw_content or b""
    start, end = record["snapshot_span"]
    assert json.loads(body[start:end]) == {"role": "system", "content": placeholder_text(record, 0)}
    diff_start, diff_end = record["diff_span"]
    assert body[diff_start:diff_end] == DIFF
    assert record["snapshot_trimmed"] is True
    assert record["trimmed_body_bytes"] == len(body)


def test_a_continuing_conversations_change_messages_stay_where_the_spans_say(view: View) -> None:
    """After the trim, every injected span still holds its message: a replay strips them all."""
    changes = system_message_json("Changes to the repository since the previous context message ...")
    client = client_body(
        [*CLIENT_MESSAGES, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    )
    assembled = assemble_body(parse_chat_request(client), [SNAPSHOT], None, [(0, DIFF), (2, changes)])
    flow = chat_flow()
    flow.request.content = assembled.body
    snapshot_span, diff_span, changes_span = assembled.context_spans
    flow.metadata[METADATA_KEY].update(
        snapshot_span=snapshot_span,
        diff_span=diff_span,
        injected_spans=[changes_span],
        body_bytes=len(assembled.body),
    )
    finish(view, keeping(0), flow)
    record = flow.metadata[METADATA_KEY]
    body = flow.request.raw_content or b""
    start, end = record["injected_spans"][0]
    assert body[start:end] == changes
    spans = (record["snapshot_span"], record["diff_span"], *record["injected_spans"])
    assert json.loads(strip_context(body, spans))["messages"] == json.loads(client)["messages"]


def test_placeholder_says_what_was_removed() -> None:
    record = chat_flow().metadata[METADATA_KEY]
    text = placeholder_text(record, 10)
    assert text.startswith(TRIMMED_SNAPSHOT_PREFIX)
    assert COMMIT in text
    assert f"({len(SNAPSHOT)} bytes)" in text
    assert "200 files" in text
    assert "last 10 chat flows" in text
    assert "KEEP_FULL_BODIES" in text
    assert "no chat flow keeps" in placeholder_text(record, 0)
    assert "unborn" in placeholder_text(chat_flow(commit=None).metadata[METADATA_KEY], 10)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda f: setattr(f.request, "content", (f.request.content or b"") + b" "), id="longer"),
        pytest.param(
            lambda f: setattr(
                f.request, "content", (f.request.content or b"").replace(b'{"role": "system"', b'{"role": "user"  ', 1)
            ),
            id="same-length-not-system",
        ),
        pytest.param(lambda f: f.request.headers.__setitem__("content-encoding", "gzip"), id="content-encoding"),
    ],
)
def test_edited_flows_are_left_alone(view: View, edit: Callable[[http.HTTPFlow], None]) -> None:
    flow = chat_flow()
    edit(flow)
    body = flow.request.raw_content
    record = dict(flow.metadata[METADATA_KEY])
    finish(view, keeping(0), flow)
    assert flow.request.raw_content is body
    assert flow.metadata[METADATA_KEY] == record


def test_live_and_queued_flows_are_left_alone_and_tried_again_later(view: View) -> None:
    retention = keeping(2)
    sending, queued, newer, newest, last = (chat_flow() for _ in range(5))
    finish(view, retention, sending, queued)
    sending.live = True  # still sending its response to the client
    queued.response = None  # queued for a replay
    finish(view, retention, newer, newest)
    assert not any(is_trimmed(f) for f in (sending, queued, newer, newest))
    sending.live = False
    finish(view, retention, last)
    assert [is_trimmed(f) for f in (sending, queued, newer, newest, last)] == [True, False, True, False, False]


def test_a_replayed_flow_moves_to_the_newest_place(view: View) -> None:
    retention = keeping(2)
    first, second, third = (chat_flow() for _ in range(3))
    finish(view, retention, first, second, first, third)
    assert [is_trimmed(f) for f in (first, second, third)] == [False, True, False]


def test_shrinking_keep_trims_the_excess_on_the_next_flow(view: View) -> None:
    retention = keeping(5)
    flows = [chat_flow() for _ in range(5)]
    finish(view, retention, *flows)
    assert not any(is_trimmed(f) for f in flows)
    retention.keep = 1
    newest = chat_flow()
    finish(view, retention, newest)
    assert all(is_trimmed(f) for f in flows)
    assert not is_trimmed(newest)


def test_the_view_is_told_about_each_trimmed_flow(view: View) -> None:
    updated: list[str] = []

    def on_update(flow: Flow) -> None:
        updated.append(flow.id)

    view.sig_view_update.connect(on_update)  # held weakly by the signal: keep the name alive
    retention = keeping(1)
    older, newer = chat_flow(), chat_flow()
    finish(view, retention, older, newer)
    assert updated == [older.id]


def test_flows_are_held_weakly(view: View) -> None:
    retention = keeping(5)
    flow = chat_flow()
    finish(view, retention, flow)
    view.remove([flow])
    ref = weakref.ref(flow)
    del flow
    gc.collect()
    assert ref() is None


def test_a_flow_removed_from_the_view_is_not_trimmed(view: View) -> None:
    retention = keeping(1)
    removed, newer = chat_flow(), chat_flow()
    finish(view, retention, removed)
    view.remove([removed])
    finish(view, retention, newer)
    assert not is_trimmed(removed)


def test_without_a_flow_store_nothing_is_tracked_or_trimmed() -> None:
    """mitmdump has no View: flows die with their connection, trimming them would be wasted work."""
    retention = keeping(0)
    flow = chat_flow()
    with taddons.context():  # type: ignore[no-untyped-call]
        retention.flow_done(flow)
    assert not is_trimmed(flow)
    ref = weakref.ref(flow)
    del flow
    gc.collect()
    assert ref() is None


def test_a_backup_sharing_the_body_is_trimmed_too(view: View) -> None:
    """mitmweb backs a flow up before a mark or a replay; revert must not bring the full body back."""
    flow = chat_flow()
    flow.backup()  # type: ignore[no-untyped-call]
    flow.marked = ":star:"
    finish(view, keeping(0), flow)
    assert is_trimmed(flow)
    trimmed = flow.request.raw_content
    flow.revert()  # type: ignore[no-untyped-call]
    assert flow.marked == ""
    assert flow.request.raw_content == trimmed
    assert is_trimmed(flow)


def test_a_backup_of_another_body_is_left_alone(view: View) -> None:
    flow = chat_flow()
    finish(view, keeping(0), flow)
    # A replay: the trimmed body is backed up, then a new full body is sent.
    flow.backup()  # type: ignore[no-untyped-call]
    fresh = chat_flow()
    flow.request.content = fresh.request.raw_content
    flow.metadata[METADATA_KEY] = fresh.metadata[METADATA_KEY]
    finish(view, keeping(0), flow)
    assert is_trimmed(flow)
    flow.revert()  # type: ignore[no-untyped-call]
    assert is_trimmed(flow)


# --- strip_context ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client",
    [
        client_body(CLIENT_MESSAGES),
        client_body([]),
        b'{"messages":[{"role":"user","content":"only messages"}]}',
        client_body([{"role": "user", "content": "ünïcode \ud800 and \"quotes\" {'role': 'system'}"}]),
    ],
    ids=["fields-and-messages", "no-client-messages", "only-messages", "escapes"],
)
def test_strip_context_gives_back_the_clients_body(client: bytes) -> None:
    assembled = assemble_body(parse_chat_request(client), [SNAPSHOT, DIFF])
    stripped = strip_context(assembled.body, assembled.context_spans)
    assert json.loads(stripped) == json.loads(client)
    assert parse_chat_request(stripped) == parse_chat_request(client)


def test_strip_context_of_a_trimmed_flow(view: View) -> None:
    flow = chat_flow()
    original = flow.request.raw_content or b""
    spans = (flow.metadata[METADATA_KEY]["snapshot_span"], flow.metadata[METADATA_KEY]["diff_span"])
    finish(view, keeping(0), flow)
    record = flow.metadata[METADATA_KEY]
    stripped = strip_context(flow.request.raw_content or b"", (record["snapshot_span"], record["diff_span"]))
    assert stripped == strip_context(original, spans)
    assert json.loads(stripped)["messages"] == CLIENT_MESSAGES


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"messages":[' + SNAPSHOT + b"]}", b'{"messages":[]}'),
        (
            b'{"messages":[{"role":"user","content":"q"},' + SNAPSHOT + b"]}",
            b'{"messages":[{"role":"user","content":"q"}]}',
        ),
        (
            b'{"messages":[{"role":"user","content":"q"},'
            + SNAPSHOT
            + b',{"role":"user","content":"r"},'
            + DIFF
            + b'],"n":1}',
            b'{"messages":[{"role":"user","content":"q"},{"role":"user","content":"r"}],"n":1}',
        ),
        (b'{"messages":[' + DIFF + b"," + SNAPSHOT + b'],"model":"m"}', b'{"messages":[],"model":"m"}'),
    ],
    ids=["alone", "last", "interleaved", "messages-first"],
)
def test_strip_context_at_any_position(body: bytes, expected: bytes) -> None:
    spans = [(body.index(m), body.index(m) + len(m)) for m in (SNAPSHOT, DIFF) if m in body]
    assert strip_context(body, list(reversed(spans))) == expected
    json.loads(expected)


def test_strip_context_without_spans_is_the_body() -> None:
    body = client_body(CLIENT_MESSAGES)
    assert strip_context(body, []) == body


@pytest.mark.parametrize(
    "spans",
    [
        [(0, 10)],
        [(-5, 10)],
        [(30, 10**9)],
        "overlap",
        "inside-a-string",
        "shifted",
    ],
)
def test_strip_context_refuses_spans_that_hold_no_context_message(spans: Any) -> None:
    assembled = assemble_body(parse_chat_request(client_body(CLIENT_MESSAGES)), [SNAPSHOT, DIFF])
    body = assembled.body
    (start, end), _ = assembled.context_spans
    if spans == "overlap":
        spans = [(start, end), (start, end)]
    elif spans == "inside-a-string":
        body = client_body([{"role": "user", "content": SNAPSHOT.decode()}])
        inner = json.dumps(SNAPSHOT.decode()).encode()
        spans = [(body.index(inner) + 1, body.index(inner) + len(inner) - 1)]
    elif spans == "shifted":
        spans = [(start + 1, end + 1)]
    with pytest.raises(ValueError):
        strip_context(body, spans)


# --- a real mitmweb ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def updates(api: MitmwebApi) -> Any:
    """Every message mitmweb pushes to its web UI over /updates, collected while the block runs."""
    request = tornado.httpclient.HTTPRequest(api.base_url.replace("http", "ws") + "/updates", headers=api.headers)
    connection = await tornado.websocket.websocket_connect(request)
    messages: list[dict[str, Any]] = []

    async def collect() -> None:
        while (message := await connection.read_message()) is not None:
            messages.append(json.loads(message))

    task = asyncio.create_task(collect())
    try:
        yield messages
    finally:
        connection.close()
        await asyncio.wait_for(task, 10)


def pushed_sizes(pushed: list[dict[str, Any]]) -> dict[str, int | None]:
    """Each flow's request body size as the web UI last heard it."""
    return {
        m["payload"]["flow"]["id"]: m["payload"]["flow"]["request"]["contentLength"]
        for m in pushed
        if m["type"] in ("flows/add", "flows/update")
    }


async def test_mitmweb_keeps_full_bodies_of_the_last_flows_only(
    tmp_path: Path, make_repo: Callable[..., Repo], upstream: Upstream
) -> None:
    keep, sent = 2, 5
    repo = make_repo({f"src/module_{i}.py": f"value = {i}\n" * 2000 for i in range(20)})
    web_port, token = free_port(), secrets.token_hex(16)
    env = {"GIT_REPO_PATH": str(repo.path), "KEEP_FULL_BODIES": str(keep)}
    with run_proxy(upstream.url, tmp_path / "web", env, mitmweb_args(web_port, token), program="mitmweb") as proxy:
        api = MitmwebApi(web_port, token)
        async with updates(api) as pushed:
            for index in range(sent):
                body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"question {index}"}]})
                result = await asyncio.to_thread(
                    proxy.post, "/v1/chat/completions", body.encode(), {"content-type": "application/json"}
                )
                assert result.status == 200, result.body[:300]
            flows = await asyncio.to_thread(api.chat_flows)
            stored: list[bytes] = [
                await asyncio.to_thread(api.get, f"/flows/{f['id']}/request/content.data") for f in flows
            ]
            sizes = {flow["id"]: len(kept) for flow, kept in zip(flows, stored, strict=True)}
            for _ in range(100):  # the pushed updates reach the web UI
                if pushed_sizes(pushed) == sizes:
                    break
                await asyncio.sleep(0.05)
            assert pushed_sizes(pushed) == sizes, "the web UI was not told about the trimmed bodies"
        recorded = upstream.chat_requests()
        assert len(flows) == len(recorded) == sent
        for index, (flow, kept, sent_request) in enumerate(zip(flows, stored, recorded, strict=True)):
            # The stored headers still describe what was sent; the body parses as JSON.
            headers = {k.lower(): v for k, v in flow["request"]["headers"]}
            assert headers["content-length"] == str(len(sent_request.body))
            assert flow["request"]["contentLength"] == len(kept)
            if index < sent - keep:
                messages = json.loads(kept)["messages"]
                assert messages[0]["content"].startswith(TRIMMED_SNAPSHOT_PREFIX), index
                assert repo.head() in messages[0]["content"]
                assert messages[1:] == sent_request.json()["messages"][1:]
                assert len(kept) < len(sent_request.body) - 100_000
            else:
                assert kept == sent_request.body, index
