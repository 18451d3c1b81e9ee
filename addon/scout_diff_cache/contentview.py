"""A mitmproxy content view for chat completions: a rewritten 40 MB prompt, readable in milliseconds.

mitmproxy's JSON view turns a rewritten request into 40 MB of text, the snapshot one 40 MB line,
which mitmweb takes seconds to show. This view shows the request as the upstream gets it: the
client's other fields; the snapshot summarised (commit, counts, left-out files, the list of paths),
read from its JSON-encoded bytes without decoding the file contents; the working diff and the
conversation in full. Responses, streamed or not, are shown as the reassembled answer with finish
reason, usage and llama.cpp timings.

The snapshot is located through the spans the addon records in ``flow.metadata`` (byte offsets of
the two context messages in the body as sent). They are checked against the body first; a body
edited in mitmweb, or a request the proxy did not rewrite, is parsed in full instead.

Register with ``contentviews.add(CHAT_VIEW)``; remove with ``mitm_internals.remove_contentview(CHAT_VIEW)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http
from mitmproxy.contentviews import Contentview, Metadata

from .flowdata import METADATA_KEY, TRIMMED_SNAPSHOT_PREFIX
from .prompt import is_json_media_type
from .routes import CHAT_PATH, route_path
from .snapshot import APPEND_PREAMBLE, PREAMBLE, system_message_json
from .sse import iter_event_data
from .text import display

VIEW_NAME = "Scout chat"
CHAT_PRIORITY = 2.0  # above the JSON view's 1
SSE_MEDIA_TYPE = "text/event-stream"

# A context message up to this size is simply decoded; a larger one must be in the proxy's own encoding.
SMALL_MESSAGE_BYTES = 1 << 20
CLIP_CHARS = 200
MAX_SHOWN_BAD_EVENTS = 5

# The proxy's context messages are system_message_json(text): this head, the encoded text, this tail.
_SYSTEM_HEAD, _, _SYSTEM_TAIL = system_message_json("\0").partition(b"\\u0000")
# Stand-ins for the context messages: the rest of the body is parsed with these in their place.
_SNAPSHOT_STAND_IN = "\0scout-diff-cache snapshot span"
_DIFF_STAND_IN = "\0scout-diff-cache diff span"
# A line of the snapshot that starts a block, in the JSON-encoded text: an encoded newline, the
# line's encoded characters (any byte but a backslash, or an escape other than \n), the next newline.
_ENCODED_BLOCK_LINE = re.compile(rb"\\n(<(?:file|symlink) path=(?:[^\\]|\\[^n])*)(?=\\n)")
# A file line whose path needs no escape, the common case: no need to decode it.
_ENCODED_PLAIN_FILE_LINE = re.compile(rb'<file path=\\"([^\\]*)\\">')
_ENCODED_FOOTER_START = b"\\n<snapshot_info>\\n"
_FOOTER_END = "</snapshot_info>\n"
_FOOTER_COUNTS = re.compile(r"files included: (\d+), symbolic links: (\d+), bytes: (\d+)")
_SNAPSHOT_TEXT_START = PREAMBLE.partition(":")[0]  # "This is a snapshot of a git repository"
_MESSAGE_KEYS_SHOWN = frozenset({"role", "content", "name", "tool_call_id", "tool_calls", "reasoning_content"})
_COMPLETION_KEYS_SHOWN = frozenset({"id", "object", "created", "model", "choices", "usage", "timings"})
_TOOLS_NOTE = (
    "note: with tools, Llama 4's chat template writes 'Environment: ipython' (and possibly the tools) "
    "before the first system message's text, so the snapshot no longer starts the prompt: the prefix "
    "cache reuses it only for requests that carry exactly these tools."
)


# --- JSON-encoded text ---------------------------------------------------------------------------


def encode_text(text: str) -> bytes:
    """``text`` as the inside of a JSON string literal, encoded the way the proxy encodes its messages."""
    return json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "replace")


def decode_text(encoded: bytes) -> str:
    """The text of an encoded slice that starts and ends between escapes."""
    text: str = json.loads('"' + encoded.decode("utf-8", "replace") + '"')
    return text


_ENCODED_PREAMBLES = (encode_text(PREAMBLE), encode_text(APPEND_PREAMBLE))
_ENCODED_TRIMMED_PREFIX = encode_text(TRIMMED_SNAPSHOT_PREFIX)


@dataclass(frozen=True)
class EncodedText:
    """Text in JSON-encoded form (the inside of a string literal), lying at ``buffer[start:end]``.

    A 40 MB snapshot is read where it lies in the request body: slicing it out would copy it.
    """

    buffer: bytes
    start: int
    end: int

    @classmethod
    def of(cls, text: str) -> EncodedText:
        encoded = encode_text(text)
        return cls(encoded, 0, len(encoded))

    def startswith(self, prefix: bytes) -> bool:
        return self.buffer.startswith(prefix, self.start, self.end)

    def decode(self) -> str:
        return decode_text(self.buffer[self.start : self.end])


def _escaped(encoded: bytes, index: int) -> bool:
    """True if the byte at ``index`` follows an odd run of backslashes (it is part of an escape)."""
    run = 0
    while index - run > 0 and encoded[index - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


# --- the snapshot --------------------------------------------------------------------------------


@dataclass
class SnapshotSummary:
    """What the snapshot's ``<snapshot_info>`` footer says, and the block paths found in its text."""

    footer_found: bool = False
    commit: str | None = None
    file_count: int | None = None
    symlink_count: int | None = None
    block_bytes: int | None = None
    left_out: list[tuple[str, list[str]]] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)  # "path", or "path -> target" for a symlink


def summarise_snapshot(text: EncodedText) -> SnapshotSummary:
    """Summarise a snapshot from its JSON-encoded text, decoding only the footer and the block headers.

    A line inside a file that looks exactly like a block header is counted as one: the render
    compares the count with the footer's.
    """
    summary = SnapshotSummary()
    buffer = text.buffer
    # From the preamble's last newline: its example block is not a block, the first real one follows.
    preamble = next((p for p in _ENCODED_PREAMBLES if text.startswith(p)), None)
    scan_from = text.start + len(preamble) - 2 if preamble is not None else text.start
    footer_at = buffer.rfind(_ENCODED_FOOTER_START, scan_from, text.end)
    if footer_at >= 0 and not _escaped(buffer, footer_at):
        _read_footer(buffer[footer_at + 2 : text.end], summary)
    blocks_end = footer_at + 2 if summary.footer_found else text.end
    for match in _ENCODED_BLOCK_LINE.finditer(buffer, scan_from, blocks_end):
        if not _escaped(buffer, match.start()):
            entry = _block_entry(match.group(1))
            if entry is not None:
                summary.entries.append(entry)
    return summary


def _read_footer(encoded_footer: bytes, summary: SnapshotSummary) -> None:
    try:
        footer = decode_text(encoded_footer)
    except ValueError:
        return
    if not footer.endswith(_FOOTER_END):
        return
    summary.footer_found = True
    for line in footer.splitlines()[1:-1]:
        if line.startswith("commit: "):
            commit = line.removeprefix("commit: ")
            summary.commit = None if commit.startswith("none") else commit
        elif counts := _FOOTER_COUNTS.fullmatch(line):
            summary.file_count, summary.symlink_count, summary.block_bytes = map(int, counts.groups())
        elif line.startswith("  ") and summary.left_out:
            summary.left_out[-1][1].append(line[2:])
        elif line.endswith(":"):
            summary.left_out.append((line.removesuffix(":"), []))


def _block_entry(encoded_line: bytes) -> str | None:
    """The path of a ``<file path=P>`` line, or "path -> target" of a ``<symlink path=P target=T/>`` line."""
    if plain := _ENCODED_PLAIN_FILE_LINE.fullmatch(encoded_line):
        return _display_path(plain.group(1).decode("utf-8", "replace"))
    decoder = json.JSONDecoder()
    try:
        line = decode_text(encoded_line)
        if line.startswith("<file path=") and line.endswith(">"):
            path, end = decoder.raw_decode(line, len("<file path="))
            if end == len(line) - 1 and isinstance(path, str):
                return _display_path(path)
        elif line.startswith("<symlink path=") and line.endswith("/>"):
            path, end = decoder.raw_decode(line, len("<symlink path="))
            if line.startswith(" target=", end):
                target, end = decoder.raw_decode(line, end + len(" target="))
                if end == len(line) - 2 and isinstance(path, str) and isinstance(target, str):
                    return f"{_display_path(path)} -> {_display_path(target)}"
    except ValueError:
        pass
    return None


def _display_path(path: str) -> str:
    return display(path.encode("utf-8", "replace"))


def _snapshot_section(
    index: int, text: EncodedText, message_bytes: int, proxy_metadata: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """The snapshot's section, and the section listing its paths (shown last: thousands of lines).

    A snapshot trimmed from memory shows its placeholder and what the proxy recorded when it was sent.
    """
    if text.startswith(_ENCODED_TRIMMED_PREFIX):
        lines = [f"=== messages[{index}] system · snapshot, trimmed from memory ===", text.decode()]
        sent = [
            f"{label} {_inline(proxy_metadata[key])}"
            for key, label in (("commit", "commit"), ("snapshot_files", "files:"), ("snapshot_bytes", "bytes:"))
            if key in proxy_metadata
        ]
        if sent:
            lines.append("as sent: " + ", ".join(sent))
        return lines, []
    text, history = split_history(text, proxy_metadata.get("history_start"))
    summary = summarise_snapshot(text)
    lines = [f"=== messages[{index}] system · snapshot · {message_bytes:,} bytes ==="]
    if not summary.footer_found:
        lines.append("no <snapshot_info> footer found: commit and left-out files unknown")
    else:
        lines.append(f"commit: {summary.commit or 'none (no commits yet)'}")
        lines.append(
            f"files: {_count(summary.file_count)}, symbolic links: {_count(summary.symlink_count)}, "
            f"bytes of file blocks: {_count(summary.block_bytes)}"
        )
        left_out = sum(len(items) for _, items in summary.left_out)
        lines.append(f"left out: {left_out:,}" if left_out else "left out: none")
        for title, items in summary.left_out:
            lines.append(f"  {title}:")
            lines.extend(f"    {item}" for item in items)
        expected = (summary.file_count or 0) + (summary.symlink_count or 0)
        if len(summary.entries) != expected:
            lines.append(
                f"note: {len(summary.entries):,} block headers found in the text, the footer counts "
                f"{expected:,} (a file may hold a line that looks like a block header)"
            )
    if history is not None:
        lines += _history_lines(history)
    lines.append(f"paths: {len(summary.entries):,}, listed at the end")
    return lines, [f"=== snapshot paths ({len(summary.entries):,}) ===", *summary.entries]


_ENCODED_HISTORY_START = b'</snapshot_info>\\n<commit id=\\"'
_HISTORY_BLOCK = re.compile(
    r'^<commit id="([0-9a-f]+)"(?: parent="[0-9a-f]+")?>\n<message>\n(.*?)</message>\n(.*?)</commit>\n',
    re.DOTALL | re.MULTILINE,
)
_CHANGED_PATH = re.compile(
    r'^(?:diff --git a/(.*) b/|<(?:file|deleted|symlink|binary|submodule) path=("(?:[^"\\]|\\.)*"))', re.M
)


def split_history(text: EncodedText, history_start: object) -> tuple[EncodedText, str | None]:
    """The snapshot's base part and its history blocks (append-only layout), decoded; None without.

    The proxy records where the blocks start; without that (an edited body), the first footer end
    followed by a commit block is taken.
    """
    if isinstance(history_start, int) and text.start < history_start < text.end:
        start = history_start
    else:
        found = text.buffer.find(_ENCODED_HISTORY_START, text.start, text.end)
        if found < 0:
            return text, None
        start = found + len(b"</snapshot_info>\\n")
    return EncodedText(text.buffer, text.start, start), decode_text(text.buffer[start : text.end])


def _history_lines(history: str) -> list[str]:
    """One line per commit block: id, subject, changed files (the patches are not repeated here)."""
    blocks = _HISTORY_BLOCK.findall(history)
    lines = [f"history since the base: {len(blocks)} commits, {len(history.encode()):,} bytes"]
    for commit, message, changes in blocks:
        subject = message.partition("\n")[0]
        paths = [plain or _display_path(json.loads(quoted)) for plain, quoted in _CHANGED_PATH.findall(changes)]
        shown = ", ".join(paths[:8]) + (f", ... {len(paths) - 8} more" if len(paths) > 8 else "")
        lines.append(f"  {commit[:12]} {subject}  [{shown or 'no files'}]")
    return lines


# --- the request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatLayout:
    """A chat request split for display: the context messages the proxy added, then the client's."""

    fields: dict[str, Any]  # every top-level field but messages
    conversation: list[Any]  # the messages after the context ones
    snapshot: EncodedText | None = None
    snapshot_bytes: int = 0  # the snapshot message's size in the body
    diff: str | None = None
    note: str = ""


def render_request(body: bytes, proxy_metadata: Mapping[str, Any] | None, comment: str = "") -> str:
    """A chat completions request body as text; ``proxy_metadata`` is the addon's flow.metadata entry.

    Raises ValueError if the body is not a JSON object (mitmproxy then shows it raw).
    """
    layout = layout_from_spans(body, proxy_metadata) if proxy_metadata is not None else None
    if layout is None:
        layout = layout_from_full_parse(body, rewritten=proxy_metadata is not None)
    context = [
        name for name, part in (("snapshot", layout.snapshot), ("working diff", layout.diff)) if part is not None
    ]
    described = ", ".join([*context, f"{len(layout.conversation)} from the client"])
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
        section, paths = _snapshot_section(0, layout.snapshot, layout.snapshot_bytes, proxy_metadata or {})
        lines += ["", *section]
    if layout.diff is not None:
        lines += ["", "=== messages[1] system · working diff ===", layout.diff.rstrip("\n")]
    for offset, message in enumerate(layout.conversation):
        lines += ["", *_message_section(f"messages[{len(context) + offset}]", message)]
    if paths:
        lines += ["", *paths]
    return "\n".join(lines) + "\n"


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
        return ChatLayout(data, [], note=f"{note}; no 'messages' array (messages: {_clip(_inline(messages))})")
    snapshot_text = _system_text(messages[0]) if messages else None
    if snapshot_text is None or not snapshot_text.startswith((_SNAPSHOT_TEXT_START, TRIMMED_SNAPSHOT_PREFIX)):
        if not rewritten:
            note = "not rewritten by scout-diff-cache: no context added"
        return ChatLayout(data, messages, note=note)
    snapshot = EncodedText.of(snapshot_text)
    message_bytes = len(snapshot.buffer) + len(_SYSTEM_HEAD) + len(_SYSTEM_TAIL)
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
    if end - start >= len(_SYSTEM_HEAD) + len(_SYSTEM_TAIL) and (
        body.startswith(_SYSTEM_HEAD, start, end) and body.endswith(_SYSTEM_TAIL, start, end)
    ):
        return EncodedText(body, start + len(_SYSTEM_HEAD), end - len(_SYSTEM_TAIL))  # as the proxy wrote it
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
            lines.extend(f"  {_inline(tool)}" for tool in tools)
        else:
            lines.append(f"{key}: {_inline(value)}")
    return lines


def _tool_name(tool: object) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else "?"


# --- messages, as sent and as answered -----------------------------------------------------------


def _message_section(title: str, message: object) -> list[str]:
    if not isinstance(message, dict):
        return [f"=== {title} ===", _inline(message)]
    heading = [f"{title} {message.get('role', '(no role)')}"]
    heading += [f"{key} {_inline(message[key])}" for key in ("name", "tool_call_id") if key in message]
    return [f"=== {' · '.join(heading)} ===", *_message_body(message)]


def _message_body(message: Mapping[str, Any]) -> list[str]:
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
        lines.append(f"tool_calls: {_inline(tool_calls)}")
    lines += [f"{key}: {_inline(value)}" for key, value in message.items() if key not in _MESSAGE_KEYS_SHOWN]
    return lines or ["(no content)"]


def _content_lines(content: object) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [_content_part(part) for part in content]
    return [_inline(content)]


def _content_part(part: object) -> str:
    if isinstance(part, dict):
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            text: str = part["text"]
            return text
        image = part.get("image_url")
        if part.get("type") == "image_url" and isinstance(image, dict):
            url = image.get("url")
            return f"[image: {_clip(url) if isinstance(url, str) else _inline(image)}]"
    return f"[{_clip(_inline(part))}]"


def _tool_call_line(call: object) -> str:
    if not isinstance(call, dict):
        return f"tool call: {_inline(call)}"
    function = call.get("function")
    if not isinstance(function, dict):
        return f"tool call: {_inline(call)}"
    arguments = function.get("arguments")
    arguments_text = arguments if isinstance(arguments, str) else _inline(arguments)
    return f"tool call {call.get('id', '')}: {function.get('name', '?')}({arguments_text})"


# --- the response --------------------------------------------------------------------------------


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
            lines += ["", f"=== choices[{position}] ===", _inline(choice)]
            continue
        message = choice.get("message")
        lines += [
            "",
            f"=== choices[{choice.get('index', position)}] · finish_reason: {choice.get('finish_reason')} ===",
            *(_message_body(message) if isinstance(message, dict) else [_inline(message)]),
        ]
    lines += _usage_lines(data.get("usage"), data.get("timings"))
    lines += [f"{key}: {_inline(value)}" for key, value in data.items() if key not in _COMPLETION_KEYS_SHOWN]
    return lines


def _identity(data: Mapping[str, Any]) -> list[str]:
    return [f"{key} {_inline(data[key])}" for key in ("model", "id") if key in data]


def _error_lines(error: object) -> list[str]:
    if not isinstance(error, dict):
        return ["error", _inline(error)]
    details = [f"{key} {_inline(error[key])}" for key in ("type", "code", "param") if error.get(key) is not None]
    message = error.get("message")
    rest = [
        f"{key}: {_inline(value)}" for key, value in error.items() if key not in ("type", "code", "param", "message")
    ]
    return [
        " · ".join(["error", *details]),
        message if isinstance(message, str) else _inline(message),
        *rest,
    ]


def _usage_lines(usage: object, timings: object) -> list[str]:
    lines = []
    if isinstance(usage, dict):
        lines += ["", "=== usage ==="]
        prompt_tokens = usage.get("prompt_tokens")
        for key, value in usage.items():
            if key == "prompt_tokens_details" and isinstance(value, dict):
                for detail, number in value.items():
                    share = _share(number, prompt_tokens) if detail == "cached_tokens" else ""
                    lines.append(f"{key}.{detail}: {_number(number)}{share}")
            else:
                lines.append(f"{key}: {_number(value)}")
    elif usage is not None:
        lines += ["", f"usage: {_inline(usage)}"]
    if isinstance(timings, dict):
        lines += ["", "=== timings (llama.cpp) ==="]
        lines += [f"{key}: {_number(value)}" for key, value in timings.items()]
        cache_n, prompt_n = timings.get("cache_n"), timings.get("prompt_n")
        if type(cache_n) is int and type(prompt_n) is int:
            lines.append(f"prompt tokens reused from the cache: {cache_n:,} of {cache_n + prompt_n:,}")
    elif timings is not None:
        lines += ["", f"timings: {_inline(timings)}"]
    return lines


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
    identity: list[str] = field(default_factory=list)
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
        if not summary.identity:
            summary.identity = _identity(chunk)
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


def render_stream(body: bytes) -> list[str]:
    """A streamed completion; raises ValueError if no event holds a JSON object (mitmproxy then shows it raw)."""
    summary = read_stream(body)
    if summary.events == len(summary.undecodable):
        raise ValueError("no chat completion chunk in this event stream")
    ending = "ended with [DONE]" if summary.done else "no [DONE]: cut off, or not finished"
    lines = [" · ".join(["streamed chat completion", f"{summary.events} events", *summary.identity, ending])]
    for index, choice in sorted(summary.choices.items()):
        lines += [
            "",
            f"=== choices[{index}] · finish_reason: {choice.finish_reason} ===",
            *_message_body(choice.as_message()),
        ]
    lines += _usage_lines(summary.usage, summary.timings)
    for error in summary.errors:
        lines += ["", *_error_lines(error)]
    if summary.undecodable:
        lines += ["", f"=== events that are not JSON objects ({len(summary.undecodable)}) ==="]
        lines += [_clip(data) for data in summary.undecodable[:MAX_SHOWN_BAD_EVENTS]]
    return lines


# --- small formatting helpers --------------------------------------------------------------------


def _inline(value: object) -> str:
    """A field value on one line: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _clip(text: str) -> str:
    return text if len(text) <= CLIP_CHARS else f"{text[:CLIP_CHARS]}... ({len(text):,} characters)"


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _number(value: object) -> str:
    return f"{value:,}" if type(value) is int else _inline(value)


def _share(part: object, whole: object) -> str:
    if type(part) is int and type(whole) is int and whole > 0:
        return f" ({part / whole:.1%} of the prompt)"
    return ""


# --- the mitmproxy view --------------------------------------------------------------------------


class ChatContentview(Contentview):
    """Chosen by default for the requests and responses of chat completion flows, nothing else."""

    @property
    def name(self) -> str:
        return VIEW_NAME

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        flow = metadata.flow
        if not data or not isinstance(flow, http.HTTPFlow) or route_path(flow.request.path) != CHAT_PATH:
            return 0
        media_type = metadata.content_type
        if metadata.http_message is flow.request and (media_type is None or is_json_media_type(media_type)):
            return CHAT_PRIORITY
        if metadata.http_message is flow.response and (
            media_type is None or media_type == SSE_MEDIA_TYPE or is_json_media_type(media_type)
        ):
            return CHAT_PRIORITY
        return 0

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        flow = metadata.flow if isinstance(metadata.flow, http.HTTPFlow) else None
        comment = flow.comment if flow is not None else ""
        if flow is not None and flow.response is not None and metadata.http_message is flow.response:
            return render_response(data, metadata.content_type, comment)
        proxy_metadata = flow.metadata.get(METADATA_KEY) if flow is not None else None
        return render_request(data, proxy_metadata if isinstance(proxy_metadata, Mapping) else None, comment)


CHAT_VIEW = ChatContentview()
