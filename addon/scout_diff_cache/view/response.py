"""A chat completions response as text: a completion, an error envelope, or a stream put back together."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..chat.stream import read_stream
from .format import clip, inline, number, share
from .messages import message_body

SSE_MEDIA_TYPE = "text/event-stream"
MAX_SHOWN_BAD_EVENTS = 5
_COMPLETION_KEYS_SHOWN = frozenset({"id", "object", "created", "model", "choices", "usage", "timings"})


def render_response(body: bytes, content_type: str | None, comment: str = "") -> str:
    """A chat completions response body (a JSON completion, an error, or an SSE stream) as text.

    Raises ValueError for a body that is none of these (mitmproxy then shows it raw).
    """
    is_stream = content_type == SSE_MEDIA_TYPE or (content_type is None and not body.lstrip().startswith(b"{"))
    lines = render_stream(body) if is_stream else render_completion(json.loads(body))
    return "\n".join([comment, "", *lines] if comment else lines) + "\n"


def render_completion(data: object) -> list[str]:
    """A non-streamed completion, or an error envelope."""
    if not isinstance(data, dict):
        raise ValueError(f"a chat completion is a JSON object, not {type(data).__name__}")
    if "error" in data or data.get("object") == "error":
        return _error_lines(data.get("error", data))
    lines = [" · ".join(["chat completion", *_identity(data)])]
    choices = data.get("choices")
    for position, choice in enumerate(choices if isinstance(choices, list) else []):
        if not isinstance(choice, dict):
            lines += ["", f"=== choices[{position}] ===", inline(choice)]
            continue
        message = choice.get("message")
        lines += [
            "",
            f"=== choices[{choice.get('index', position)}] · finish_reason: {choice.get('finish_reason')} ===",
            *(message_body(message) if isinstance(message, dict) else [inline(message)]),
        ]
    lines += _usage_lines(data.get("usage"), data.get("timings"))
    lines += [f"{key}: {inline(value)}" for key, value in data.items() if key not in _COMPLETION_KEYS_SHOWN]
    return lines


def _identity(data: Mapping[str, Any]) -> list[str]:
    return [f"{key} {inline(data[key])}" for key in ("model", "id") if key in data]


def _error_lines(error: object) -> list[str]:
    if not isinstance(error, dict):
        return ["error", inline(error)]
    details = [f"{key} {inline(error[key])}" for key in ("type", "code", "param") if error.get(key) is not None]
    message = error.get("message")
    rest = [
        f"{key}: {inline(value)}" for key, value in error.items() if key not in ("type", "code", "param", "message")
    ]
    return [
        " · ".join(["error", *details]),
        message if isinstance(message, str) else inline(message),
        *rest,
    ]


def _usage_lines(usage: object, timings: object) -> list[str]:
    lines = []
    if isinstance(usage, dict):
        lines += ["", "=== usage ==="]
        prompt_tokens = usage.get("prompt_tokens")
        for key, value in usage.items():
            if key == "prompt_tokens_details" and isinstance(value, dict):
                for detail, figure in value.items():
                    part = share(figure, prompt_tokens) if detail == "cached_tokens" else ""
                    lines.append(f"{key}.{detail}: {number(figure)}{part}")
            else:
                lines.append(f"{key}: {number(value)}")
    elif usage is not None:
        lines += ["", f"usage: {inline(usage)}"]
    if isinstance(timings, dict):
        lines += ["", "=== timings (llama.cpp) ==="]
        lines += [f"{key}: {number(value)}" for key, value in timings.items()]
        cache_n, prompt_n = timings.get("cache_n"), timings.get("prompt_n")
        if type(cache_n) is int and type(prompt_n) is int:
            lines.append(f"prompt tokens reused from the cache: {cache_n:,} of {cache_n + prompt_n:,}")
    elif timings is not None:
        lines += ["", f"timings: {inline(timings)}"]
    return lines


def render_stream(body: bytes) -> list[str]:
    """A streamed completion; raises ValueError if no event holds a JSON object (mitmproxy then shows it raw)."""
    summary = read_stream(body)
    if summary.events == len(summary.undecodable):
        raise ValueError("no chat completion chunk in this event stream")
    ending = "ended with [DONE]" if summary.done else "no [DONE]: cut off, or not finished"
    lines = [
        " · ".join(["streamed chat completion", f"{summary.events} events", *_identity(summary.first_chunk), ending])
    ]
    for index, choice in sorted(summary.choices.items()):
        lines += [
            "",
            f"=== choices[{index}] · finish_reason: {choice.finish_reason} ===",
            *message_body(choice.as_message()),
        ]
    lines += _usage_lines(summary.usage, summary.timings)
    for error in summary.errors:
        lines += ["", *_error_lines(error)]
    if summary.undecodable:
        lines += ["", f"=== events that are not JSON objects ({len(summary.undecodable)}) ==="]
        lines += [clip(data) for data in summary.undecodable[:MAX_SHOWN_BAD_EVENTS]]
    return lines
