"""Streaming hidden states through a chain of servers, surviving servers that die or stall.

A `HopSession` is one open inference stream to one server. A `RemoteSession` chains hops over the
model's blocks and keeps, per hop, every input it sent. When a hop fails (connection lost, timeout,
error reply) the server is banned with backoff, a replacement chain for the same blocks is routed,
the recorded inputs are replayed step by step (same shapes as the first time, so the replacement
rebuilds the very same KV cache), and the step continues: a failure costs a retry, not the answer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from swarmshard.client.group import GroupChannel, GroupFailed, StepGroups
from swarmshard.core.routing import NoRoute, RouteHop
from swarmshard.transport.codecs import encode_tensor
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


class SwarmUnavailable(RuntimeError):
    """No replacement could be found in time; names the blocks left without a server."""


@dataclass
class HopTiming:
    calls: int = 0
    seconds: float = 0.0


def _check_reply(peer_id: str, message: Message, want_tensor: bool, codec: str = "none") -> Message:
    reply = parse_meta(Reply, message.meta)
    if not reply.ok:
        raise RemoteError(peer_id, reply.error or "unknown error")
    if want_tensor and len(message.tensors) != 1:
        raise RemoteError(peer_id, f"answered with {len(message.tensors)} tensors instead of 1")
    if want_tensor and message.codecs != [codec]:
        raise RemoteError(peer_id, f"answered in wire codec {message.codecs[0]!r}, asked for {codec!r}")
    return message


class HopSession:
    """One server's part of a session: an open stream and the KV cache it holds for us."""

    def __init__(self, node: SwarmNode, hop: RouteHop, session_id: str, model_id: str, max_length: int,
                 batch_size: int, timeout: float, wire_codec: str = "none", groups: StepGroups | None = None) -> None:
        self.node = node
        self.groups = groups  # steps go through the server's group channel while we have company there
        self._channel: GroupChannel | None = None
        self.wire_codec = wire_codec  # of the hidden states we send, and of the replies we ask for
        self.hop = hop
        self.session_id = session_id
        self.model_id = model_id
        self.max_length = max_length
        self.batch_size = batch_size
        self.timeout = timeout
        self.history: list[tuple[int, torch.Tensor]] = []  # (position, hidden) sent, for replays
        self.timing = HopTiming()
        self._stream: RpcStream | None = None
        self._step = 0

    async def open(self) -> None:
        try:
            self._stream = await asyncio.wait_for(self.node.open_stream(self.hop.peer_id, INFERENCE_RPC), self.timeout)
            request = OpenSession(
                session_id=self.session_id, model_id=self.model_id, start=self.hop.start, end=self.hop.end,
                max_length=self.max_length, batch_size=self.batch_size, reply_codec=self.wire_codec,
            )
            reply = await asyncio.wait_for(self._stream.send(Message(meta=request.model_dump())), self.timeout)
            _check_reply(self.hop.peer_id, reply, want_tensor=False)
            if self.groups is not None and self.hop.peer_id in self.groups.supported:
                self._channel = self.groups.channel(self.hop.peer_id)
                self._channel.members += 1
        except RemoteError:
            raise
        except Exception as exc:  # timeouts, refused or dropped connections
            raise RemoteError(self.hop.peer_id, f"could not open a session: {type(exc).__name__}: {exc}") from exc

    async def step(self, hidden: torch.Tensor, position: int, record: bool = True) -> torch.Tensor:
        assert self._stream is not None, "open() first"
        begin = time.perf_counter()
        wire = encode_tensor(hidden, self.wire_codec)  # a WireError here is ours, not the server's
        channel = self._channel
        try:
            if channel is not None and channel.members > 1:
                reply = await channel.step(self.session_id, self._step, position, wire)
            else:
                meta = Step(step=self._step, position=position).model_dump()
                reply = await asyncio.wait_for(self._stream.send(Message(meta=meta, tensors=[wire])), self.timeout)
        except GroupFailed as exc:
            raise RemoteError(self.hop.peer_id, str(exc)) from None
        except asyncio.TimeoutError:
            raise RemoteError(self.hop.peer_id, f"no answer within {self.timeout:.1f}s") from None
        except Exception as exc:  # dropped connection, daemon error
            raise RemoteError(self.hop.peer_id, f"connection lost: {type(exc).__name__}: {exc}") from exc
        out = _check_reply(self.hop.peer_id, reply, want_tensor=True, codec=self.wire_codec).tensors[0]
        if out.shape != hidden.shape:
            raise RemoteError(self.hop.peer_id, f"returned hidden states of shape {tuple(out.shape)}")
        if record:
            self.history.append((position, hidden))
        self._step += 1
        self.timing.calls += 1
        self.timing.seconds += time.perf_counter() - begin
        return out

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.leave(self.session_id)
        if stream is not None:
            await stream.close()


RouteFinder = Callable[[int, int, set[str]], Awaitable[list[RouteHop]]]


@dataclass
class Failover:
    """What a recovery did, for reports and tests."""

    failed_peer: str
    blocks: tuple[int, int]
    replacement: list[RouteHop]
    replayed_steps: int
    seconds: float
    reason: str = ""


@dataclass
class BanList:
    """Peers that failed us, each banned for a time that doubles with every new failure."""

    base_seconds: float = 15.0
    max_seconds: float = 600.0
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer_id: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        duration = min(self.base_seconds * 2 ** (strikes - 1), self.max_seconds)
        self._until[peer_id] = now + duration
        return duration

    def active(self, now: float | None = None) -> set[str]:
        now = time.monotonic() if now is None else now
        return {peer for peer, until in self._until.items() if until > now}

    def update(self, peers) -> None:
        for peer in peers:
            self.ban(peer)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self.active()


class RemoteSession:
    """An inference session over a chain of hops: servers keep KV caches for their spans."""

    def __init__(
        self,
        node: SwarmNode,
        model_id: str,
        route: list[RouteHop],
        max_length: int,
        batch_size: int,
        hidden_size: int,
        timeout: float = 30.0,
        find_route: RouteFinder | None = None,
        bans: BanList | None = None,
        max_failovers: int = 8,
        wire_codec: str = "none",
        groups: StepGroups | None = None,
    ) -> None:
        self.node = node
        self.groups = groups
        self.wire_codec = wire_codec
        self.model_id = model_id
        self.max_length = max_length
        self.batch_size = batch_size
        self.hidden_size = hidden_size
        self.timeout = timeout
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self.find_route = find_route
        self.bans = bans or BanList()
        self.max_failovers = max_failovers
        self.failovers: list[Failover] = []
        self.hops = [self._hop(h) for h in route]
        # Observer called as before_step(hop_index, hop, position) before each step is sent (tests,
        # demos and tracing use it, e.g. to kill a server at an exact point).
        self.before_step: Callable[[int, HopSession, int], None] | None = None

    def _hop(self, hop: RouteHop) -> HopSession:
        return HopSession(self.node, hop, self.session_id, self.model_id, self.max_length, self.batch_size,
                          self.timeout, self.wire_codec, self.groups)

    @property
    def route(self) -> list[RouteHop]:
        return [h.hop for h in self.hops]

    @property
    def timings(self) -> list[HopTiming]:
        return [h.timing for h in self.hops]

    async def open(self) -> None:
        index = 0
        while index < len(self.hops):
            try:
                await self.hops[index].open()
                index += 1
            except RemoteError as exc:
                index += await self._replace(index, exc)  # replacements are open already

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
        index = 0
        while index < len(self.hops):
            try:
                if self.before_step is not None:
                    self.before_step(index, self.hops[index], position)
                hidden = await self.hops[index].step(hidden, position)
                index += 1
            except RemoteError as exc:
                await self._replace(index, exc)  # the step is retried on the replacement
        return hidden

    async def _replace(self, index: int, error: RemoteError) -> int:
        """Swap hop ``index`` for a fresh, open chain over the same blocks, rebuilt by replaying its inputs.

        Returns how many hops replaced it.
        """
        began = time.perf_counter()
        failed = self.hops[index]
        if len(self.failovers) >= self.max_failovers or self.find_route is None:
            raise error
        self.bans.ban(failed.hop.peer_id)
        await failed.close()
        start, end = failed.hop.start, failed.hop.end
        deadline = time.monotonic() + self.timeout
        while True:
            replacement: list[HopSession] = []
            try:
                route = await self.find_route(start, end, self.bans.active())
                replacement = [self._hop(h) for h in route]
                for hop in replacement:
                    await hop.open()
                replayed = 0
                for position, hidden in failed.history:
                    for hop in replacement:
                        hidden = await hop.step(hidden, position)
                    replayed += 1
                break
            except RemoteError as exc:
                self.bans.ban(exc.peer_id)
                for hop in replacement:
                    await hop.close()
                if time.monotonic() > deadline:
                    raise SwarmUnavailable(f"blocks {start}:{end} lost their server and no replacement "
                                           f"answered within {self.timeout:.0f}s: {exc}") from exc
            except NoRoute as exc:
                if time.monotonic() > deadline:
                    raise SwarmUnavailable(f"blocks {start}:{end} lost their server ({error}); {exc}") from exc
                await asyncio.sleep(0.5)
        self.hops[index : index + 1] = replacement
        self.failovers.append(Failover(failed.hop.peer_id, (start, end), [h.hop for h in replacement], replayed,
                                       time.perf_counter() - began, str(error)))
        return len(replacement)

    async def close(self) -> None:
        hops, self.hops = self.hops, []
        await asyncio.gather(*(h.close() for h in hops), return_exceptions=True)


async def remote_forward(
    node: SwarmNode, model_id: str, route: list[RouteHop], hidden: torch.Tensor, timeout: float = 60.0,
    wire_codec: str = "none",
) -> torch.Tensor:
    """A stateless forward of ``hidden`` (positions from 0) through ``route``."""
    for hop in route:
        wire = encode_tensor(hidden, wire_codec)
        stream = await asyncio.wait_for(node.open_stream(hop.peer_id, FORWARD_RPC), timeout)
        try:
            meta = Forward(model_id=model_id, start=hop.start, end=hop.end, reply_codec=wire_codec).model_dump()
            reply = await asyncio.wait_for(stream.send(Message(meta=meta, tensors=[wire])), timeout)
            expected_shape = hidden.shape
            hidden = _check_reply(hop.peer_id, reply, want_tensor=True, codec=wire_codec).tensors[0]
            if hidden.shape != expected_shape:
                raise RemoteError(hop.peer_id, f"returned hidden states of shape {tuple(hidden.shape)}")
        finally:
            await stream.close()
    return hidden
