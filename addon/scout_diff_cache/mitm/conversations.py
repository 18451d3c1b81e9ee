"""The conversation layout (CONVERSATION_LAYOUT=append): a continuing conversation's prompt only grows.

A request that continues one the proxy remembers (``chat/conversation.py``) gets that request's
message 1 and context messages again, byte for byte at the same places, and, when the repository
changed since, one more message with what changed (``context/changes.py``) just before its new
client messages. If that would not fit the model's window, or the proxy does not know the
conversation (a new one, a restart, another replica, evicted), the request gets the fresh layout:
message 1 at HEAD and the working diff. Always correct; only the cache is lost, and it says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..chat.conversation import Conversation, Injection, chain_hashes
from ..chat.fit import ChatCounter, Fit, Window, continuation_fits
from ..chat.request import ChatRequest
from ..context.changes import changes_between
from ..context.fit import WindowBudget
from ..context.provider import ContextProvider, RepoContext
from ..context.snapshot import Snapshot
from ..context.tokens import TokenMeasure
from ..context.workdiff import WorkState
from ..git.errors import GitError
from ..settings import Settings
from .fitting import counted
from .state import ScoutState

logger = logging.getLogger(__name__)

HASH_ON_LOOP_BYTES = 1 << 20


@dataclass(frozen=True)
class Turn:
    """How this request is laid out: message 1, the context messages and where, and what to remember."""

    snapshot: Snapshot
    injections: tuple[Injection, ...]
    state: WorkState
    hashes: tuple[bytes, ...]
    description: str  # for the log, mitmweb and the metrics: "fresh", "continued", "fell back"
    fit: Fit
    changes: int = 0  # "changes" messages the conversation carries
    new_from: int = 0  # where this request's new client messages start (its own injections go there)
    retrieved: Mapping[bytes, str] = field(default_factory=dict)  # files the conversation holds in full

    def remember_in(self, state: ScoutState, client_count: int) -> None:
        conversation = Conversation(client_count, self.snapshot, self.injections, self.state, self.retrieved)
        state.conversations.remember(self.hashes, conversation)


def fresh(context: RepoContext, fit: Fit, hashes: tuple[bytes, ...], description: str) -> Turn:
    injections = (Injection(0, fit.diff.message_json, "diff"),)
    return Turn(context.snapshot, injections, fit.diff.state, hashes, description, fit)


async def message_hashes(settings: Settings, chat: ChatRequest, client_bytes: int) -> tuple[bytes, ...]:
    if settings.conversation_layout != "append" or settings.max_conversations == 0:
        return ()
    if client_bytes <= HASH_ON_LOOP_BYTES:
        return tuple(chain_hashes(chat.messages))
    return tuple(await asyncio.to_thread(chain_hashes, chat.messages))


async def continued(
    state: ScoutState,
    settings: Settings,
    provider: ContextProvider,
    chat: ChatRequest,
    context: RepoContext,
    *,
    hashes: tuple[bytes, ...],
    window: Window,
    budget: WindowBudget,
    client_bytes: int,
) -> Turn | str | None:
    """The continuing layout; why it could not be used (a str); None for a conversation it does not know."""
    prior = state.conversations.find(hashes) if hashes else None
    if prior is None:
        return None
    now = context.diff.state
    changes = None
    if prior.state != now:
        try:
            changes = await asyncio.to_thread(changes_between, provider.repo, prior.state, now, provider.diff_limits)
        except GitError as e:  # the request path reports the repository's trouble; this turn is laid out afresh
            return f"its changes could not be read: {e}"
    injections = prior.injections
    if changes is not None:
        injections = (*injections, Injection(prior.client_count, changes.message_json, "changes"))

    def fit(measure: TokenMeasure, count_chat: ChatCounter | None) -> Fit | None:
        return continuation_fits(
            window,
            prior.snapshot.planned_tokens or 0,
            [injection.message_json for injection in injections],
            chat,
            diff=context.diff,
            client_bytes=client_bytes,
            reserve=settings.answer_reserve_tokens,
            measure=measure,
            count_chat=count_chat,
        )

    fitted = await counted(state, settings, budget, fit)
    count = sum(injection.kind == "changes" for injection in injections)
    if fitted is None:
        return (
            f"with the changes since it started ({count} messages) it no longer fits the window of "
            f"{window.tokens} tokens"
        )
    return Turn(
        prior.snapshot, injections, now, hashes, "continued", fitted, count, prior.client_count, prior.retrieved
    )
