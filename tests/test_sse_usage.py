"""SSE splitting, usage parsing and the stream usage tap: pure functions fed real stream shapes."""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scout_diff_cache.chat import usage as usage_module
from scout_diff_cache.chat.sse import SseSplitter, event_data, iter_event_data
from scout_diff_cache.chat.usage import (
    HELD_EVENT_LIMIT,
    RECORDED_STREAM_LIMIT,
    StreamUsageTap,
    UpstreamUsage,
    ask_for_stream_usage,
    usage_from_body,
    usage_from_chunk,
)

# --- helpers --------------------------------------------------------------------------------------


def sse(payload: object, ending: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(payload).encode() + ending


def content_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "scout",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


VLLM_USAGE = {
    "prompt_tokens": 120_000,
    "completion_tokens": 3,
    "total_tokens": 120_003,
    "prompt_tokens_details": {"cached_tokens": 119_984},
}
VLLM_USAGE_EVENT = sse(
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "scout", "choices": []}
    | {"usage": VLLM_USAGE}
)
VLLM_EVENTS_WITHOUT_USAGE = [
    sse(content_chunk("")),
    sse(content_chunk("Hel")),
    sse(content_chunk("lo ✓")),
    sse(content_chunk("", "stop")),
]
DONE = b"data: [DONE]\n\n"
VLLM_STREAM = b"".join([*VLLM_EVENTS_WITHOUT_USAGE, VLLM_USAGE_EVENT, DONE])
VLLM_CLIENT_STREAM = b"".join([*VLLM_EVENTS_WITHOUT_USAGE, DONE])


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated, ends dropped): non-empty pieces."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(pieces: Sequence[bytes]) -> tuple[list[bytes], bytes]:
    splitter = SseSplitter()
    events = [event for piece in pieces for event in splitter.feed(piece)]
    return events, splitter.flush()


def run_tap(tap: StreamUsageTap, pieces: Sequence[bytes]) -> bytes:
    """Everything the tap sends on, checking each mid-stream answer never ends the HTTP/1 body."""
    out = bytearray()
    for piece in pieces:
        assert piece
        result = tap(piece)
        if isinstance(result, bytes):
            assert result != b"", f"empty bytes mid-stream for {piece!r}"
            out += result
        else:
            assert isinstance(result, list)
            assert all(isinstance(part, bytes) and part for part in result), result
            out += b"".join(result)
    end = tap(b"")
    assert isinstance(end, bytes)
    out += end
    return bytes(out)


# --- SseSplitter ----------------------------------------------------------------------------------


def test_a_stream_fed_byte_by_byte_gives_each_event_once_complete() -> None:
    splitter = SseSplitter()
    seen: list[tuple[int, bytes]] = []
    for index in range(len(VLLM_STREAM)):
        for event in splitter.feed(VLLM_STREAM[index : index + 1]):
            seen.append((index, event))

    expected = [*VLLM_EVENTS_WITHOUT_USAGE, VLLM_USAGE_EVENT, DONE]
    assert [event for _, event in seen] == expected
    # Each event is returned by the feed of its own last byte, not later.
    ends = [VLLM_STREAM.index(event) + len(event) - 1 for event in expected]
    assert [index for index, _ in seen] == ends
    assert splitter.pending_bytes == 0
    assert splitter.flush() == b""


def test_random_splits_of_a_real_stream_reassemble_exactly() -> None:
    rng = random.Random(7)
    expected = [*VLLM_EVENTS_WITHOUT_USAGE, VLLM_USAGE_EVENT, DONE]
    for _ in range(200):
        cuts = [rng.randrange(1, len(VLLM_STREAM)) for _ in range(rng.randrange(0, 30))]
        events, rest = feed_all(split_at(VLLM_STREAM, cuts))
        assert events == expected
        assert rest == b""


LINE_ENDS = (b"\n", b"\r\n", b"\r")
_line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1, max_size=12)
_line = st.tuples(st.sampled_from(["data: ", "data:", ": ", "event: ", "id: ", "retry: "]), _line_text).map(
    lambda parts: parts[0] + parts[1]
)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], bytes, list[str]]:
    """A stream, its complete events' raw bytes, the unterminated rest, and every event's data."""
    events: list[bytes] = []
    datas: list[str] = []

    def lines_with_ends(count: int) -> tuple[bytes, list[str], bytes]:
        raw = b""
        texts = []
        end = b""
        for _ in range(count):
            text = draw(_line)
            end = draw(st.sampled_from(LINE_ENDS))
            texts.append(text)
            raw += text.encode() + end
        return raw, texts, end

    for _ in range(draw(st.integers(0, 6))):
        raw, texts, last_end = lines_with_ends(draw(st.integers(1, 4)))
        # The blank line: after a lone CR, an LF would only complete that CRLF.
        blank = draw(st.sampled_from([b"\r\n", b"\r"] if last_end == b"\r" else LINE_ENDS))
        events.append(raw + blank)
        datas.extend(_reference_data(texts))
    tail = b""
    if draw(st.booleans()):
        raw, texts, _ = lines_with_ends(draw(st.integers(0, 3)))
        final = draw(_line)  # a last line without its line end
        tail = raw + final.encode()
        datas.extend(_reference_data([*texts, final]))
    stream = b"".join(events) + tail
    if not tail and stream.endswith(b"\r"):
        # A CR at the very end may be half a CRLF: the splitter holds that event until flush.
        return stream, events[:-1], events[-1], datas
    return stream, events, tail, datas


def _reference_data(lines: list[str]) -> list[str]:
    """The spec's reading of one event's lines: its data, or nothing if it has no data field."""
    values = []
    for line in lines:
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            values.append(value.removeprefix(" "))
    return ["\n".join(values)] if values else []


@settings(max_examples=300, deadline=None)
@given(sse_streams(), st.lists(st.integers(min_value=1, max_value=400), max_size=40))
def test_any_split_of_any_stream_gives_the_same_events(
    generated: tuple[bytes, list[bytes], bytes, list[str]], cuts: list[int]
) -> None:
    stream, expected_events, expected_rest, expected_data = generated
    events, rest = feed_all(split_at(stream, cuts))
    assert events == expected_events
    assert rest == expected_rest
    assert b"".join(events) + rest == stream
    byte_by_byte, rest_bytewise = feed_all([stream[i : i + 1] for i in range(len(stream))])
    assert byte_by_byte == expected_events
    assert rest_bytewise == expected_rest
    assert list(iter_event_data(stream)) == expected_data


@pytest.mark.parametrize("end", LINE_ENDS)
def test_each_line_end_style_ends_lines_and_events(end: bytes) -> None:
    stream = b"data: a" + end + b"data: b" + end + end + b"data: c" + end + end + b"data: d"
    splitter = SseSplitter()
    events = splitter.feed(stream)
    assert events == [b"data: a" + end + b"data: b" + end + end, b"data: c" + end + end]
    assert [event_data(e) for e in events] == ["a\nb", "c"]
    assert splitter.flush() == b"data: d"


def test_mixed_line_ends_in_one_stream() -> None:
    stream = b"data: 1\r\n\r\ndata: 2\n\ndata: 3\r\rdata: 4\r\n\ndata: 5\n\r\n"
    events, rest = feed_all([stream])
    assert events == [b"data: 1\r\n\r\n", b"data: 2\n\n", b"data: 3\r\r", b"data: 4\r\n\n", b"data: 5\n\r\n"]
    assert rest == b""


def test_cr_at_a_chunk_end_waits_for_a_possible_lf() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\r\n\r") == []
    assert splitter.pending_bytes == len(b"data: a\r\n\r")
    # The LF completes the CRLF: one event ending in CRLF CRLF, not a CR event plus a stray LF.
    assert splitter.feed(b"\ndata: b\r\n\r\n") == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]
    assert splitter.flush() == b""


def test_cr_at_a_chunk_end_followed_by_more_data_ends_the_event() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\r\r") == []
    assert splitter.feed(b"data: b\r\r") == [b"data: a\r\r"]
    assert splitter.flush() == b"data: b\r\r"


def test_a_single_line_end_does_not_end_an_event() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\n") == []
    assert splitter.feed(b"data: b\r\n") == []
    assert splitter.feed(b"\n") == [b"data: a\ndata: b\r\n\n"]


def test_flush_returns_the_unterminated_last_event_once() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: 1\n\ndata: [DONE]") == [b"data: 1\n\n"]
    assert splitter.pending_bytes == len(b"data: [DONE]")
    assert splitter.flush() == b"data: [DONE]"
    assert splitter.flush() == b""
    assert splitter.pending_bytes == 0


# --- event_data / iter_event_data -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"data: x\n\n", "x"),
        (b"data:x\n\n", "x"),
        (b"data:  two spaces\n\n", " two spaces"),
        (b"data:\n\n", ""),
        (b"data\n\n", ""),
        (b"data: a\ndata: b\ndata: c\n\n", "a\nb\nc"),
        (b"data: a\r\ndata:b\r\n\r\n", "a\nb"),
        (b"data: a\rdata: b\r\r", "a\nb"),
        (b": ping\ndata: x\n: pong\n\n", "x"),
        (b"event: message\nid: 7\ndata: {}\nretry: 10\n\n", "{}"),
        (b"data: a:b: c\n\n", "a:b: c"),
        (b"data: \xc3\xa9t\xc3\xa9 \xff\n\n", "été \ufffd"),
    ],
)
def test_event_data(raw: bytes, expected: str) -> None:
    assert event_data(raw) == expected


@pytest.mark.parametrize("raw", [b": ping\n\n", b"event: x\nid: 1\n\n", b"database: 1\ndatax\n\n", b"\n\n", b""])
def test_event_without_a_data_field_has_none(raw: bytes) -> None:
    assert event_data(raw) is None


def test_iter_event_data_skips_comments_and_keeps_the_unterminated_last_event() -> None:
    body = b': ping\n\ndata: {"a": 1}\r\n\r\nevent: x\n\ndata: 2\ndata: 3\n\ndata: [DONE]'
    assert list(iter_event_data(body)) == ['{"a": 1}', "2\n3", "[DONE]"]


def test_iter_event_data_ignores_trailing_whitespace() -> None:
    assert list(iter_event_data(b"data: 1\n\n\n \n")) == ["1"]
    assert list(iter_event_data(b"")) == []


# --- usage_from_chunk -----------------------------------------------------------------------------


def test_openai_and_vllm_with_prompt_tokens_details() -> None:
    assert usage_from_chunk({"choices": [], "usage": VLLM_USAGE}) == UpstreamUsage(
        prompt_tokens=120_000,
        cached_tokens=119_984,
        evaluated_tokens=None,
        prompt_ms=None,
    )


def test_vllm_cache_writes_are_read_beside_cache_reads() -> None:
    details = {"cached_tokens": 3584, "created_cache_tokens": 48, "multimodal_tokens": None}
    result = usage_from_chunk({"usage": {"prompt_tokens": 3650, "prompt_tokens_details": details}})
    assert result == UpstreamUsage(prompt_tokens=3650, cached_tokens=3584, written_tokens=48)
    cold = usage_from_chunk({"usage": {"prompt_tokens": 3650, "prompt_tokens_details": {"created_cache_tokens": 3648}}})
    assert cold == UpstreamUsage(prompt_tokens=3650, written_tokens=3648)  # cached_tokens left out: 0 reused


def test_vllm_without_details_reports_no_cached_count() -> None:
    result = usage_from_chunk({"usage": {"prompt_tokens": 5000, "completion_tokens": 2, "total_tokens": 5002}})
    assert result == UpstreamUsage(prompt_tokens=5000)
    assert result is not None
    assert result.cached_tokens is None
    assert result.reports_cache is False


def test_vllm_with_null_details() -> None:
    result = usage_from_chunk({"usage": {"prompt_tokens": 10, "prompt_tokens_details": None}})
    assert result == UpstreamUsage(prompt_tokens=10)


def test_sglang_cache_report() -> None:
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
        "usage": {
            "prompt_tokens": 2048,
            "total_tokens": 2050,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 1024},
        },
    }
    result = usage_from_chunk(body)
    assert result == UpstreamUsage(2048, 1024, None)
    assert result is not None
    assert result.reports_cache is True


def test_llamacpp_usage_details_and_timings() -> None:
    chunk = {
        "choices": [],
        "usage": {
            "prompt_tokens": 20_010,
            "completion_tokens": 1,
            "total_tokens": 20_011,
            "prompt_tokens_details": {"cached_tokens": 20_000},
        },
        "timings": {"cache_n": 19_999, "prompt_n": 11, "prompt_ms": 110.25, "predicted_n": 1},
    }
    assert usage_from_chunk(chunk) == UpstreamUsage(
        prompt_tokens=20_010,
        cached_tokens=20_000,  # usage wins over timings.cache_n
        evaluated_tokens=11,
        prompt_ms=110.25,
    )


def test_llamacpp_timings_only() -> None:
    chunk = {"choices": [{"index": 0, "delta": {}}], "timings": {"cache_n": 300, "prompt_n": 25, "prompt_ms": 40}}
    result = usage_from_chunk(chunk)
    assert result == UpstreamUsage(325, 300, 25, 40.0)
    assert result is not None
    assert isinstance(result.prompt_ms, float)


def test_timings_without_cache_n() -> None:
    assert usage_from_chunk({"timings": {"prompt_n": 9}}) == UpstreamUsage(None, None, 9, None)
    assert usage_from_chunk({"timings": {"prompt_ms": 3.5}}) is None


def test_tgi_usage_without_details() -> None:
    body = {"usage": {"prompt_tokens": 77, "completion_tokens": 5, "total_tokens": 82}}
    assert usage_from_chunk(body) == UpstreamUsage(prompt_tokens=77)


def test_invalid_cached_details_fall_back_to_timings() -> None:
    chunk = {
        "usage": {"prompt_tokens": 50, "prompt_tokens_details": {"cached_tokens": -1}},
        "timings": {"cache_n": 40, "prompt_n": 10},
    }
    assert usage_from_chunk(chunk) == UpstreamUsage(50, 40, 10)


@pytest.mark.parametrize(
    "value",
    ["100", -1, True, False, 1.0, 12.5, None, [1], {"n": 1}],
)
def test_garbage_counts_are_ignored(value: object) -> None:
    chunk = {
        "usage": {"prompt_tokens": value, "prompt_tokens_details": {"cached_tokens": value}},
        "timings": {"cache_n": value, "prompt_n": value, "prompt_ms": "12"},
    }
    assert usage_from_chunk(chunk) is None


def test_true_is_not_one() -> None:
    result = usage_from_chunk({"usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": True}}})
    assert result == UpstreamUsage(prompt_tokens=10)
    result = usage_from_chunk({"timings": {"cache_n": True, "prompt_n": 4, "prompt_ms": True}})
    assert result == UpstreamUsage(None, None, 4, None)


def test_zero_is_a_count() -> None:
    result = usage_from_chunk({"usage": {"prompt_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}})
    assert result == UpstreamUsage(0, 0, None)
    assert result is not None
    assert result.reports_cache is True


@pytest.mark.parametrize(
    "data",
    [
        None,
        "usage",
        42,
        [{"usage": {"prompt_tokens": 1}}],
        {},
        {"usage": None},
        {"usage": None, "timings": None},
        {"usage": "lots"},
        {"usage": [1, 2]},
        {"usage": {}},
        {"usage": {"completion_tokens": 5, "total_tokens": 5}},
        {"timings": {}},
        {"choices": [{"delta": {"content": "x"}}]},
    ],
)
def test_chunks_without_usable_usage(data: object) -> None:
    assert usage_from_chunk(data) is None


def test_usage_from_body() -> None:
    body = json.dumps({"choices": [], "usage": VLLM_USAGE}).encode()
    assert usage_from_body(body) == UpstreamUsage(120_000, 119_984, None, None)


@pytest.mark.parametrize(
    "body",
    [b"", b"<html>502 Bad Gateway</html>", b"\xff\xfe\x00", b"data: {}\n\n", b'{"usage": ', b"[]", b"null", b"7"],
)
def test_usage_from_body_on_non_json_or_no_usage(body: bytes) -> None:
    assert usage_from_body(body) is None


def test_usage_from_body_on_deeply_nested_garbage() -> None:
    """Not JSON (unterminated): the documented answer is None, whatever the nesting depth."""
    assert usage_from_body(b"[" * 100_000) is None


# --- ask_for_stream_usage -------------------------------------------------------------------------


def test_adds_include_usage_to_a_streamed_request() -> None:
    fields: dict[str, Any] = {"model": "m", "stream": True, "messages": []}
    assert ask_for_stream_usage(fields) is True
    assert fields == {"model": "m", "stream": True, "messages": [], "stream_options": {"include_usage": True}}


def test_explicit_null_stream_options_gets_include_usage() -> None:
    fields: dict[str, Any] = {"stream": True, "stream_options": None}
    assert ask_for_stream_usage(fields) is True
    assert fields["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("stream", [None, False, 1, "true", "yes"])
def test_leaves_non_streamed_requests_alone(stream: object) -> None:
    fields: dict[str, Any] = {"model": "m"} if stream is None else {"model": "m", "stream": stream}
    before = json.dumps(fields)
    assert ask_for_stream_usage(fields) is False
    assert json.dumps(fields) == before


def test_keeps_other_stream_options() -> None:
    options = {"continuous_usage_stats": False, "include_usage": False}
    fields: dict[str, Any] = {"stream": True, "stream_options": options}
    assert ask_for_stream_usage(fields) is True
    assert fields["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert options == {"continuous_usage_stats": False, "include_usage": False}  # the client's dict is not mutated


def test_include_usage_already_true_is_left_alone() -> None:
    options = {"include_usage": True, "x": 1}
    fields: dict[str, Any] = {"stream": True, "stream_options": options}
    assert ask_for_stream_usage(fields) is False
    assert fields["stream_options"] is options
    assert options == {"include_usage": True, "x": 1}


@pytest.mark.parametrize("options", [[], ["include_usage"], "include_usage", 1, True])
def test_non_object_stream_options_are_left_as_sent(options: object) -> None:
    fields: dict[str, Any] = {"stream": True, "stream_options": options}
    assert ask_for_stream_usage(fields) is False
    assert fields["stream_options"] == options
    assert type(fields["stream_options"]) is type(options)


# --- StreamUsageTap -------------------------------------------------------------------------------


def test_removes_the_vllm_usage_chunk_and_keeps_every_other_byte() -> None:
    tap = StreamUsageTap(remove_usage=True)
    out = run_tap(tap, [VLLM_STREAM])
    assert out == VLLM_CLIENT_STREAM
    assert tap.usage == UpstreamUsage(120_000, 119_984, None)
    assert bytes(tap.recorded) == VLLM_CLIENT_STREAM
    assert tap.recording_truncated is False


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(VLLM_STREAM) - 1), max_size=60))
def test_usage_removal_is_the_same_for_any_chunking(cuts: list[int]) -> None:
    tap = StreamUsageTap(remove_usage=True)
    out = run_tap(tap, split_at(VLLM_STREAM, cuts))
    assert out == VLLM_CLIENT_STREAM
    events, rest = feed_all([out])
    assert events == [*VLLM_EVENTS_WITHOUT_USAGE, DONE]
    assert rest == b""
    assert tap.usage is not None
    assert tap.usage.cached_tokens == 119_984
    assert bytes(tap.recorded) == VLLM_CLIENT_STREAM


def test_a_chunk_holding_only_the_usage_event_gives_an_empty_list() -> None:
    tap = StreamUsageTap(remove_usage=True)
    assert tap(b"".join(VLLM_EVENTS_WITHOUT_USAGE)) == [b"".join(VLLM_EVENTS_WITHOUT_USAGE)]
    result = tap(VLLM_USAGE_EVENT)
    assert result == []
    assert tap(DONE) == [DONE]
    assert tap(b"") == b""


def test_an_incomplete_event_is_held_back_without_an_empty_chunk() -> None:
    tap = StreamUsageTap(remove_usage=True)
    first = VLLM_EVENTS_WITHOUT_USAGE[0]
    assert tap(first[:10]) == []
    assert tap(first[10:-1]) == []
    assert tap(first[-1:]) == [first]


def test_llamacpp_usage_chunk_with_timings_is_removed_and_read() -> None:
    usage_chunk = {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {
            "prompt_tokens": 20_011,
            "completion_tokens": 2,
            "total_tokens": 20_013,
            "prompt_tokens_details": {"cached_tokens": 20_000},
        },
        "timings": {"cache_n": 20_000, "prompt_n": 11, "prompt_ms": 93.5, "predicted_n": 2},
    }
    kept = [sse(content_chunk("a")), sse(content_chunk("b", "stop"))]
    stream = b"".join([*kept, sse(usage_chunk), DONE])
    tap = StreamUsageTap(remove_usage=True)
    out = run_tap(tap, split_at(stream, range(0, len(stream), 7)))
    assert out == b"".join([*kept, DONE])
    assert tap.usage == UpstreamUsage(20_011, 20_000, 11, 93.5)


def test_usage_and_timings_from_different_chunks_are_merged() -> None:
    stream = b"".join(
        [
            sse(content_chunk("x", "stop") | {"timings": {"cache_n": 7, "prompt_n": 3, "prompt_ms": 1.5}}),
            sse({"choices": [], "usage": {"prompt_tokens": 10}}),
            DONE,
        ]
    )
    tap = StreamUsageTap(remove_usage=True)
    out = run_tap(tap, [stream])
    assert out == sse(content_chunk("x", "stop") | {"timings": {"cache_n": 7, "prompt_n": 3, "prompt_ms": 1.5}}) + DONE
    assert tap.usage == UpstreamUsage(10, 7, 3, 1.5)


@pytest.mark.parametrize("ending", [b"\n\n", b"\r\n\r\n"])
def test_usage_on_a_chunk_with_choices_is_removed_from_that_chunk_only(ending: bytes) -> None:
    last = content_chunk('fin ✓ "quoted"', "stop") | {
        "usage": {"prompt_tokens": 30, "prompt_tokens_details": {"cached_tokens": 16}},
        "timings": {"cache_n": 16, "prompt_n": 14},
    }
    before = sse(content_chunk("héllo"), ending)
    stream = before + sse(last, ending) + b"data: [DONE]" + ending
    tap = StreamUsageTap(remove_usage=True)
    out = run_tap(tap, [stream])

    events, rest = feed_all([out])
    assert rest == b""
    assert len(events) == 3
    assert events[0] == before
    assert events[2] == b"data: [DONE]" + ending
    rewritten = events[1]
    assert rewritten.endswith(ending)
    assert rewritten.count(b"\n") == ending.count(b"\n")  # still one data line
    expected = {key: value for key, value in last.items() if key != "usage"}
    assert json.loads(event_data(rewritten) or "") == expected
    assert 'fin ✓ "quoted"'.encode() in rewritten.replace(b'\\"', b'"')  # UTF-8, not \\u escapes
    assert tap.usage == UpstreamUsage(30, 16, 14)


def test_events_that_are_not_json_pass_through_untouched() -> None:
    stream = b': keep-alive\n\nevent: error\ndata: not json\n\ndata: [1, 2]\n\ndata: "usage"\n\n' + DONE
    tap = StreamUsageTap(remove_usage=True)
    assert run_tap(tap, split_at(stream, range(0, len(stream), 3))) == stream
    assert tap.usage is None


@pytest.mark.parametrize("remove_usage", [True, False])
def test_an_absurdly_nested_event_passes_through(remove_usage: bool) -> None:
    """Not JSON (unterminated, 100 000 levels deep): passed on like any other event, never an exception."""
    stream = sse(content_chunk("a")) + b"data: " + b"[" * 100_000 + b"\n\n" + DONE
    tap = StreamUsageTap(remove_usage=remove_usage)
    assert run_tap(tap, [stream]) == stream
    assert tap.usage is None


def test_without_removal_the_output_is_the_input_chunk_for_chunk() -> None:
    pieces = split_at(VLLM_STREAM, [5, 17, 100, 101, 250, len(VLLM_STREAM) - 3])
    tap = StreamUsageTap(remove_usage=False)
    for piece in pieces:
        assert tap(piece) == [piece]
    assert tap(b"") == b""
    assert tap.usage == UpstreamUsage(120_000, 119_984, None)
    assert bytes(tap.recorded) == VLLM_STREAM


def test_without_removal_an_unterminated_last_event_is_not_sent_twice() -> None:
    """The client already got every byte chunk for chunk: the end call must add nothing."""
    pieces = [VLLM_EVENTS_WITHOUT_USAGE[0], b"data: [DONE]"]
    tap = StreamUsageTap(remove_usage=False)
    assert tap(pieces[0]) == [pieces[0]]
    assert tap(pieces[1]) == [pieces[1]]
    assert tap(b"") == b""
    assert bytes(tap.recorded) == b"".join(pieces)


def test_without_removal_an_unterminated_usage_event_is_read_and_not_repeated() -> None:
    usage_event = VLLM_USAGE_EVENT.removesuffix(b"\n\n")
    tap = StreamUsageTap(remove_usage=False)
    assert tap(usage_event) == [usage_event]
    assert tap(b"") == b""
    assert tap.usage is not None
    assert tap.usage.cached_tokens == 119_984


def test_with_removal_the_unterminated_last_event_is_flushed_at_the_end() -> None:
    tap = StreamUsageTap(remove_usage=True)
    assert tap(VLLM_EVENTS_WITHOUT_USAGE[0] + b"data: [DONE]") == [VLLM_EVENTS_WITHOUT_USAGE[0]]
    assert tap(b"") == b"data: [DONE]"
    assert bytes(tap.recorded) == VLLM_EVENTS_WITHOUT_USAGE[0] + b"data: [DONE]"


def test_with_removal_an_unterminated_usage_event_is_dropped_at_the_end() -> None:
    tap = StreamUsageTap(remove_usage=True)
    assert tap(VLLM_USAGE_EVENT.removesuffix(b"\n\n")) == []
    assert tap(b"") == b""
    assert tap.usage is not None
    assert tap.usage.prompt_tokens == 120_000
    assert bytes(tap.recorded) == b""


def test_a_trailing_cr_is_flushed_at_the_end() -> None:
    stream = b"data: 1\r\rdata: [DONE]\r\r"
    tap = StreamUsageTap(remove_usage=True)
    assert tap(stream) == [b"data: 1\r\r"]
    assert tap(b"") == b"data: [DONE]\r\r"


def test_recording_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage_module, "RECORDED_STREAM_LIMIT", 100)
    events = [sse(content_chunk(f"part {i}")) for i in range(5)]
    stream = b"".join(events)
    tap = StreamUsageTap(remove_usage=True)
    out = run_tap(tap, events)
    assert out == stream
    assert len(stream) > 100
    assert bytes(tap.recorded) == stream[:100]
    assert tap.recording_truncated is True


def test_recording_exactly_at_the_limit_is_not_truncated(monkeypatch: pytest.MonkeyPatch) -> None:
    event = sse(content_chunk("x"))
    monkeypatch.setattr(usage_module, "RECORDED_STREAM_LIMIT", 2 * len(event))
    tap = StreamUsageTap(remove_usage=False)
    run_tap(tap, [event, event])
    assert bytes(tap.recorded) == event * 2
    assert tap.recording_truncated is False


def test_recording_of_a_long_stream_stops_at_the_real_limit() -> None:
    event = sse(content_chunk("y" * 1000))
    count = RECORDED_STREAM_LIMIT // len(event) + 10
    tap = StreamUsageTap(remove_usage=False)
    sent = 0
    for _ in range(count):
        assert tap(event) == [event]
        sent += len(event)
    assert tap(b"") == b""
    assert sent > RECORDED_STREAM_LIMIT
    assert len(tap.recorded) == RECORDED_STREAM_LIMIT
    assert bytes(tap.recorded) == (event * count)[:RECORDED_STREAM_LIMIT]
    assert tap.recording_truncated is True


# --- recorded answers of a real llama-server (tests/data/llama_server, see its README) -------------

LLAMA_SAMPLES = Path(__file__).parent / "data" / "llama_server"


def test_a_recorded_llama_server_answer() -> None:
    usage = usage_from_body((LLAMA_SAMPLES / "chat-nonstream-cached.response.json").read_bytes())
    assert usage == UpstreamUsage(1660, 1626, 34, usage.prompt_ms if usage else None)
    assert usage is not None and usage.prompt_ms is not None and usage.prompt_ms > 0


@pytest.mark.parametrize("split", [1, 7, 64, 100_000])
def test_a_recorded_llama_server_stream_with_usage_loses_only_its_usage_chunk(split: int) -> None:
    body = (LLAMA_SAMPLES / "chat-stream-include-usage.response.sse").read_bytes()
    tap = StreamUsageTap(remove_usage=True)
    out = b"".join(_flatten(tap(body[i : i + split])) for i in range(0, len(body), split)) + _flatten(tap(b""))
    events = [e for e in body.split(b"\n\n") if e]
    assert out == b"".join(e + b"\n\n" for e in events if b'"choices":[]' not in e)
    assert tap.usage is not None
    assert (tap.usage.prompt_tokens, tap.usage.cached_tokens, tap.usage.evaluated_tokens) == (1654, 1624, 30)


def test_a_recorded_llama_server_stream_without_usage_still_reports_its_cache_in_timings() -> None:
    body = (LLAMA_SAMPLES / "chat-stream-no-usage.response.sse").read_bytes()
    tap = StreamUsageTap(remove_usage=False)
    assert _flatten(tap(body)) == body and _flatten(tap(b"")) == b""
    cache_n = max(int(n) for n in re.findall(rb'"cache_n":\s*(\d+)', body))
    assert tap.usage is not None and tap.usage.cached_tokens == cache_n  # read from the timings
    assert tap.usage.prompt_tokens == (tap.usage.cached_tokens or 0) + (tap.usage.evaluated_tokens or 0)


def _flatten(out: bytes | list[bytes]) -> bytes:
    return out if isinstance(out, bytes) else b"".join(out)


# --- long events: linear work, bounded holding ----------------------------------------------------------


def long_event(size: int) -> bytes:
    return sse(content_chunk("x" * size))


def feed_seconds(splitter: SseSplitter, stream: bytes, piece: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(stream), piece):
        splitter.feed(stream[start : start + piece])
    return time.perf_counter() - started


def test_splitting_one_long_event_costs_what_many_short_ones_do() -> None:
    """Each chunk used to re-copy and re-scan every pending byte: one 8 MiB event took seconds."""
    size, piece = 8 * 1024 * 1024, 16 * 1024
    one_event = long_event(size)
    short = sse(content_chunk("x" * 200))
    many_events = short * (len(one_event) // len(short))
    long_seconds = min(feed_seconds(SseSplitter(), one_event, piece) for _ in range(3))
    short_seconds = min(feed_seconds(SseSplitter(), many_events, piece) for _ in range(3))
    assert long_seconds < 3 * short_seconds + 0.05, (long_seconds, short_seconds)


@pytest.mark.parametrize("remove_usage", [True, False])
def test_a_long_event_goes_out_as_it_arrives_and_is_not_held(remove_usage: bool) -> None:
    big = long_event(2 * 1024 * 1024)
    stream = sse(content_chunk("a")) + big + VLLM_USAGE_EVENT + DONE
    tap = StreamUsageTap(remove_usage=remove_usage)
    sent = 0
    out = bytearray()
    for start in range(0, len(stream), 8192):
        piece = stream[start : start + 8192]
        sent += len(piece)
        out += _flatten(tap(piece))
        assert sent - len(out) <= HELD_EVENT_LIMIT + 8192 + len(VLLM_USAGE_EVENT)
    out += _flatten(tap(b""))
    expected = stream.replace(VLLM_USAGE_EVENT, b"") if remove_usage else stream
    assert bytes(out) == expected
    assert tap.usage is not None and tap.usage.prompt_tokens == VLLM_USAGE["prompt_tokens"]  # read after it
