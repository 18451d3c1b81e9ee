from __future__ import annotations

import json

import pytest

from scout_diff_cache.chat.request import BadRequest, assemble_body, is_json_media_type, parse_chat_request
from scout_diff_cache.context.framing import encoded_content, system_message_json

SNAPSHOT = system_message_json('<file path="a.py">\nprint("é")\n</file>\n')
DIFF = system_message_json("The working tree is clean.\n")


def splice(body: dict[str, object] | bytes, upstream_model: str | None = None) -> dict[str, object]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    result = assemble_body(parse_chat_request(raw), [SNAPSHOT, DIFF], upstream_model)
    assert [result.body[start:end] for start, end in result.context_spans] == [SNAPSHOT, DIFF]
    parsed = json.loads(result.body)
    assert isinstance(parsed, dict)
    return parsed


def test_context_messages_come_first_then_the_clients_in_order() -> None:
    client = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
    ]
    result = splice({"model": "m", "messages": client})
    messages = result["messages"]
    assert isinstance(messages, list)
    assert messages[0] == json.loads(SNAPSHOT)
    assert messages[1] == json.loads(DIFF)
    assert messages[2:] == client


def test_every_other_field_is_kept() -> None:
    fields = {
        "model": "m",
        "temperature": 0.2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "max_tokens": 5,
        "x_vendor": None,
    }
    result = splice({**fields, "messages": [{"role": "user", "content": "hi"}]})
    assert {k: v for k, v in result.items() if k != "messages"} == fields


def test_empty_messages_has_no_dangling_comma() -> None:
    raw = assemble_body(parse_chat_request(b'{"messages": []}'), [SNAPSHOT, DIFF]).body
    assert raw == b'{"messages":[' + SNAPSHOT + b"," + DIFF + b"]}"


def test_body_with_only_messages() -> None:
    raw = assemble_body(parse_chat_request(b'{"messages":[{"role":"user","content":"x"}]}'), [SNAPSHOT, DIFF]).body
    assert raw.startswith(b'{"messages":[' + SNAPSHOT + b"," + DIFF + b",")
    assert json.loads(raw)["messages"][2] == {"role": "user", "content": "x"}


def test_snapshot_bytes_are_spliced_verbatim() -> None:
    raw = assemble_body(
        parse_chat_request(b'{"model":"m","messages":[{"role":"user","content":"x"}]}'), [SNAPSHOT, DIFF]
    ).body
    assert SNAPSHOT in raw
    assert raw.index(SNAPSHOT) < raw.index(DIFF)


def test_spans_locate_each_context_message_without_client_messages() -> None:
    result = assemble_body(parse_chat_request(b'{"messages": []}'), [SNAPSHOT])
    assert result.body == b'{"messages":[' + SNAPSHOT + b"]}"
    assert result.context_spans == ((13, 13 + len(SNAPSHOT)),)


def test_upstream_model_replaces_the_clients_model() -> None:
    assert splice({"model": "llama-4-scout", "messages": []}, "meta-llama/Llama-4-Scout")["model"] == (
        "meta-llama/Llama-4-Scout"
    )
    assert splice({"messages": []}, "served")["model"] == "served"
    assert splice({"model": "as-sent", "messages": []})["model"] == "as-sent"


def test_unicode_and_lone_surrogates_survive() -> None:
    raw = b'{"messages":[{"role":"user","content":"\\u00e9 \\ud83d\\ude00 \\ud800 \xe6\x97\xa5"}]}'
    result = splice(raw)
    messages = result["messages"]
    assert isinstance(messages, list)
    assert messages[2]["content"] == "é 😀 \ud800 日"


@pytest.mark.parametrize(
    "text",
    [
        "".join(chr(c) for c in range(0x3000)),  # every control character, quote and backslash, and beyond
        "\u2028\u2029\ufeff\U0001f600 \U0010ffff",
        'a "quoted" \\path\\ \t\r\n\x7f end',
        "",
    ],
)
def test_context_text_is_escaped_exactly_as_the_json_module_does(text: str) -> None:
    assert encoded_content(text) == json.dumps(text, ensure_ascii=False).encode("utf-8")[1:-1]
    assert json.loads(b'"' + encoded_content(text) + b'"') == text


def test_context_text_with_a_lone_surrogate_is_refused_as_before() -> None:
    with pytest.raises(UnicodeEncodeError):
        encoded_content("a\ud800b")


def test_nesting_up_to_the_limit_is_accepted() -> None:
    body = b'{"messages": [], "x": ' + b"[" * 255 + b"]" * 255 + b"}"  # the object is one level, the arrays 255
    assert _depth(splice(body)["x"]) == 255


def _depth(value: object) -> int:
    depth = 0
    while isinstance(value, list):
        depth, value = depth + 1, value[0] if value else None
    return depth


def test_duplicate_keys_resolve_once_and_the_upstream_sees_a_single_key() -> None:
    raw = b'{"messages":[{"role":"user","content":"first"}],"messages":[{"role":"user","content":"second"}]}'
    result_bytes = assemble_body(parse_chat_request(raw), [SNAPSHOT, DIFF]).body
    assert result_bytes.count(b'"messages"') == 1
    assert json.loads(result_bytes)["messages"][2]["content"] == "second"


@pytest.mark.parametrize(
    ("body", "fragment", "param"),
    [
        (b"", "empty", None),
        (b"   \n", "empty", None),
        (b"{", "not valid JSON", None),
        (b'{"messages": [}', "not valid JSON", None),
        (b"\xff\xfe{}", "not valid UTF-8", None),
        (b'{"messages": NaN}', "NaN is not allowed", None),
        (b"[]", "must be a JSON object, not an array", None),
        (b'"text"', "must be a JSON object, not a string", None),
        (b"{}", "'messages' is required", "messages"),
        (b'{"messages": {"role": "user"}}', "'messages' must be an array, not an object", "messages"),
        (b'{"messages": null}', "'messages' must be an array, not null", "messages"),
        (b'{"messages": ["hi"]}', "messages[0] must be an object, not a string", "messages[0]"),
        (b'{"messages": [{"content": "x"}]}', "messages[0].role must be a non-empty string", "messages[0].role"),
        (b'{"messages": [{"role": 1, "content": "x"}]}', "messages[0].role", "messages[0].role"),
        (
            b'{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": 5}]}',
            "messages[1].content must be a string, an array of content parts or null, not a number",
            "messages[1].content",
        ),
        (b'{"model": 3, "messages": []}', "'model' must be a string", "model"),
        (b'{"stream": "yes", "messages": []}', "'stream' must be a boolean", "stream"),
        # Python would read 1e400 as inf and write it back as Infinity, which is not JSON
        (b'{"messages": [], "temperature": 1e400}', "number out of range: 1e400", None),
        (b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", "has an integer of more than", None),
        (b'{"messages": [], "x": ' + b"[" * 256 + b"]" * 256 + b"}", "more than 256 levels deep", None),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "more than 256 levels deep", None),
    ],
)
def test_invalid_requests_are_rejected_with_a_clear_message(body: bytes, fragment: str, param: str | None) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_chat_request(body)
    assert fragment in str(raised.value)
    assert raised.value.param == param


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "function", "name": "f", "content": "{}"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
        {"role": "assistant"},
    ],
)
def test_accepted_message_shapes(message: dict[str, object]) -> None:
    result = splice({"messages": [message]})
    messages = result["messages"]
    assert isinstance(messages, list)
    assert messages[2] == message


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/vnd.api+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("", False),
        ("json", False),
    ],
)
def test_json_media_types(content_type: str, ok: bool) -> None:
    assert is_json_media_type(content_type) is ok
