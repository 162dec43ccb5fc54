"""Streaming hidden states through a chain of servers, one open inference stream per hop."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import torch

from swarmshard.core.routing import RouteHop
from swarmshard.transport.p2p import RpcStream, SwarmNode
from swarmshard.transport.schemas import FORWARD_RPC, INFERENCE_RPC, Forward, Message, OpenSession, Reply, Step, parse_meta

# Prefill is sent in chunks so no message grows past this many bytes (the chunks are exact: a causal
# model with a KV cache computes the same states whether a prompt arrives at once or in pieces).
MAX_CHUNK_BYTES = 8 * 1024**2


class RemoteError(RuntimeError):
    """A server refused or failed a request; names the server and its reason."""

    def __init__(self, peer_id: str, message: str) -> None:
        super().__init__(f"server {peer_id[:16]}…: {message}")
        self.peer_id = peer_id


@dataclass
class HopTiming:
    calls: int = 0
    seconds: float = 0.0


def _check_reply(peer_id: str, message: Message, want_tensor: bool) -> Message:
    reply = parse_meta(Reply, message.meta)
    if not reply.ok:
        raise RemoteError(peer_id, reply.error or "unknown error")
    if want_tensor and len(message.tensors) != 1:
        raise RemoteError(peer_id, f"answered with {len(message.tensors)} tensors instead of 1")
    return message


class RemoteSession:
    """An inference session over ``route``: servers keep KV caches for their spans."""

    def __init__(
        self,
        node: SwarmNode,
        model_id: str,
        route: list[RouteHop],
        max_length: int,
        batch_size: int,
        hidden_size: int,
        timeout: float = 30.0,
    ) -> None:
        self.node = node
        self.model_id = model_id
        self.route = route
        self.max_length = max_length
        self.batch_size = batch_size
        self.hidden_size = hidden_size
        self.timeout = timeout
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self._step = 0
        self._streams: list[RpcStream] = []
        self.timings = [HopTiming() for _ in route]

    async def open(self) -> None:
        try:
            for hop in self.route:
                stream = await asyncio.wait_for(self.node.open_stream(hop.peer_id, INFERENCE_RPC), self.timeout)
                self._streams.append(stream)
                request = OpenSession(
                    session_id=self.session_id,
                    model_id=self.model_id,
                    start=hop.start,
                    end=hop.end,
                    max_length=self.max_length,
                    batch_size=self.batch_size,
                )
                reply = await asyncio.wait_for(stream.send(Message(meta=request.model_dump())), self.timeout)
                _check_reply(hop.peer_id, reply, want_tensor=False)
        except BaseException:
            await self.close()
            raise

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Send ``hidden`` (batch, seq, hidden) through every hop; returns the last hop's output."""
        position = self.position if position is None else position
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"session max_length {self.max_length} exceeded: positions up to {position + hidden.shape[1]}"
            )
        per_token = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
        chunk = max(1, MAX_CHUNK_BYTES // per_token)
        outputs = []
        for offset in range(0, hidden.shape[1], chunk):
            outputs.append(await self._step_chunk(hidden[:, offset : offset + chunk], position + offset))
        self.position = position + hidden.shape[1]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _step_chunk(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        expected_shape = hidden.shape
        for index, (hop, stream) in enumerate(zip(self.route, self._streams)):
            begin = loop.time()
            meta = Step(step=self._step, position=position).model_dump()
            reply = await asyncio.wait_for(stream.send(Message(meta=meta, tensors=[hidden])), self.timeout)
            hidden = _check_reply(hop.peer_id, reply, want_tensor=True).tensors[0]
            if hidden.shape != expected_shape:
                raise RemoteError(hop.peer_id, f"returned hidden states of shape {tuple(hidden.shape)}")
            self.timings[index].calls += 1
            self.timings[index].seconds += loop.time() - begin
        self._step += 1
        return hidden

    async def close(self) -> None:
        streams, self._streams = self._streams, []
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)


async def remote_forward(
    node: SwarmNode, model_id: str, route: list[RouteHop], hidden: torch.Tensor, timeout: float = 60.0
) -> torch.Tensor:
    """A stateless forward of ``hidden`` (positions from 0) through ``route``."""
    for hop in route:
        stream = await asyncio.wait_for(node.open_stream(hop.peer_id, FORWARD_RPC), timeout)
        try:
            meta = Forward(model_id=model_id, start=hop.start, end=hop.end).model_dump()
            reply = await asyncio.wait_for(stream.send(Message(meta=meta, tensors=[hidden])), timeout)
            expected_shape = hidden.shape
            hidden = _check_reply(hop.peer_id, reply, want_tensor=True).tensors[0]
            if hidden.shape != expected_shape:
                raise RemoteError(hop.peer_id, f"returned hidden states of shape {tuple(hidden.shape)}")
        finally:
            await stream.close()
    return hidden
