"""A streamed chat completion (server-sent events) put back together, as the client received it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .sse import iter_event_data


@dataclass
class StreamedToolCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamedChoice:
    role: str = ""
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, StreamedToolCall] = field(default_factory=dict)
    finish_reason: object = None

    def as_message(self) -> dict[str, Any]:
        """The reassembled answer in the shape of a non-streamed choice's message."""
        message: dict[str, Any] = {"role": self.role or "assistant", "content": "".join(self.content) or None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "function": {"name": call.name, "arguments": "".join(call.arguments)}}
                for _, call in sorted(self.tool_calls.items())
            ]
        return message


@dataclass
class StreamSummary:
    """A chat completions SSE stream put back together."""

    events: int = 0
    done: bool = False
    first_chunk: dict[str, Any] = field(default_factory=dict)  # model, id: from the first chunk
    choices: dict[int, StreamedChoice] = field(default_factory=dict)
    usage: object = None
    timings: object = None
    errors: list[object] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)


def read_stream(body: bytes) -> StreamSummary:
    """Join the chunks' deltas (content, reasoning, tool call fragments by index); keep the last usage and timings."""
    summary = StreamSummary()
    for data in iter_event_data(body):
        summary.events += 1
        if data.strip() == "[DONE]":
            summary.done = True
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            summary.undecodable.append(data)
            continue
        if not summary.first_chunk:
            summary.first_chunk = chunk
        if "error" in chunk:
            summary.errors.append(chunk["error"])
        if chunk.get("usage") is not None:
            summary.usage = chunk["usage"]
        if chunk.get("timings") is not None:
            summary.timings = chunk["timings"]
        choices = chunk.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else []):
            if isinstance(choice, dict):
                index = choice.get("index", position)
                _apply_delta(
                    summary.choices.setdefault(index if type(index) is int else position, StreamedChoice()), choice
                )
    return summary


def _apply_delta(streamed: StreamedChoice, choice: Mapping[str, Any]) -> None:
    if choice.get("finish_reason") is not None:
        streamed.finish_reason = choice["finish_reason"]
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    if isinstance(delta.get("role"), str):
        streamed.role = delta["role"]
    if isinstance(delta.get("content"), str):
        streamed.content.append(delta["content"])
    reasoning = delta.get("reasoning_content", delta.get("reasoning"))
    if isinstance(reasoning, str):
        streamed.reasoning.append(reasoning)
    tool_calls = delta.get("tool_calls")
    for position, fragment in enumerate(tool_calls if isinstance(tool_calls, list) else []):
        if not isinstance(fragment, dict):
            continue
        index = fragment.get("index", position)
        call = streamed.tool_calls.setdefault(index if type(index) is int else position, StreamedToolCall())
        if isinstance(fragment.get("id"), str) and fragment["id"]:
            call.id = fragment["id"]
        function = fragment.get("function")
        if isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name != call.name:  # some engines repeat the name in every fragment
                call.name += name
            if isinstance(function.get("arguments"), str):
                call.arguments.append(function["arguments"])
