"""Every use of mitmproxy's private proxy internals, kept in this one module.

mitmproxy has no first-byte timeout and no public way to answer a request that is already waiting
for the upstream's response headers (``flow.kill()`` does nothing then, and the ``error`` hook
cannot change what the client gets). This module does both through the proxyserver addon's
connection handlers (pinned to mitmproxy 12.3; ``tests/test_upstream_faults.py`` fails if an
upgrade breaks it):

- ``answer_waiting_flow`` hands the flow's HTTP stream a complete response, as if the upstream had
  sent it, through the same route ``inject.websocket`` uses (``Proxyserver.inject_event``). The
  stream then runs the usual ``responseheaders``/``response`` hooks and sends it to the client.
- ``close_server_connection`` closes the flow's upstream connection, so the model server sees the
  client go away and stops generating.
- ``install_error_envelopes`` makes the answers mitmproxy writes itself to HTTP/1 clients (a
  connection the upstream refused or dropped, a broken upstream response, a malformed client
  request) OpenAI error envelopes instead of HTML pages, with 503 for a failed upstream connect.
- ``install_interim_skipping`` has mitmproxy's HTTP/1 client pass over interim (1xx) responses
  from the upstream, which it would take as the final answer and lose the real one; RFC 9110
  lets a server send any number of them, asked for or not. 101 is left to mitmproxy.
- ``restart_listeners`` binds the proxy's listeners again with the current options: mitmproxy
  binds them before it loads ``-s`` scripts, so a listen address the addon chose came too late.
- ``answer_before_body`` answers a request from its headers alone and closes the connection: the
  body is never read into memory (mitmproxy reads every body before ``request``, and a response
  set in ``requestheaders`` is only sent after it). ``linger_after_close`` keeps a closed client's
  socket draining, bounded in bytes and time, so that a client still sending its body reads the
  answer instead of a reset (closing a socket with unread data sends RST, and the client's
  kernel may drop the answer with it); nginx's "lingering close" does the same.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy import contentviews, ctx, http
from mitmproxy.connection import Client
from mitmproxy.net.http import http1
from mitmproxy.proxy import events
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import ErrorCode, ResponseData, ResponseEndOfMessage, ResponseHeaders
from mitmproxy.proxy.mode_specs import ProxyMode

logger = logging.getLogger(__name__)

LINGER_SECONDS = 10.0  # how long a refused client may go on sending before its socket is closed
LINGER_MAX_BYTES = 256 << 20  # and how much of it is read and discarded
_LINGER_READ_BYTES = 1 << 16
_UNUSED_STREAM_ID = 0  # the HTTP layer routes injected events by the flow's connection, not by this


class _InjectedResponseHeaders(ResponseHeaders, events.MessageInjected[None]):
    def __init__(self, flow: http.HTTPFlow, response: http.Response) -> None:
        self.flow = flow
        self.message = None
        self.stream_id = _UNUSED_STREAM_ID
        self.response = response
        self.end_stream = False


class _InjectedResponseData(ResponseData, events.MessageInjected[None]):
    def __init__(self, flow: http.HTTPFlow, data: bytes) -> None:
        self.flow = flow
        self.message = None
        self.stream_id = _UNUSED_STREAM_ID
        self.data = data


class _InjectedResponseEnd(ResponseEndOfMessage, events.MessageInjected[None]):
    def __init__(self, flow: http.HTTPFlow) -> None:
        self.flow = flow
        self.message = None
        self.stream_id = _UNUSED_STREAM_ID


def _proxyserver() -> Any:
    return ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]


def listen_addresses() -> list[tuple[str, int]]:
    """The (host, port) of every socket mitmproxy's proxy servers listen on now."""
    proxyserver = _proxyserver()
    if proxyserver is None:
        return []
    return [(str(address[0]), int(address[1])) for address in proxyserver.listen_addrs()]


async def restart_listeners() -> None:
    """Stop every proxy server and start them again: they bind the addresses the options give now."""
    servers = _proxyserver().servers
    await servers.update([])
    await servers.update([ProxyMode.parse(spec) for spec in ctx.options.mode])


async def stop_listeners() -> None:
    """Stop accepting connections; the open ones go on (mitmproxy closes each server without waiting)."""
    await _proxyserver().servers.update([])


def close_client_connections() -> int:
    """Close every client connection (idle kept-alive ones, at shutdown); how many were open.

    Their handlers then end by themselves: cancelled at exit instead, Python 3.12.1's stream
    callback prints each one's CancelledError with a traceback.
    """
    handlers = [
        handler
        for handler in getattr(_proxyserver(), "connections", {}).values()
        if handler.client in handler.transports
    ]
    for handler in handlers:
        handler.close_connection(handler.client)
    return len(handlers)


def open_client_connections() -> int:
    return sum(
        1 for handler in getattr(_proxyserver(), "connections", {}).values() if handler.client in handler.transports
    )


def _connection_handler(flow: http.HTTPFlow) -> Any:
    connections = getattr(_proxyserver(), "connections", {})
    return connections.get(flow.client_conn.id)


def upstream_connected(flow: http.HTTPFlow) -> bool:
    """True while the flow's upstream connection is open (the request has gone out on it)."""
    handler = _connection_handler(flow)
    return (
        handler is not None
        and flow.server_conn in handler.transports
        and flow.server_conn.timestamp_tcp_setup is not None
        and flow.server_conn.timestamp_end is None
    )


def answer_waiting_flow(flow: http.HTTPFlow, response: http.Response) -> bool:
    """Deliver ``response`` to a flow that waits for upstream response headers. False if it cannot."""
    if flow.response is not None or flow.error is not None or not upstream_connected(flow):
        return False
    proxyserver = _proxyserver()
    body = response.raw_content or b""
    response.headers["content-length"] = str(len(body))
    headers_only = http.Response(
        response.http_version.encode(),
        response.status_code,
        response.reason.encode(),
        response.headers.copy(),
        None,
        None,
        response.timestamp_start,
        response.timestamp_end,
    )
    for event in (
        _InjectedResponseHeaders(flow, headers_only),
        _InjectedResponseData(flow, body),
        _InjectedResponseEnd(flow),
    ):
        proxyserver.inject_event(event)
    return True


def end_streamed_response(flow: http.HTTPFlow, last_data: bytes) -> bool:
    """Send ``last_data`` as the end of a response being streamed to the client, then end it (a clean
    end of the chunked body). False if the flow streams no response over an open upstream connection.

    The upstream's own later bytes belong to a response already ended: close its connection next.
    """
    if flow.response is None or not flow.response.stream or flow.error is not None or not upstream_connected(flow):
        return False
    proxyserver = _proxyserver()
    for event in (_InjectedResponseData(flow, last_data), _InjectedResponseEnd(flow)):
        proxyserver.inject_event(event)
    return True


def close_server_connection(flow: http.HTTPFlow) -> bool:
    """Close the flow's upstream connection. False if there is none open."""
    handler = _connection_handler(flow)
    if handler is None or flow.server_conn not in handler.transports:
        return False
    handler.close_connection(flow.server_conn)
    return True


async def close_server_connection_when_done(flow: http.HTTPFlow, wait_seconds: float = 5.0) -> None:
    """Close the upstream connection once the flow's own response has reached the client.

    Closing earlier would make the stream report the upstream's disappearance to the client too.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    while flow.live and loop.time() < deadline:
        await asyncio.sleep(0.005)
    if close_server_connection(flow):
        logger.debug("closed the upstream connection of %s", flow.request.path)


_MITMPROXY_MAKE_ERROR_RESPONSE = _http1.make_error_response
_MITMPROXY_HTTP_STATUS_CODE = ErrorCode.http_status_code


def install_error_envelopes(render: Callable[[int, str], http.Response]) -> None:
    """Have mitmproxy's own HTTP/1 error answers rendered by ``render(status, message)``."""

    def make_error_response(status_code: int, message: str = "") -> bytes:
        response = render(status_code, message)
        response.headers["connection"] = "close"  # mitmproxy closes the connection after these
        return bytes(http1.assemble_response(response))  # type: ignore[no-untyped-call]

    def http_status_code(code: ErrorCode) -> int | None:
        if code is ErrorCode.CONNECT_FAILED:
            return 503
        return _MITMPROXY_HTTP_STATUS_CODE(code)

    _http1.make_error_response = make_error_response
    ErrorCode.http_status_code = http_status_code  # type: ignore[method-assign,assignment]


def uninstall_error_envelopes() -> None:
    _http1.make_error_response = _MITMPROXY_MAKE_ERROR_RESPONSE
    ErrorCode.http_status_code = _MITMPROXY_HTTP_STATUS_CODE  # type: ignore[method-assign]


_MITMPROXY_CLIENT_READ_HEADERS = _http1.Http1Client.read_headers
_INTERIM_STATUS_LINE = re.compile(rb"HTTP/1\.[01] 1(?!01)[0-9][0-9](?:[ \r\n])")


def _read_headers_past_interim(self: _http1.Http1Client, event: events.ConnectionEvent) -> Generator[Any, Any, None]:
    if isinstance(event, events.DataReceived) and self.request is not None:
        while _INTERIM_STATUS_LINE.match(bytes(self.buf)[:16]) and (head := self.buf.maybe_extract_lines()):
            logger.debug("passed over an interim answer from the upstream: %r", bytes(head[0]))
    yield from _MITMPROXY_CLIENT_READ_HEADERS(self, event)


def install_interim_skipping() -> None:
    _http1.Http1Client.read_headers = _read_headers_past_interim  # type: ignore[method-assign]


def uninstall_interim_skipping() -> None:
    _http1.Http1Client.read_headers = _MITMPROXY_CLIENT_READ_HEADERS  # type: ignore[method-assign]


def remove_contentview(view: contentviews.Contentview) -> None:
    """Take a view out of mitmproxy's registry (``contentviews.add(view)`` put it in).

    mitmproxy 12.3 has no public call for this (``contentviews.remove`` is a no-op kept for
    old-style views), so the registry's own dict is used, and only if it holds this instance.
    """
    views = contentviews.registry._by_name
    if views.get(view.name.lower()) is view:
        del views[view.name.lower()]


_lingering: set[asyncio.Task[None]] = set()


def _client_writer(flow: http.HTTPFlow) -> asyncio.StreamWriter | None:
    """The client's plain-TCP writer: None for TLS (mitmproxy encrypts in its layers) and non-TCP streams."""
    handler = _connection_handler(flow)
    io = handler.transports.get(flow.client_conn) if handler is not None else None
    writer = getattr(io, "writer", None)
    if not isinstance(writer, asyncio.StreamWriter) or flow.client_conn.tls or writer.is_closing():
        return None
    return writer


def answer_before_body(flow: http.HTTPFlow, response: http.Response) -> bool:
    """Send ``response`` to an HTTP/1 client now, from a ``requestheaders`` hook, and close the connection.

    The flow is killed, so mitmproxy neither reads the body nor connects upstream; the client's
    socket then lingers (``linger_after_close``). False if the connection cannot be written to
    directly (TLS, HTTP/2, no live connection): the caller sets ``flow.response`` instead.
    """
    writer = _client_writer(flow)
    if writer is None or not flow.request.http_version.startswith("HTTP/1") or not flow.killable:
        return False
    response.headers["connection"] = "close"
    response.headers["content-length"] = str(len(response.raw_content or b""))
    linger_after_close(flow)
    writer.write(bytes(http1.assemble_response(response)))  # type: ignore[no-untyped-call]
    flow.kill()  # type: ignore[no-untyped-call]  # mitmproxy sends nothing for a kill, and closes the connection
    return True


def linger_after_close(flow: http.HTTPFlow) -> None:
    """Once mitmproxy has written its answer and let go of the client's connection, drain what the client still sends.

    A duplicate of the socket keeps it open past the close; it is shut for writing (the client
    sees the answer and an end of stream), then read and discarded until the client stops,
    ``LINGER_MAX_BYTES`` were read or ``LINGER_SECONDS`` passed, and closed. mitmproxy may let go of a
    connection without closing its transport (its handler is cancelled mid-event); it is closed here.
    """
    writer = _client_writer(flow)
    if writer is None:
        return
    raw_socket = writer.get_extra_info("socket")
    if raw_socket is None:
        return
    task = asyncio.get_running_loop().create_task(_linger(flow.client_conn, writer, raw_socket.dup()))
    _lingering.add(task)
    task.add_done_callback(_lingering.discard)


async def _linger(client: Client, writer: asyncio.StreamWriter, duplicate: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_SECONDS
    try:
        while not (writer.is_closing() or client.timestamp_end is not None) or writer.transport.get_write_buffer_size():
            if loop.time() >= deadline:
                return
            await asyncio.sleep(0.005)
        writer.close()
        duplicate.setblocking(False)
        duplicate.shutdown(socket.SHUT_WR)
        drained = 0
        while drained <= LINGER_MAX_BYTES and (remaining := deadline - loop.time()) > 0:
            data = await asyncio.wait_for(loop.sock_recv(duplicate, _LINGER_READ_BYTES), remaining)
            if not data:
                return
            drained += len(data)
    except (OSError, TimeoutError):
        return
    finally:
        duplicate.close()


def stop_lingering() -> None:
    for task in list(_lingering):
        task.cancel()
