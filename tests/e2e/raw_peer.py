"""A bare swarm client for sending hand-made (often malformed) messages to one server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from swarmshard.aio import LoopThread
from swarmshard.launch import LocalSwarm
from swarmshard.transport.p2p import SwarmNode
from swarmshard.transport.schemas import INFERENCE_RPC, Message


@dataclass
class RawPeer:
    loop: LoopThread
    node: SwarmNode
    peer_id: str

    def exchange(self, messages: list[Message]) -> list[dict]:
        """Send ``messages`` on one inference stream; each reply's metadata plus its codecs and shapes."""

        async def go():
            stream = await self.node.open_stream(self.peer_id, INFERENCE_RPC)
            try:
                replies = []
                for m in messages:
                    reply = await stream.send(m)
                    replies.append({**reply.meta, "codecs": reply.codecs,
                                    "shapes": [tuple(t.shape) for t in reply.tensors]})
                return replies
            finally:
                await stream.close()

        return self.loop.run(go(), timeout=60)

    def run(self, scenario, timeout: float = 60):
        """Run ``await scenario(node, peer_id)`` on this peer's event loop (several streams at once)."""
        return self.loop.run(scenario(self.node, self.peer_id), timeout=timeout)


@contextmanager
def raw_peer(swarm: LocalSwarm) -> Iterator[RawPeer]:
    """A client-mode node joined to ``swarm``, talking to its first server; stopped on exit."""
    loop = LoopThread()
    node = loop.run(SwarmNode.create(initial_peers=swarm.initial_peers, client_mode=True), timeout=60)
    try:
        yield RawPeer(loop, node, swarm.servers[0].peer_id)
    finally:
        loop.run(node.shutdown(), timeout=20)
        loop.stop()
