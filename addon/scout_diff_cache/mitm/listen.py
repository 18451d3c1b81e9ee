"""Who can reach the proxy: loopback by default, no open listener without a key, no request dropped at start.

mitmproxy listens on every interface unless told otherwise, and binds its listeners before it
loads an ``-s`` script, so this addon cannot choose the address in time. It makes the default
``127.0.0.1`` in ``configure`` (the first thing it does), then, once mitmproxy is running,
binds the listeners again if they are on an address the policy does not allow. Until then, and
always, a connection that arrives on such an address is closed before anything is read from it.

A non-loopback listener (``--listen-host 0.0.0.0``, ``::``, or ``--mode ...@host:port``) is
refused at start unless ``PROXY_API_KEY`` is set or ``ALLOW_REMOTE_WITHOUT_KEY`` says the user
accepts it.

Reverse mode's default ``connection_strategy=eager`` connects upstream when a client connects and
drops the client when that fails, so with the model server down even ``/health`` would get no
answer. ``configure`` sets ``lazy`` before the first connection is accepted (mitmproxy loads the
script before it accepts) and sets it back whenever it is changed.

``tcp_timeout`` is raised past ``UPSTREAM_TIMEOUT_MS``, so a silent prefill ends in the proxy's
504, not in mitmproxy's inactivity cut, and ``body_size_limit`` is MAX_BODY_BYTES: no client can
make the proxy hold an unbounded body (a larger one gets 413 while it is being read).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import connection, ctx
from mitmproxy.proxy.mode_specs import ProxyMode

from ..chat.access import is_loopback, open_listen_hosts
from ..settings import Settings
from .internals import listen_addresses, restart_listeners
from .options import options_error
from .state import ScoutState

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
TCP_TIMEOUT_MARGIN_SECONDS = 30
TCP_TIMEOUT_UNLIMITED_SECONDS = 7 * 24 * 3600
WATCHED_OPTIONS = frozenset({"listen_host", "mode", "tcp_timeout", "connection_strategy", "body_size_limit"})


def wanted_tcp_timeout(settings: Settings) -> int:
    if not settings.upstream_timeout_ms:
        return TCP_TIMEOUT_UNLIMITED_SECONDS
    return settings.upstream_timeout_ms // 1000 + TCP_TIMEOUT_MARGIN_SECONDS


def listen_hosts(listen_host: str) -> list[str]:
    """The host each proxy mode listens on, given the default ``listen_host`` (a mode's ``@host`` wins)."""
    return [ProxyMode.parse(spec).listen_host(listen_host) for spec in ctx.options.mode]


def remote_allowed(settings: Settings | None) -> bool:
    """Whether anything but loopback may reach the proxy (never before the settings are known)."""
    return settings is not None and (settings.proxy_api_key is not None or settings.allow_remote_without_key)


class ListenGuard:
    def __init__(self, state: ScoutState) -> None:
        self.state = state
        self._settings: Settings | None = None
        self._rebind: asyncio.Task[None] | None = None
        self._writing = False  # our own option writes call configure again: nothing to do then

    def configure(self, updated: set[str]) -> None:
        settings = self.state.settings
        if self._writing or settings is None or (settings is self._settings and not updated & WATCHED_OPTIONS):
            return
        self._settings = settings
        changes: dict[str, Any] = {}
        if "connection_strategy" in ctx.options:  # an option of mitmproxy's proxy server addon
            changes["connection_strategy"] = "lazy"
        listen_host = ctx.options.listen_host or LOOPBACK  # mitmproxy's default "" is every interface
        changes["listen_host"] = listen_host
        exposed = open_listen_hosts(listen_hosts(listen_host))
        if exposed and not remote_allowed(settings):
            # mitmdump may still bind after this error, before it exits: make that a loopback bind.
            self._write({**changes, "listen_host": LOOPBACK})
            raise options_error(
                f"scout-diff-cache: refusing to listen on {', '.join(exposed)} without PROXY_API_KEY: anyone "
                "who can reach it could read the whole repository through the model. Set PROXY_API_KEY, "
                "listen on 127.0.0.1, or set ALLOW_REMOTE_WITHOUT_KEY=true to accept that."
            )
        wanted = wanted_tcp_timeout(settings)
        if ctx.options.tcp_timeout < wanted:
            logger.info(
                "tcp_timeout raised from %d to %d s: a silent upstream is bounded by UPSTREAM_TIMEOUT_MS "
                "(504), not cut by mitmproxy's inactivity timeout",
                ctx.options.tcp_timeout,
                wanted,
            )
            changes["tcp_timeout"] = wanted
        if "body_size_limit" in ctx.options:  # an option of mitmproxy's proxy server addon
            changes["body_size_limit"] = str(settings.max_body_bytes)
        self._write(changes)

    def _write(self, changes: dict[str, Any]) -> None:
        """Set mitmproxy options that differ from ``changes``, without re-entering this configure."""
        changes = {name: value for name, value in changes.items() if getattr(ctx.options, name) != value}
        if not changes:
            return
        self._writing = True
        try:
            ctx.options.update(**changes)  # type: ignore[no-untyped-call]
        finally:
            self._writing = False

    def running(self) -> None:
        """Bind again if mitmproxy bound an address the policy does not allow before this addon loaded.

        Synchronous (mitmproxy calls ``running`` that way when it reloads a script); the new bind is
        a task, which mitmproxy's eager task factory runs at once.
        """
        if not any(spec.startswith("reverse:") for spec in ctx.options.mode):
            # An error logged before start-up ends makes mitmdump exit (status 1) with this line last but one.
            logger.error(
                "scout-diff-cache runs in front of a model server, in reverse mode, and mitmproxy was started "
                "without one (mode %s): run `scout-diff-cache` (TARGET_API_URL, default http://127.0.0.1:8000), "
                "or mitmdump with --mode reverse:http://HOST:PORT",
                ",".join(ctx.options.mode),
            )
        if remote_allowed(self.state.settings):
            return
        exposed = sorted({host for host, _ in listen_addresses() if not is_loopback(host)})
        if exposed:
            logger.info(
                "listening again on %s: mitmproxy bound %s before the addon was loaded",
                ctx.options.listen_host,
                ", ".join(exposed),
            )
            self._rebind = asyncio.get_running_loop().create_task(restart_listeners(), name="scout rebind")

    def client_connected(self, client: connection.Client) -> None:
        """Close a connection that reached the proxy on an address the policy does not allow, unread."""
        if remote_allowed(self.state.settings) or is_loopback(str(client.sockname[0])):
            return
        client.error = f"scout-diff-cache: refused a connection to {client.sockname[0]} (loopback only)"
        logger.warning(
            "refused a connection from %s to %s: without PROXY_API_KEY the proxy answers loopback only",
            client.peername[0],
            client.sockname[0],
        )
