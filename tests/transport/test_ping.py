"""Round trips measured over real P2P daemons: a live peer answers, a stopped one is a bounded miss."""

from __future__ import annotations

import asyncio

import pytest

from swarmshard.transport.p2p import SwarmNode
from swarmshard.transport.rtt import RttCache
from swarmshard.transport.schemas import ServerRecord

pytestmark = pytest.mark.slow


def record_of(peer_id: str, addrs: list[str]) -> ServerRecord:
    return ServerRecord(peer_id=peer_id, model_id="m", start=0, end=1, n_blocks=1, block_digests=["d"],
                        throughput=1.0, cache_tokens_left=1, cache_tokens_total=1, addrs=addrs)


def test_ping_measures_live_peers_and_misses_stopped_ones():
    async def scenario():
        server = await SwarmNode.create()
        gone = await SwarmNode.create()
        client = await SwarmNode.create(initial_peers=[f"{a}/p2p/{server.peer_id}" for a in await server.visible_addrs()],
                                        client_mode=True)
        try:
            await server.add_ping_handler()
            live = record_of(server.peer_id, await server.visible_addrs())
            dead = record_of(gone.peer_id, await gone.visible_addrs())
            await gone.shutdown()
            now = [0.0]
            cache = RttCache(client, ttl=10.0, miss_ttl=1.0, samples=2, timeout=1.0, clock=lambda: now[0])
            first = await cache.measure([live, dead])
            known_then = cache.known()
            now[0] = 11.0  # past the ttl: nothing is fresh any more
            known_later = cache.known()
            second = await cache.measure([live])
            return first, known_then, known_later, second, cache.known()
        finally:
            await client.shutdown()
            await server.shutdown()

    first, known_then, known_later, second, known_again = asyncio.run(asyncio.wait_for(scenario(), 120))
    peer = next(iter(known_then))
    assert 0.0 < first[peer] < 1.0
    assert None in first.values() and len(first) == 2  # the stopped peer: a miss, not an error
    assert known_then == {peer: first[peer]} and known_later == {}
    assert 0.0 < second[peer] < 1.0 and set(known_again) == {peer}
