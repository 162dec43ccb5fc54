"""Round-trip times to announced servers, measured by ping and cached, so routing and placement
can use real latencies without pinging the whole swarm on every decision."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from swarmshard.transport.p2p import SwarmNode
from swarmshard.transport.schemas import ServerRecord


@dataclass
class _Entry:
    rtt: float | None  # None: the peer did not answer
    at: float


class RttCache:
    """Measured round trips, kept ``ttl`` s (a miss only ``miss_ttl`` s, so a recovered peer is
    measured again soon); each ``measure`` pings at most ``max_peers`` peers not measured recently."""

    def __init__(
        self,
        node: SwarmNode,
        ttl: float = 120.0,
        miss_ttl: float = 15.0,
        samples: int = 2,
        timeout: float = 1.0,
        max_peers: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or miss_ttl <= 0 or samples < 1 or timeout <= 0 or max_peers < 1:
            raise ValueError("ttl, miss_ttl, timeout must be > 0 and samples, max_peers >= 1")
        self.node = node
        self.ttl, self.miss_ttl = ttl, miss_ttl
        self.samples, self.timeout, self.max_peers = samples, timeout, max_peers
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def _fresh(self, peer_id: str, now: float) -> bool:
        entry = self._entries.get(peer_id)
        if entry is None:
            return False
        return now - entry.at < (self.ttl if entry.rtt is not None else self.miss_ttl)

    def known(self) -> dict[str, float]:
        """Fresh measurements of peers that answered."""
        now = self._clock()
        return {p: e.rtt for p, e in self._entries.items() if e.rtt is not None and self._fresh(p, now)}

    async def measure(self, records: Sequence[ServerRecord]) -> dict[str, float | None]:
        """Round trips to ``records``' peers (None: no answer), pinging only stale ones."""
        now = self._clock()
        stale = [r for r in records if r.peer_id != self.node.peer_id and not self._fresh(r.peer_id, now)]
        if stale:
            measured = await self.node.measure_rtts(stale[: self.max_peers], self.samples, self.timeout)
            at = self._clock()
            for peer, rtt in measured.items():
                self._entries[peer] = _Entry(rtt, at)
        now = self._clock()
        return {r.peer_id: self._entries[r.peer_id].rtt for r in records
                if r.peer_id in self._entries and self._fresh(r.peer_id, now)}
