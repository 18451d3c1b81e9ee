"""A chat completions request as text: the client's fields, the context messages, the conversation.

The context messages are located through the spans the addon records in ``flow.metadata`` (byte
offsets of the two messages in the body as sent). They are checked against the body first; a body
edited in mitmweb, or a request the proxy did not rewrite, is parsed in full instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..context.changes import TEXT_START as CHANGES_TEXT_START
from ..context.framing import MESSAGE_END, MESSAGE_HEAD, TRIMMED_SNAPSHOT_PREFIX, message_content_span
from ..context.retrieval import TEXT_START as RETRIEVAL_TEXT_START
from ..context.snapshot import BASE_LINE_START, PREAMBLE
from .format import clip, inline
from .messages import message_section
from .snapshot import BlockIndex, EncodedText, snapshot_section

# A context message up to this size is simply decoded; a larger one must be in the proxy's own encoding.
SMALL_MESSAGE_BYTES = 1 << 20
# Stand-ins for the context messages: the rest of the body is parsed with these in their place.
_SNAPSHOT_STAND_IN = "\0scout-diff-cache snapshot span"
_DIFF_STAND_IN = "\0scout-diff-cache diff span"
_FILE_BLOCK_PATH = re.compile(r'^<file path=("(?:[^"\\\n]|\\.)*")>$', re.MULTILINE)
# Message 1 starts "This is a snapshot of a git repository" (per-commit layout) or "Base commit: " (append).
_SNAPSHOT_TEXT_STARTS = (PREAMBLE.partition(":")[0], BASE_LINE_START)
_TOOLS_NOTE = (
    "note: with tools, Llama 4's chat template writes 'Environment: ipython' (and possibly the tools) "
    "before the first system message's text, so the snapshot no longer starts the prompt: the prefix "
    "cache reuses it only for requests that carry exactly these tools."
)


@dataclass(frozen=True)
class ChatLayout:
    """A chat request split for display: the context messages the proxy added, then the client's."""

    fields: dict[str, Any]  # every top-level field but messages
    conversation: list[Any]  # the messages after the context ones
    snapshot: EncodedText | None = None
    snapshot_bytes: int = 0  # the snapshot message's size in the body
    diff: str | None = None
    note: str = ""


def render_request(
    body: bytes, proxy_metadata: Mapping[str, Any] | None, comment: str = "", index: BlockIndex | None = None
) -> str:
    """A chat completions request body as text; ``proxy_metadata`` is the addon's flow.metadata entry.

    ``index`` locates the snapshot's blocks, as the proxy recorded them when it built the snapshot.

    Raises ValueError if the body is not a JSON object (mitmproxy then shows it raw).
    """
    layout = layout_from_spans(body, proxy_metadata) if proxy_metadata is not None else None
    if layout is None:
        layout = layout_from_full_parse(body, rewritten=proxy_metadata is not None)
    context = [
        name for name, part in (("snapshot", layout.snapshot), ("working diff", layout.diff)) if part is not None
    ]
    kinds = [injected_kind(message) if proxy_metadata else None for message in layout.conversation]
    injected = [
        f"{count} {name}{'s' if count != 1 else ''}"
        for kind, name in (("changes", "change message"), ("retrieved", "retrieved-files message"))
        if (count := kinds.count(kind))
    ]
    own = kinds.count(None)
    described = ", ".join([*context, *injected, f"{own} from the client"])
    lines = [comment, ""] if comment else []
    lines.append(
        f"chat completion request · {len(body):,} bytes · {len(context) + len(layout.conversation)} messages: "
        + described
    )
    if layout.note:
        lines.append(f"note: {layout.note}")
    lines += _field_lines(layout.fields)
    paths: list[str] = []
    if layout.snapshot is not None:
        section, paths = snapshot_section(0, layout.snapshot, layout.snapshot_bytes, proxy_metadata or {}, index)
        lines += ["", *section]
    if layout.diff is not None:
        lines += ["", "=== messages[1] system · working diff ===", layout.diff.rstrip("\n")]
    for offset, (message, kind) in enumerate(zip(layout.conversation, kinds, strict=True)):
        title = f"messages[{len(context) + offset}]"
        if kind == "changes":
            title += " (changes since the previous context message, injected by the proxy)"
        elif kind == "retrieved":
            title += " (left-out files retrieved for the question, injected by the proxy)"
        section = message_section(title, message)
        if kind == "retrieved":
            section.insert(1, "files: " + ", ".join(retrieved_paths(message["content"])))
        lines += ["", *section]
    if paths:
        lines += ["", *paths]
    return "\n".join(lines) + "\n"


def injected_kind(message: object) -> str | None:
    """ "changes" or "retrieved" for a context message the proxy put among the client's; None otherwise."""
    if not isinstance(message, dict) or message.get("role") != "system":
        return None
    content = message.get("content")
    if not isinstance(content, str):
        return None
    if content.startswith(CHANGES_TEXT_START):
        return "changes"
    return "retrieved" if content.startswith(RETRIEVAL_TEXT_START) else None


def retrieved_paths(content: str) -> list[str]:
    """The paths of the file blocks in a retrieval message."""
    return [json.loads(quoted) for quoted in _FILE_BLOCK_PATH.findall(content)]


def layout_from_spans(body: bytes, proxy_metadata: Mapping[str, Any]) -> ChatLayout | None:
    """The layout read through the recorded spans, without decoding the snapshot; None if they do not fit.

    The spans fit if the body parses as JSON with two stand-ins put in their place, the stand-ins
    land as messages[0] and messages[1], and both spans hold system messages.
    """
    spans = [_span(proxy_metadata.get(key)) for key in ("snapshot_span", "diff_span")]
    if spans[0] is None or spans[1] is None:
        return None
    (snapshot_start, snapshot_end), (diff_start, diff_end) = spans[0], spans[1]
    if not 0 <= snapshot_start < snapshot_end <= diff_start < diff_end <= len(body):
        return None
    rest = b"".join(
        (
            body[:snapshot_start],
            json.dumps(_SNAPSHOT_STAND_IN).encode(),
            body[snapshot_end:diff_start],
            json.dumps(_DIFF_STAND_IN).encode(),
            body[diff_end:],
        )
    )
    try:
        data = json.loads(rest)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    messages = data.pop("messages", None)
    if not isinstance(messages, list) or messages[:2] != [_SNAPSHOT_STAND_IN, _DIFF_STAND_IN]:
        return None
    snapshot = _system_message_text(body, snapshot_start, snapshot_end)
    diff = _system_message_text(body, diff_start, diff_end)
    if snapshot is None or diff is None:
        return None
    try:
        diff_text = diff.decode()
    except ValueError:
        return None
    return ChatLayout(data, messages[2:], snapshot, snapshot_end - snapshot_start, diff_text)


def layout_from_full_parse(body: bytes, rewritten: bool) -> ChatLayout:
    """The layout from the whole body decoded; a leading snapshot (or its placeholder) is recognised by its text."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError(f"a chat request is a JSON object, not {type(data).__name__}")
    messages = data.pop("messages", None)
    if rewritten:
        note = "the body no longer matches the context spans the proxy recorded (edited?): parsed in full"
    else:
        note = "no scout-diff-cache metadata on this flow: parsed in full"
    if not isinstance(messages, list):
        return ChatLayout(data, [], note=f"{note}; no 'messages' array (messages: {clip(inline(messages))})")
    snapshot_text = _system_text(messages[0]) if messages else None
    if snapshot_text is None or not snapshot_text.startswith((*_SNAPSHOT_TEXT_STARTS, TRIMMED_SNAPSHOT_PREFIX)):
        if not rewritten:
            note = "not rewritten by scout-diff-cache: no context added"
        return ChatLayout(data, messages, note=note)
    snapshot = EncodedText.of(snapshot_text)
    message_bytes = len(snapshot.buffer) + len(MESSAGE_HEAD) + len(MESSAGE_END)
    diff = _system_text(messages[1]) if len(messages) > 1 else None
    conversation = messages[1:] if diff is None else messages[2:]
    return ChatLayout(data, conversation, snapshot, message_bytes, diff, note)


def _span(value: object) -> tuple[int, int] | None:
    """A recorded (start, end) span; a list after a flow file round trip."""
    if isinstance(value, Sequence) and len(value) == 2 and all(type(x) is int for x in value):
        return value[0], value[1]
    return None


def _system_message_text(body: bytes, start: int, end: int) -> EncodedText | None:
    """The encoded text of the system message at ``body[start:end]``; None if it is not one."""
    content = message_content_span(body, start, end)
    if content is not None:
        return EncodedText(body, *content)  # as the proxy wrote it
    if end - start > SMALL_MESSAGE_BYTES:
        return None
    try:
        text = _system_text(json.loads(body[start:end]))
    except ValueError:
        return None
    return None if text is None else EncodedText.of(text)


def _system_text(message: object) -> str | None:
    if isinstance(message, dict) and message.get("role") == "system" and isinstance(message.get("content"), str):
        text: str = message["content"]
        return text
    return None


def _field_lines(fields: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, value in fields.items():
        if key == "tools" and value is not None:
            tools = value if isinstance(value, list) else [value]
            names = [_tool_name(tool) for tool in tools]
            lines.append(f"tools ({len(tools)}): {', '.join(names)}")
            lines.append(f"  {_TOOLS_NOTE}")
            lines.extend(f"  {inline(tool)}" for tool in tools)
        else:
            lines.append(f"{key}: {inline(value)}")
    return lines


def _tool_name(tool: object) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else "?"
