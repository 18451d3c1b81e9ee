"""Prompt assembly: validate the client's chat request and splice the cached context messages in.

Only the client's own (small) body is parsed. The snapshot and diff messages arrive already
JSON-encoded and are joined in as bytes, so a 40 MB snapshot is never re-encoded per request.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Deeper bodies are refused: Python's json recursion would otherwise fail at some stack-dependent depth.
MAX_NESTING = 256
TOO_DEEP = f"request body nests arrays and objects more than {MAX_NESTING} levels deep"


class BadRequest(Exception):
    """The body is not a valid chat completions request; the message tells the client why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    """A parsed chat request: its messages, and every other top-level field as sent."""

    fields: dict[str, Any]
    messages: list[dict[str, Any]]


def is_json_media_type(content_type: str) -> bool:
    """application/json or any application/*+json, parameters (charset) ignored."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"request body is not valid JSON: {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a float would re-encode as Infinity, which is not JSON
        raise BadRequest(f"request body has a number out of range: {_clip(text)}")
    return value


def _clip(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def _nesting(value: object) -> int:
    """How deep arrays and objects nest in ``value`` (a scalar is 0), a level at a time, without recursion."""
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level and depth <= MAX_NESTING:
        depth += 1
        level = [
            child
            for item in level
            for child in (item.values() if type(item) is dict else item)
            if type(child) is dict or type(child) is list
        ]
    return depth


def parse_chat_request(body: bytes) -> ChatRequest:
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object with a 'messages' array")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except ValueError:  # the one other failure: an integer longer than int() accepts
        raise BadRequest(f"request body has an integer of more than {sys.get_int_max_str_digits()} digits") from None
    except RecursionError:  # nested far deeper than MAX_NESTING
        raise BadRequest(TOO_DEEP) from None
    if _nesting(data) > MAX_NESTING:
        raise BadRequest(TOO_DEEP)
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {_json_type(data)}")
    if "messages" not in data:
        raise BadRequest("'messages' is required", "messages")
    messages = data.pop("messages")
    if not isinstance(messages, list):
        raise BadRequest(f"'messages' must be an array, not {_json_type(messages)}", "messages")
    for index, message in enumerate(messages):
        _check_message(index, message)
    if "model" in data and not isinstance(data["model"], str):
        raise BadRequest(f"'model' must be a string, not {_json_type(data['model'])}", "model")
    if "stream" in data and not isinstance(data["stream"], bool | None):
        raise BadRequest(f"'stream' must be a boolean, not {_json_type(data['stream'])}", "stream")
    return ChatRequest(fields=data, messages=messages)


def _check_message(index: int, message: object) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be an object, not {_json_type(message)}", where)
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequest(f"{where}.role must be a non-empty string", f"{where}.role")
    content = message.get("content")
    if not isinstance(content, str | list | None):
        raise BadRequest(
            f"{where}.content must be a string, an array of content parts or null, not {_json_type(content)}",
            f"{where}.content",
        )


def _json_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case dict():
            return "an object"
    return type(value).__name__


def _compact(value: object) -> bytes:
    # ASCII escapes keep lone surrogates from the client (legal in JSON) encodable.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class AssembledBody:
    """The upstream body, and where each context message lies in it (``body[start:end]``)."""

    body: bytes
    context_spans: tuple[tuple[int, int], ...]


def assemble_body(
    request: ChatRequest,
    context_messages: list[bytes],
    upstream_model: str | None = None,
    injections: Sequence[tuple[int, bytes]] = (),
) -> AssembledBody:
    """The upstream body: the client's fields, then ``messages`` = context messages + client messages.

    ``injections``: (position, message) pairs, each put before the client message at that position
    (a continuing conversation's earlier context messages); spans list them after the context messages.
    """
    fields = dict(request.fields)
    if upstream_model is not None:
        fields["model"] = upstream_model
    head = _compact(fields)[:-1]  # drop the closing brace
    separator = b"," if len(head) > 1 else b""
    if injections:  # the same bytes as the whole list's encoding, cut at message boundaries
        client = [_compact(message) for message in request.messages]
    else:
        client = [_compact(request.messages)[1:-1]] if request.messages else []
    parts = [head, separator, b'"messages":[']
    offset = sum(map(len, parts))
    spans = []
    pending = sorted(injections, key=lambda injection: injection[0])
    items: list[tuple[bytes, bool]] = [(message, True) for message in context_messages]
    for index, message in enumerate(client):
        while pending and pending[0][0] <= index:
            items.append((pending.pop(0)[1], True))
        items.append((message, False))
    items.extend((message, True) for _, message in pending)
    for index, (data, injected) in enumerate(items):
        if index:
            parts.append(b",")
            offset += 1
        parts.append(data)
        if injected:
            spans.append((offset, offset + len(data)))
        offset += len(data)
    parts.append(b"]}")
    return AssembledBody(b"".join(parts), tuple(spans))  # one copy of the snapshot's bytes, not two
