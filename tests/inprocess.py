"""The proxy's addon list in-process (mitmproxy's taddons), driven the way mitmdump drives a script."""

from __future__ import annotations

from mitmproxy import addonmanager, ctx, hooks, http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook, HttpResponseHook

from scout_diff_cache.context.provider import ContextProvider
from scout_diff_cache.mitm import make_addons
from scout_diff_cache.mitm.state import ScoutState
from scout_diff_cache.settings import Settings


class ScoutAddons:
    """``addon/scout.py``'s ``addons`` under one object, as mitmproxy holds a loaded script.

    Register it with ``taddons.context(scout)``; configure it with ``tctx.configure(scout, ...)``.
    Its own methods are not named after hooks: mitmproxy would call them as the container's hooks.
    A hook reaches every addon in order, and an exception is logged and ends the hook for the
    rest of the list, as in mitmdump.
    """

    def __init__(self) -> None:
        self.state = ScoutState()
        self.addons = make_addons(self.state)

    @property
    def settings(self) -> Settings | None:
        return self.state.settings

    @property
    def provider(self) -> ContextProvider | None:
        return self.state.provider

    def get[A](self, kind: type[A]) -> A:
        """The addon of this type."""
        (found,) = [addon for addon in self.addons if isinstance(addon, kind)]
        return found

    async def fire(self, hook: hooks.Hook) -> None:
        with addonmanager.safecall():
            await ctx.master.addons.invoke_addon(self, hook)

    async def send_request(self, flow: http.HTTPFlow) -> None:
        """``requestheaders``, then (unless a hook killed the flow) ``request``, as mitmproxy runs them."""
        await self.fire(HttpRequestHeadersHook(flow))
        if flow.error is None:
            await self.fire(HttpRequestHook(flow))

    async def send_response(self, flow: http.HTTPFlow) -> None:
        await self.fire(HttpResponseHook(flow))

    def start(self) -> None:
        ctx.master.addons.invoke_addon_sync(self, hooks.RunningHook())

    def stop(self) -> None:
        for addon in self.addons:
            done = getattr(addon, "done", None)
            if done is not None:
                done()
