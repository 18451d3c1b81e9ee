"""The upstream's context window: learned at start and, while unknown, again after answers; shown in /health."""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, http

from ..observe.window import ContextWindow, learn_window
from .prewarm import reverse_target
from .state import ScoutState

logger = logging.getLogger(__name__)

RETRY_SECONDS = 30.0  # while the window is unknown, asked again after an answer at most this often


class WindowLearner:
    def __init__(self, state: ScoutState) -> None:
        self.state = state
        self._asking: asyncio.Task[None] | None = None
        self._last_asked = float("-inf")

    def running(self) -> None:
        self._ask()

    def response(self, flow: http.HTTPFlow) -> None:
        if self.state.window.tokens is None and time.monotonic() - self._last_asked >= RETRY_SECONDS:
            self._ask()  # the upstream answers now: it may have started after the proxy

    def done(self) -> None:
        if self._asking is not None:
            self._asking.cancel()

    def _ask(self) -> None:
        settings = self.state.settings
        base_url = reverse_target(ctx.options.mode)
        if settings is None or base_url is None or (self._asking is not None and not self._asking.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # hooks driven by hand, outside an event loop
        self._last_asked = time.monotonic()
        model = settings.upstream_model or self.state.last_model
        authorization = f"Bearer {settings.target_api_key}" if settings.target_api_key else None
        verify = not ctx.options.ssl_insecure
        self._asking = loop.create_task(self._learn(base_url, model, authorization, verify))

    async def _learn(self, base_url: str, model: str | None, authorization: str | None, verify: bool) -> None:
        window = await asyncio.to_thread(learn_window, base_url, model, authorization, verify)
        if window != self.state.window:
            self._report(window)
        self.state.window = window

    @staticmethod
    def _report(window: ContextWindow) -> None:
        if window.tokens is not None:
            logger.info("upstream context window: %d tokens (%s)", window.tokens, window.source)
        else:
            logger.warning("upstream context window unknown: %s", window.source)
