"""At start, message 1 for HEAD is fitted to the window and built, so the first question need not wait.

The build a request would start, started by ``running`` instead: a request that arrives meanwhile
waits for the same build (it is never done twice), one that arrives later finds it ready. A
failure is only logged: the first request meets it again and answers with its envelope.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..text import short_commit
from .fitting import fitted_context
from .state import ScoutState

logger = logging.getLogger(__name__)


class WarmStart:
    def __init__(self, state: ScoutState) -> None:
        self.state = state
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # hooks driven by hand, outside an event loop
        self._task = loop.create_task(self.build(), name="scout warm start")

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def build(self) -> None:
        settings, provider = self.state.settings, self.state.provider
        if settings is None or provider is None or not settings.inject_context:
            return
        started = time.perf_counter()
        try:
            context, _, _ = await fitted_context(self.state, settings, provider)
        except Exception as e:  # the first request meets it again and says why, in its envelope
            logger.warning("message 1 was not built at start: %s: %s", type(e).__name__, e)
            return
        logger.info(
            "message 1 for %s ready %.2f s after start",
            short_commit(context.snapshot.commit),
            time.perf_counter() - started,
        )
