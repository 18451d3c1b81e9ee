"""Chat messages as text: role, content (text or parts), reasoning, tool calls, any other field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .format import clip, inline

MESSAGE_KEYS_SHOWN = frozenset({"role", "content", "name", "tool_call_id", "tool_calls", "reasoning_content"})


def message_section(title: str, message: object) -> list[str]:
    if not isinstance(message, dict):
        return [f"=== {title} ===", inline(message)]
    heading = [f"{title} {message.get('role', '(no role)')}"]
    heading += [f"{key} {inline(message[key])}" for key in ("name", "tool_call_id") if key in message]
    return [f"=== {' · '.join(heading)} ===", *message_body(message)]


def message_body(message: Mapping[str, Any]) -> list[str]:
    """Reasoning, content (text or content parts), tool calls and any other field of a message."""
    lines = []
    reasoning = message.get("reasoning_content")
    content_lines = _content_lines(message.get("content"))
    if isinstance(reasoning, str) and reasoning:
        lines += ["[reasoning]", reasoning, *(["[content]"] if content_lines else [])]
    lines += content_lines
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        lines.extend(_tool_call_line(call) for call in tool_calls)
    elif tool_calls is not None:
        lines.append(f"tool_calls: {inline(tool_calls)}")
    lines += [f"{key}: {inline(value)}" for key, value in message.items() if key not in MESSAGE_KEYS_SHOWN]
    return lines or ["(no content)"]


def _content_lines(content: object) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [_content_part(part) for part in content]
    return [inline(content)]


def _content_part(part: object) -> str:
    if isinstance(part, dict):
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            text: str = part["text"]
            return text
        image = part.get("image_url")
        if part.get("type") == "image_url" and isinstance(image, dict):
            url = image.get("url")
            return f"[image: {clip(url) if isinstance(url, str) else inline(image)}]"
    return f"[{clip(inline(part))}]"


def _tool_call_line(call: object) -> str:
    if not isinstance(call, dict):
        return f"tool call: {inline(call)}"
    function = call.get("function")
    if not isinstance(function, dict):
        return f"tool call: {inline(call)}"
    arguments = function.get("arguments")
    arguments_text = arguments if isinstance(arguments, str) else inline(arguments)
    return f"tool call {call.get('id', '')}: {function.get('name', '?')}({arguments_text})"
