"""Per chat request: the left-out files its question needs, in full, in the room the window has left.

Runs once the request is laid out and known to fit (message 1, its context messages, the client's
messages and the answer), and only when message 1 left files out. The files go in one system
message where the request's own context goes: after the working diff in a fresh layout, just
before the new client messages in a continuing conversation, where later turns keep it; a file
the conversation already holds is not sent again while it is unchanged. Message 1 never changes.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from dataclasses import dataclass

from ..chat.conversation import Injection
from ..chat.fit import ChatCounter, Window
from ..chat.question import question_text
from ..chat.request import ChatRequest
from ..context.fit import TEMPLATE_TOKENS, WindowBudget
from ..context.retrieval import Lookup, Retrieved, fit_retrieved
from ..context.snapshot import Snapshot
from ..context.tokens import TokenMeasure
from ..settings import Settings
from ..text import display
from .conversations import Turn
from .fitting import counted
from .state import ScoutState

logger = logging.getLogger(__name__)

RETRIEVAL_PERCENT = 10  # RETRIEVAL_TOKENS unset: this share of the window


@dataclass(frozen=True)
class RetrievalNote:
    """What retrieval did for a request: for the metrics, x-scout-retrieval, the log and mitmweb."""

    outcome: str  # retrieved, nothing_found, no_room, index_building, failed (the metrics' labels)
    detail: str
    retrieved: Retrieved | None = None

    @property
    def files_header(self) -> str:
        """x-scout-retrieved: each path (percent-encoded) with why it was found."""
        if self.retrieved is None:
            return ""
        return ", ".join(
            f'{urllib.parse.quote(found.path, safe="/._-~")};why="{urllib.parse.quote(found.reason, safe=" ._-")}"'
            for found in self.retrieved.files
        )

    @property
    def summary(self) -> str:
        """For the log and mitmweb: 'retrieved 2 files (3,412 tokens): a.py (defines foo), b.py (score 7.1)'."""
        if self.retrieved is None:
            return f"no retrieval: {self.detail}"
        named = ", ".join(f"{display(found.path)} ({found.reason})" for found in self.retrieved.files)
        return f"retrieved {self.detail}: {named}"


def retrieval_budget(settings: Settings, window_tokens: int) -> int:
    if settings.retrieval_tokens is not None:
        return settings.retrieval_tokens
    return window_tokens * RETRIEVAL_PERCENT // 100


async def with_retrieval(
    state: ScoutState,
    settings: Settings,
    chat: ChatRequest,
    turn: Turn,
    *,
    current: Snapshot,
    window: Window,
    budget: WindowBudget,
) -> tuple[Turn, RetrievalNote | None]:
    """The turn with the retrieved files' message added; None for the note when retrieval does not apply.

    ``current``: HEAD's message 1 (a continuing conversation keeps its own): the index is of the files
    it leaves out, as they are at HEAD.
    """
    retriever = state.retriever
    if settings.retrieval_tokens == 0 or retriever is None or current.commit is None:
        return turn, None
    if current.fit is None or not current.fit.cut:
        return turn, None
    question = question_text(chat.messages)
    if not question:
        lookup = Lookup("no question")
    else:
        try:
            lookup = await retriever.lookup(current, question, turn.retrieved)
        except Exception as e:  # a bug in the search must not fail the question: it goes out without retrieval
            logger.exception("retrieval failed")
            lookup = Lookup(f"search failed: {type(e).__name__}: {e}")
    note = await _retrieved(state, settings, lookup, turn, window=window, budget=budget)
    state.metrics.retrieval(
        note.outcome,
        len(note.retrieved.files) if note.retrieved else 0,
        note.retrieved.tokens if note.retrieved else 0,
    )
    logger.info("%s (searched in %.0f ms)", note.summary, lookup.seconds * 1000)
    if note.retrieved is None:
        return turn, note
    injection = Injection(turn.new_from, note.retrieved.message_json, "retrieved")
    held = {**turn.retrieved, **{found.path: found.oid for found in note.retrieved.files}}
    return dataclasses.replace(turn, injections=(*turn.injections, injection), retrieved=held), note


async def _retrieved(
    state: ScoutState, settings: Settings, lookup: Lookup, turn: Turn, *, window: Window, budget: WindowBudget
) -> RetrievalNote:
    if lookup.status == "no question":
        return RetrievalNote("nothing_found", "no user message or tool result to search for")
    if lookup.status == "index building":
        return RetrievalNote("index_building", "the search index of the left-out files is being built")
    if lookup.status != "ready" or lookup.commit is None:
        return RetrievalNote("failed", lookup.status)
    if not lookup.found:
        return RetrievalNote("nothing_found", "no left-out file matches the question")
    room = min(retrieval_budget(settings, window.tokens), window.tokens - turn.fit.total)
    if room <= TEMPLATE_TOKENS:
        return RetrievalNote("no_room", f"{len(lookup.found)} files found, but the window has no room left")
    commit = lookup.commit
    secrets = state.retriever.limits.secrets if state.retriever is not None else None

    def fit(measure: TokenMeasure, _count_chat: ChatCounter | None) -> Retrieved | None:
        return fit_retrieved(lookup.found, room, measure, commit, secrets)

    retrieved = await counted(state, settings, budget, fit)
    if retrieved is None:
        return RetrievalNote("no_room", f"{len(lookup.found)} files found, none fits in the {room} tokens left")
    files = len(retrieved.files)
    return RetrievalNote(
        "retrieved", f"{files} file{'s' if files != 1 else ''} ({retrieved.tokens:,} tokens)", retrieved
    )
