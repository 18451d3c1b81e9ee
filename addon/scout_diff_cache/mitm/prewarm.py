"""PREWARM: poll the change monitor and have the upstream prefill each new base before anyone asks."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mitmproxy import ctx
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from ..context.provider import RepoContext
from ..observe.prewarm import Prewarmer, PrewarmRequest
from ..settings import Settings
from .fitting import fitted_context
from .state import ScoutState

POLL_SECONDS = 0.5


def reverse_target(modes: Sequence[str]) -> str | None:
    """The upstream of the first ``reverse:`` mode, as scheme://host:port; None without one."""
    for spec in modes:
        mode = ProxyMode.parse(spec)
        if isinstance(mode, ReverseMode):
            host, port = mode.address
            return f"{mode.scheme}://{host}:{port}"
    return None


def prewarm_request(settings: Settings, clients_model: str | None, verify_tls: bool) -> PrewarmRequest:
    """UPSTREAM_MODEL, else the model clients last asked for, else MODEL_ID; TARGET_API_KEY."""
    return PrewarmRequest(
        settings.upstream_model or clients_model or settings.model_id,
        f"Bearer {settings.target_api_key}" if settings.target_api_key else None,
        settings.upstream_timeout_ms / 1000 if settings.upstream_timeout_ms else None,
        verify_tls,
    )


class Prewarm:
    def __init__(self, state: ScoutState, poll_seconds: float = POLL_SECONDS) -> None:
        self.state = state
        self.poll_seconds = poll_seconds
        self.prewarmer = Prewarmer(state.metrics, state.tracker)
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # hooks driven by hand, outside an event loop: nothing to poll with
        self._task = loop.create_task(self.loop(), name="scout prewarm")

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def loop(self) -> None:
        """With PREWARM on: every poll, the prewarmer prefills the upstream if HEAD got a new base."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.poll()

    async def poll(self) -> None:
        settings, provider = self.state.settings, self.state.provider
        if settings is None or provider is None or not (settings.prewarm and settings.inject_context):
            return

        async def current() -> RepoContext:
            context, _, _ = await fitted_context(self.state, settings, provider)
            return context

        await self.prewarmer.poll(
            provider.monitor.generation,
            current,
            reverse_target(ctx.options.mode),
            prewarm_request(settings, self.state.last_model, not ctx.options.ssl_insecure),
        )
