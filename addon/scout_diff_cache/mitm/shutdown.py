"""SIGTERM and Ctrl-C: stop accepting, let requests in flight finish within STOP_GRACE_MS, exit 0.

mitmproxy's own handlers end the process at once, cutting every answer in flight, streams
included. This addon replaces them once mitmdump or mitmweb runs. On the first signal the
listeners close (open connections go on), a new request on a kept-alive connection gets a 503,
and the proxy waits for the requests in flight. When the last one ends, or STOP_GRACE_MS passes,
a request still waiting for its answer gets a 503 in the OpenAI envelope, a stream still running
ends with an error event of the same code (its upstream connection is then closed), and mitmproxy
shuts down; the exit status is 0. A second signal shuts down at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time

from mitmproxy import ctx, http
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.tools.web.master import WebMaster

from ..chat.errors import ApiError
from .hooks import error_response, headers_hook
from .internals import (
    answer_before_body,
    answer_waiting_flow,
    close_client_connections,
    close_server_connection,
    end_streamed_response,
    open_client_connections,
    stop_listeners,
)
from .state import ScoutState

logger = logging.getLogger(__name__)

STOPPING = ApiError(503, "the proxy is stopping; retry in a moment", "server_error", "proxy_stopping")
# The event that ends a stream cut by the stop: an error, as OpenAI's API sends one in a stream.
STREAM_STOPPING_EVENT = b"\n\ndata: " + json.dumps(STOPPING.envelope()).encode() + b"\n\n"
POLL_SECONDS = 0.05
DELIVERY_SECONDS = 2.0
# mitmproxy's own shutdown (its done hooks, a flow file closed) takes milliseconds; this bounds the rest.
EXIT_SECONDS = 5.0


class GracefulStop:
    def __init__(self, state: ScoutState) -> None:
        self.state = state
        self.in_flight: dict[str, http.HTTPFlow] = {}
        self.stopping = False
        self._drain: asyncio.Task[None] | None = None

    def running(self) -> None:
        if not isinstance(ctx.master, DumpMaster | WebMaster):  # the console has its own exit prompt
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.signalled, signum)

    def signalled(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            logger.warning("%s again: stopping now, %d requests cut", name, len(self._open_flows()))
            self.shut_down()
            return
        self.stopping = True
        grace_ms = self.state.settings.stop_grace_ms if self.state.settings is not None else 0
        logger.info(
            "%s: no new connections; waiting up to %.1f s for %d requests in flight (STOP_GRACE_MS; "
            "a second signal stops at once)",
            name,
            grace_ms / 1000,
            len(self._open_flows()),
        )
        self._drain = asyncio.get_running_loop().create_task(self.drain(grace_ms / 1000), name="scout drain")

    async def drain(self, grace_seconds: float) -> None:
        try:
            await self._drain_within(grace_seconds)
        except Exception:
            logger.exception("scout-diff-cache: draining the requests in flight failed; stopping now")
        finally:
            self.shut_down()

    async def _drain_within(self, grace_seconds: float) -> None:
        await stop_listeners()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while self._open_flows() and loop.time() < deadline:
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - loop.time())))
        left = self._open_flows()
        for flow in left:
            end_unfinished(flow)
        if left:
            logger.warning(
                "stopped with %d requests unfinished after STOP_GRACE_MS: answered 503, or their stream ended "
                "with an error event",
                len(left),
            )
            deadline = loop.time() + DELIVERY_SECONDS  # let the 503s and the error events reach their clients
            while any(flow.live for flow in left) and loop.time() < deadline:
                await asyncio.sleep(POLL_SECONDS / 10)
            for flow in left:
                close_server_connection(flow)  # a cut stream's upstream: it would go on generating
        else:
            logger.info("every request in flight finished; stopping")
        close_client_connections()
        deadline = loop.time() + DELIVERY_SECONDS
        while open_client_connections() and loop.time() < deadline:
            await asyncio.sleep(POLL_SECONDS / 10)

    def shut_down(self) -> None:
        """mitmproxy's shutdown, bounded: its event loop then waits for worker threads, and one may be
        blocked on a silent upstream (asking its window or tokenizer); after EXIT_SECONDS the process ends."""
        ctx.master.shutdown()  # type: ignore[no-untyped-call]
        threading.Thread(target=_exit_after, args=(EXIT_SECONDS,), name="scout exit", daemon=True).start()

    @headers_hook
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.stopping:
            raise STOPPING
        self.in_flight[flow.id] = flow

    def response(self, flow: http.HTTPFlow) -> None:
        self.in_flight.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.in_flight.pop(flow.id, None)

    def _open_flows(self) -> list[http.HTTPFlow]:
        """The requests in flight whose client is still connected."""
        for flow_id in [i for i, f in self.in_flight.items() if f.client_conn.timestamp_end is not None]:
            del self.in_flight[flow_id]
        return list(self.in_flight.values())


def end_unfinished(flow: http.HTTPFlow) -> None:
    """A 503 to a request waiting for its answer (from the upstream or from its context); an error event
    to end a stream (OpenAI's clients raise it as an APIError); else close the upstream connection."""
    if answer_waiting_flow(flow, error_response(STOPPING)):
        return
    if flow.response is None and flow.killable and answer_before_body(flow, error_response(STOPPING)):
        flow.response = error_response(STOPPING)  # what mitmweb shows; the client already has it
        return
    if end_streamed_response(flow, STREAM_STOPPING_EVENT):
        return  # the upstream connection is closed once the end has reached the client (drain)
    close_server_connection(flow)


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    logger.warning(
        "stopped, but the process had not ended %.0f s later (a worker thread waiting on a silent upstream, "
        "most likely): exiting without it",
        seconds,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
