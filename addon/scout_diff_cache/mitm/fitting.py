"""Every chat request fits the model's window: message 1 planned for its share, the request checked.

The window is MAX_CONTEXT_TOKENS, else the upstream's as learned (``window.py``; the first
requests wait for it a little), else the documented default. Counting is exact through the
upstream's tokenizer when it has one; if it fails mid-way the proxy falls back to the estimate
for that request and asks for the tokenizer again later, and never fails a request for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ..chat.fit import ChatCounter, Fit, Window, answer_tokens, fit_request, fits_by_bound
from ..chat.request import ChatRequest
from ..context.fit import WindowBudget
from ..context.provider import ContextProvider, RepoContext
from ..context.tokens import TokenMeasure
from ..observe.tokenizer import TokenizeFailed
from ..observe.window import effective_window
from ..settings import Settings
from ..wiring import estimate, window_budget
from .state import ScoutState

logger = logging.getLogger(__name__)

LEARN_WAIT_SECONDS = 3.0  # a first request waits this long at most for the window to be learned


async def current_window(state: ScoutState, settings: Settings) -> Window:
    learning = state.learning
    if settings.max_context_tokens is None and learning is not None and not learning.done():
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(learning), LEARN_WAIT_SECONDS)
    window = effective_window(settings.max_context_tokens, state.window)
    assert window.tokens is not None
    return Window(window.tokens, window.source)


def measure_for(state: ScoutState, settings: Settings) -> TokenMeasure:
    if settings.count_snapshot_tokens and state.tokenizer is not None:
        return state.tokenizer
    return estimate(settings)


def _tokenizer_failed(state: ScoutState, error: TokenizeFailed) -> None:
    logger.warning("the upstream's tokenizer failed (%s): counting by estimate until it is found again", error)
    if state.tokenizer is not None:
        state.tokenizer.close()
    state.tokenizer = None


async def fitted_context(
    state: ScoutState, settings: Settings, provider: ContextProvider
) -> tuple[RepoContext, Window, WindowBudget]:
    """HEAD's context with message 1 fitted to its share of the window (and the index of what it left out started)."""
    window = await current_window(state, settings)
    budget = window_budget(settings, window.tokens, measure_for(state, settings))
    try:
        context = await provider.current(budget)
    except TokenizeFailed as e:
        _tokenizer_failed(state, e)
        budget = window_budget(settings, window.tokens, estimate(settings))
        context = await provider.current(budget)
    if state.retriever is not None and settings.retrieval_tokens != 0:
        state.retriever.start(context.snapshot)  # nothing to do when it has this message 1's index
    return context, window, budget


async def fit_chat(
    state: ScoutState,
    settings: Settings,
    context: RepoContext,
    chat: ChatRequest,
    *,
    client_bytes: int,
    window: Window,
    budget: WindowBudget,
) -> Fit:
    """The request as it fits (the diff maybe cut), or ApiError 400 context_length_exceeded."""
    context_tokens = context.snapshot.planned_tokens
    assert context_tokens is not None
    answer, _ = answer_tokens(chat.fields, settings.answer_reserve_tokens)
    quick = fits_by_bound(window, context_tokens, context.diff, chat, answer=answer, client_bytes=client_bytes)
    if quick is not None:
        return quick

    def fit(measure: TokenMeasure, count_chat: ChatCounter | None) -> Fit:
        return fit_request(
            window,
            context_tokens,
            context.diff,
            chat,
            client_bytes=client_bytes,
            reserve=settings.answer_reserve_tokens,
            measure=measure,
            count_chat=count_chat,
        )

    return await counted(state, settings, budget, fit)


async def counted[T](
    state: ScoutState,
    settings: Settings,
    budget: WindowBudget,
    count: Callable[[TokenMeasure, ChatCounter | None], T],
) -> T:
    """``count`` in a thread with the budget's measure (and the upstream's chat counter when it is exact);
    if the upstream's tokenizer fails, again with the estimate: counting never fails a request."""
    tokenizer = state.tokenizer if budget.measure is state.tokenizer else None
    try:
        return await asyncio.to_thread(count, budget.measure, tokenizer.count_chat if tokenizer is not None else None)
    except TokenizeFailed as e:
        _tokenizer_failed(state, e)
    return await asyncio.to_thread(count, estimate(settings), None)
