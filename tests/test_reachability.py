"""The shared reachability probe, against real loopback listeners: what the listener accepts is counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from scout_diff_cache.chat.upstream import ReachabilityProbe
from support import free_port


class CountingListener:
    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[CountingListener]:
    counting = CountingListener()
    yield counting
    await counting.stop()


async def wait_for_accepts(listener: CountingListener, count: int) -> None:
    for _ in range(200):  # the server's accept callback runs after the client's connect returned
        if listener.accepted >= count:
            return
        await asyncio.sleep(0.005)


async def test_concurrent_checks_share_one_probe_and_a_success_is_reused_while_fresh(
    listener: CountingListener,
) -> None:
    port = await listener.start()
    probe = ReachabilityProbe(fresh_seconds=0.3)
    results = await asyncio.gather(*(probe.check("127.0.0.1", port, 1000) for _ in range(32)))
    assert results == [None] * 32
    assert await probe.check("127.0.0.1", port, 1000) is None  # fresh: no new connection
    await wait_for_accepts(listener, 1)
    assert listener.accepted == 1
    await asyncio.sleep(0.35)
    assert await probe.check("127.0.0.1", port, 1000) is None
    await wait_for_accepts(listener, 2)
    assert listener.accepted == 2


async def test_a_failure_is_never_reused(listener: CountingListener) -> None:
    port = free_port()
    probe = ReachabilityProbe(fresh_seconds=60)
    refused = await probe.check("127.0.0.1", port, 1000)
    assert refused is not None and refused.status == 503 and refused.code == "upstream_unavailable"
    await listener.start(port)  # the upstream comes back: the next check sees it at once
    assert await probe.check("127.0.0.1", port, 1000) is None
    await wait_for_accepts(listener, 1)
    assert listener.accepted == 1
