"""The question a request asks, for retrieval: its latest user message and the latest tool results.

In an agent's loop the conversation ends with the user's request, then assistant turns calling
tools and the tools' results; what the next answer needs is named in both. Only text counts
(strings and text parts); each message is read up to ``MAX_QUESTION_CHARS``, all of them up to
twice that (ranking needs no more; nothing is cut from what is sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MAX_QUESTION_CHARS = 65536


def message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content[:MAX_QUESTION_CHARS]
    if isinstance(content, list):
        texts = [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
        return "\n".join(texts)[:MAX_QUESTION_CHARS]
    return ""


def question_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The latest user message, then the tool results after the latest assistant message ("" if none)."""
    tool_results: list[str] = []
    user = ""
    in_tail = True  # still among the messages after the latest assistant message
    for message in reversed(messages):
        role = message.get("role")
        if role == "user":
            user = message_text(message)
            break
        if role == "assistant":
            in_tail = False
        elif role in ("tool", "function") and in_tail:
            tool_results.append(message_text(message))
    return "\n".join([user, *reversed(tool_results)]).strip()[: 2 * MAX_QUESTION_CHARS]
