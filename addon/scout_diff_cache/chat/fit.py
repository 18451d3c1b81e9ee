"""Does a chat request fit the model's context window? If not: the working diff shrinks, then a 400.

A request needs message 1 (fixed per base: never changed to make room, that would defeat the
cache), the working diff, the client's messages and room for the answer (``max_completion_tokens``
or ``max_tokens``, else ``ANSWER_RESERVE_TOKENS``). Counting is skipped while the byte bound says
it fits (context/tokens.py); near the edge the diff and the messages are counted (exactly with the
upstream's tokenizer). When it does not fit, the diff keeps its file patches in path order while
they fit, and names the rest; if even an empty diff does not fit, the proxy answers its own 400
``context_length_exceeded`` and forwards nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..context.fit import BLOCK_SLACK_TOKENS, TEMPLATE_TOKENS
from ..context.tokens import BYTE_BOUND, TokenMeasure
from ..context.workdiff import WorkingDiff, cut_to_fit
from .errors import ApiError
from .request import ChatRequest

MESSAGE_TEMPLATE_TOKENS = 16  # a chat template's tokens around one message, with room to spare

ChatCounter = Callable[[list[object], object | None], int]


@dataclass(frozen=True)
class Window:
    tokens: int
    source: str


@dataclass(frozen=True)
class Fit:
    """What goes out: the diff (cut or not) and the tokens each part was counted at."""

    diff: WorkingDiff
    context_tokens: int
    diff_tokens: int
    messages_tokens: int
    answer_tokens: int
    counted_by: str  # "byte bound" when the bound showed it fits, else the measure's name
    diff_cut: bool = False

    @property
    def total(self) -> int:
        return self.context_tokens + self.diff_tokens + self.messages_tokens + self.answer_tokens


def answer_tokens(fields: dict[str, object], reserve: int) -> tuple[int, str]:
    """The room the answer needs, and where that figure came from."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = fields.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, name
    return reserve, "ANSWER_RESERVE_TOKENS"


def has_only_text(chat: ChatRequest) -> bool:
    """True when every content part is text: then the byte bound holds (an image's tokens are not its bytes)."""
    for message in chat.messages:
        content = message.get("content")
        if isinstance(content, list) and any(not (isinstance(p, dict) and p.get("type") == "text") for p in content):
            return False
    return True


def messages_json(chat: ChatRequest) -> str:
    return json.dumps([chat.messages, chat.fields.get("tools")], ensure_ascii=False, separators=(",", ":"))


def messages_bound(chat: ChatRequest, client_bytes: int) -> int | None:
    """Never fewer than the messages' prompt tokens, for text-only requests; None otherwise.

    ``client_bytes``: the size of the client's (decoded) JSON body, which holds every character
    of the messages and tools, escaped or not: no re-encoding on the event loop.
    """
    if not has_only_text(chat):
        return None
    return client_bytes + MESSAGE_TEMPLATE_TOKENS * (len(chat.messages) + 1)


def count_messages(chat: ChatRequest, measure: TokenMeasure, count_chat: ChatCounter | None) -> int:
    """Blocking: the client's messages (and tools) as the upstream's template makes them, or by ``measure``."""
    if count_chat is not None:
        return count_chat(list(chat.messages), chat.fields.get("tools"))
    return measure.count([messages_json(chat)])[0] + MESSAGE_TEMPLATE_TOKENS * (len(chat.messages) + 1)


def fits_by_bound(
    window: Window, context_tokens: int, diff: WorkingDiff, chat: ChatRequest, *, answer: int, client_bytes: int
) -> Fit | None:
    """The cheap check, on the event loop: a Fit if the byte bound shows it fits, else None (count it)."""
    bound = messages_bound(chat, client_bytes)
    diff_bound = diff.size + TEMPLATE_TOKENS  # its JSON encoding: never shorter than its UTF-8 text
    if bound is not None and context_tokens + diff_bound + bound + answer <= window.tokens:
        return Fit(diff, context_tokens, diff_bound, bound, answer, BYTE_BOUND.name)
    return None


def fit_request(
    window: Window,
    context_tokens: int,
    diff: WorkingDiff,
    chat: ChatRequest,
    *,
    client_bytes: int,
    reserve: int,
    measure: TokenMeasure,
    count_chat: ChatCounter | None,
) -> Fit:
    """Blocking (it may ask the upstream's tokenizer): the request as it fits, or ApiError 400."""
    answer, answer_source = answer_tokens(chat.fields, reserve)
    quick = fits_by_bound(window, context_tokens, diff, chat, answer=answer, client_bytes=client_bytes)
    if quick is not None:
        return quick
    messages = count_messages(chat, measure, count_chat)
    overhead = BLOCK_SLACK_TOKENS + TEMPLATE_TOKENS
    diff_tokens = measure.count([diff.text])[0] + overhead
    fit = Fit(diff, context_tokens, diff_tokens, messages, answer, measure.name)
    if fit.total <= window.tokens:
        return fit
    room = window.tokens - context_tokens - messages - answer
    if diff.parts is not None and diff.parts.patches:
        empty = cut_to_fit(diff, 0, window.tokens)
        note_tokens = measure.count([empty.text])[0] + overhead  # the largest note: every file named
        used, keep = note_tokens, 0
        for tokens in measure.count(diff.parts.patches):
            if used + tokens + BLOCK_SLACK_TOKENS > room:
                break
            used += tokens + BLOCK_SLACK_TOKENS
            keep += 1
        cut = cut_to_fit(diff, keep, window.tokens)
        cut_tokens = measure.count([cut.text])[0] + overhead
        if cut_tokens <= room:
            return Fit(cut, context_tokens, cut_tokens, messages, answer, measure.name, diff_cut=True)
        fit = Fit(empty, context_tokens, min(note_tokens, diff_tokens), messages, answer, measure.name, True)
    raise too_long(window, fit, answer_source)


def too_long(window: Window, fit: Fit, answer_source: str) -> ApiError:
    return ApiError(
        400,
        f"This request needs about {fit.total} tokens but the model's context window is {window.tokens} "
        f"({window.source}), {fit.total - window.tokens} over"
        f"{', even with the working diff cut to its list of files' if fit.diff_cut else ''}: "
        f"the repository context (message 1) takes {fit.context_tokens}, the working diff "
        f"{fit.diff_tokens}, your messages {fit.messages_tokens}, and the answer {fit.answer_tokens} "
        f"({answer_source}). Shorten the conversation (or start a new one), lower "
        "max_tokens, or give the repository a smaller share of the window (SNAPSHOT_WINDOW_PERCENT).",
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )


def continuation_fits(
    window: Window,
    context_tokens: int,
    injected: Sequence[bytes],
    chat: ChatRequest,
    *,
    diff: WorkingDiff,
    client_bytes: int,
    reserve: int,
    measure: TokenMeasure,
    count_chat: ChatCounter | None,
) -> Fit | None:
    """Blocking: message 1, the injected messages (JSON) and the client's messages, if they fit together.

    The Fit's diff tokens are the injected messages'; its ``diff`` is the working diff, not sent.
    """
    answer, _ = answer_tokens(chat.fields, reserve)
    bound = messages_bound(chat, client_bytes)
    injected_bound = sum(len(message) + TEMPLATE_TOKENS for message in injected)
    if bound is not None and context_tokens + injected_bound + bound + answer <= window.tokens:
        return Fit(diff, context_tokens, injected_bound, bound, answer, BYTE_BOUND.name)
    texts = [str(json.loads(message)["content"]) for message in injected]
    injected_tokens = sum(measure.count(texts)) + TEMPLATE_TOKENS * len(texts)
    messages = count_messages(chat, measure, count_chat)
    fit = Fit(diff, context_tokens, injected_tokens, messages, answer, measure.name)
    return fit if fit.total <= window.tokens else None
