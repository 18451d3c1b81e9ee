"""The upstream's context window and tokenizer: learned at start and whenever the upstream comes back.

Asked in a thread, never on a request's path: at start, again after answers while the window is
unknown (the server may start after the proxy), and after the upstream failed and answers again
(it may have restarted with another ``--max-model-len`` or ``--ctx-size``). Shown in /health.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, http

from ..observe.tokenizer import TokenizerEndpoint, TokenizerProbe, UpstreamTokenizer, probe_tokenizer
from ..observe.window import ContextWindow, learn_window
from .prewarm import reverse_target
from .state import ScoutState

logger = logging.getLogger(__name__)

RETRY_SECONDS = 30.0  # while the window is unknown, asked again after an answer at most this often
UPSTREAM_FAILED = (502, 503, 504)


class WindowLearner:
    def __init__(self, state: ScoutState) -> None:
        self.state = state
        self._last_asked = float("-inf")
        self._upstream_failed = False

    def running(self) -> None:
        self._ask()

    def response(self, flow: http.HTTPFlow) -> None:
        """A 502/503/504 (the proxy's own for a refused or silent upstream, or the upstream's) marks it
        failed; the next other answer re-learns the window and tokenizer."""
        status = flow.response.status_code if flow.response else 0
        if status in UPSTREAM_FAILED:
            self._upstream_failed = True
            return
        came_back = self._upstream_failed
        unknown = self.state.window.tokens is None and time.monotonic() - self._last_asked >= RETRY_SECONDS
        if came_back or unknown:
            self._upstream_failed = False
            self._ask()

    def done(self) -> None:
        if self.state.learning is not None:
            self.state.learning.cancel()
        if self.state.tokenizer is not None:
            self.state.tokenizer.close()

    def _ask(self) -> None:
        settings = self.state.settings
        base_url = reverse_target(ctx.options.mode)
        learning = self.state.learning
        if settings is None or base_url is None or (learning is not None and not learning.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # hooks driven by hand, outside an event loop
        self._last_asked = time.monotonic()
        authorization = f"Bearer {settings.target_api_key}" if settings.target_api_key else None
        # The tokenizer is asked with UPSTREAM_MODEL or no model (the server's own): a client's model
        # name may be one the server does not know, and a name that changes would lose the counts.
        endpoint = TokenizerEndpoint(base_url, settings.upstream_model, authorization, not ctx.options.ssl_insecure)
        model = settings.upstream_model or self.state.last_model
        self.state.learning = loop.create_task(self._learn(endpoint, model, settings.count_snapshot_tokens))

    async def _learn(self, endpoint: TokenizerEndpoint, model: str | None, count_tokens: bool) -> None:
        window = await asyncio.to_thread(
            learn_window, endpoint.base_url, model, endpoint.authorization, endpoint.verify_tls
        )
        if window.tokens is None and self.state.window.tokens is not None:
            # Down again, or not answering yet: the window it had stays, and so does message 1's plan.
            logger.info(
                "upstream context window not re-learned (%s): keeping %d", window.source, self.state.window.tokens
            )
            return
        if window != self.state.window:
            self._report(window)
        self.state.window = window
        if count_tokens and window.tokens is not None:
            probe = await asyncio.to_thread(probe_tokenizer, endpoint)
            self._use_tokenizer(endpoint, probe)

    def _use_tokenizer(self, endpoint: TokenizerEndpoint, probe: TokenizerProbe | None) -> None:
        current = self.state.tokenizer
        if probe is None:
            if current is not None:
                current.close()
            self.state.tokenizer = None
            logger.warning("the upstream offers no tokenizer: requests are fitted to the window by estimate")
        elif current is None or (current.endpoint, current.kind, current.probe_tokens) != (
            endpoint,
            probe.kind,
            probe.probe_tokens,
        ):
            if current is not None:
                current.close()
            self.state.tokenizer = UpstreamTokenizer(endpoint, probe.kind, probe.probe_tokens)
            logger.info("token counts: %s", self.state.tokenizer.name)

    @staticmethod
    def _report(window: ContextWindow) -> None:
        if window.tokens is not None:
            logger.info("upstream context window: %d tokens (%s)", window.tokens, window.source)
        else:
            logger.warning("upstream context window unknown: %s", window.source)
