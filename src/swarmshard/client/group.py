"""One message per server for the steps many sessions send it at once.

A client generating for many sessions sends every server of a route one step per session per
token. Each message costs CPU in this process's event loop, in both P2P daemons and in the
server's handler, and the steps of one round reach the server spread out. A `GroupChannel` takes
the steps our sessions queue for one server within the same few event-loop iterations and sends
them as one `GroupStep` on a stream of its own; the server puts them into its batcher together and
answers all of them in one message. Sessions in lockstep (client/rows.py) leave a server together,
so after the first hop a whole convoy travels as one message. Before the first hop the sessions'
threads queue their steps one by one (each samples its token first), so a flush waits, briefly and
bounded, for sessions due in this round: those whose usual step rhythm puts their next step within
the wait. Sessions out of phase (another route's convoy sharing this server) are not waited for.

Sessions still open their own inference stream (it holds the server's KV cache for them), and use
it for their steps while they are our only session on that server: one message either way.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from swarmshard.transport.p2p import RpcStream, SwarmNode
from swarmshard.transport.schemas import (
    GROUP_RPC,
    MAX_GROUP_STEPS,
    GroupReply,
    GroupStep,
    Message,
    SessionStep,
    WireError,
    WireTensor,
    parse_meta,
)

# Event-loop iterations a flush waits: sessions released by one reply re-queue within them.
GATHER_YIELDS = 3
MAX_IDLE_STREAMS = 4  # group streams kept open per server (one per message in flight)
# A flush waits at most this long, and at most this share of a session's step period, for steps due.
MAX_LINGER_S = 0.03
LINGER_SHARE = 0.25
DUE_SLACK = 0.25


class GroupFailed(RuntimeError):
    """A group message failed as a whole (connection, timeout, refusal); names the server."""

    def __init__(self, peer_id: str, message: str) -> None:
        super().__init__(message)
        self.peer_id = peer_id


@dataclass
class _Rhythm:
    last: float  # when the session last queued a step here
    period: float = 0.0  # smoothed time between its steps here (0: not known yet)

    def stepping(self, now: float) -> bool:
        """Its rhythm is known and it is still stepping (not idle between turns)."""
        return bool(self.period) and now - self.last < 1.5 * self.period


@dataclass
class _Queued:
    step: SessionStep
    wire: WireTensor
    future: asyncio.Future


class GroupChannel:
    """Our steps bound for one server, sent together; ``members``: our sessions open on it."""

    def __init__(self, node: SwarmNode, peer_id: str, timeout: float) -> None:
        self.node = node
        self.peer_id = peer_id
        self.timeout = timeout
        self.members = 0
        self.messages = 0  # group messages sent (reports, tests)
        self.steps = 0
        self._queued: list[_Queued] = []
        self._flush_scheduled = False
        self._idle: list[RpcStream] = []
        self._tasks: set[asyncio.Task] = set()
        self._rhythm: dict[str, _Rhythm] = {}
        self._arrived = asyncio.Event()
        self.lingered_s = 0.0  # summed over flushes: time spent waiting for due steps

    async def step(self, session_id: str, step: int, position: int, wire: WireTensor) -> Message:
        """Send one step with whatever else is queued for this server.

        Returns the server's answer to this step (a `Reply` and, if ok, its tensor); raises
        `GroupFailed` when the message as a whole failed.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        rhythm = self._rhythm.get(session_id)
        if rhythm is None:
            self._rhythm[session_id] = _Rhythm(now)
        else:
            gap = now - rhythm.last
            rhythm.period = gap if not rhythm.period else 0.8 * rhythm.period + 0.2 * gap
            rhythm.last = now
        future = loop.create_future()
        self._queued.append(_Queued(SessionStep(session_id=session_id, step=step, position=position), wire, future))
        self._arrived.set()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._spawn(self._flush())
        return await future

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def leave(self, session_id: str) -> None:
        """A session closed its hop here: no longer a member, nor waited for. The last one to
        leave closes the idle group streams (each holds a stream in both daemons)."""
        self.members -= 1
        self._rhythm.pop(session_id, None)
        if self.members <= 0:
            idle, self._idle = self._idle, []
            for stream in idle:
                self._discard(stream)

    def _due(self, now: float, deadline: float) -> bool:
        """Whether a session not queued yet is due by ``deadline``: still stepping (its last step
        is under 1.5 periods old; an idle session between turns is not), and its rhythm, with a
        quarter period of slack for jitter, puts its next step there (another phase's is not)."""
        queued = {q.step.session_id for q in self._queued}
        return any(sid not in queued and r.stepping(now) and r.last + (1.0 - DUE_SLACK) * r.period <= deadline
                   for sid, r in self._rhythm.items())

    async def _linger(self) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        periods = [r.period for r in self._rhythm.values() if r.stepping(began)]
        if not periods:
            return
        deadline = began + min(MAX_LINGER_S, LINGER_SHARE * min(periods))
        while self._due(loop.time(), deadline) and len(self._queued) < MAX_GROUP_STEPS:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        self.lingered_s += loop.time() - began

    async def _flush(self) -> None:
        for _ in range(GATHER_YIELDS):
            await asyncio.sleep(0)
        await self._linger()
        self._flush_scheduled = False
        batch = [q for q in self._queued[:MAX_GROUP_STEPS] if not q.future.done()]
        self._queued = self._queued[MAX_GROUP_STEPS:]
        if self._queued:
            self._flush_scheduled = True
            self._spawn(self._flush())
        if not batch:
            return
        try:
            answers = await self._exchange(batch)
        except GroupFailed as exc:
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(GroupFailed(exc.peer_id, str(exc)))
            return
        for q, answer in zip(batch, answers):
            if not q.future.done():
                q.future.set_result(answer)

    async def _exchange(self, batch: list[_Queued]) -> list[Message]:
        stream = self._idle.pop() if self._idle else None
        message = Message(meta=GroupStep(steps=[q.step for q in batch]).model_dump(), tensors=[q.wire for q in batch])
        try:
            if stream is None:
                stream = await asyncio.wait_for(self.node.open_stream(self.peer_id, GROUP_RPC), self.timeout)
            reply = await asyncio.wait_for(stream.send(message), self.timeout)
        except asyncio.TimeoutError:
            self._discard(stream)
            raise GroupFailed(self.peer_id, f"no answer within {self.timeout:.1f}s") from None
        except Exception as exc:  # dropped connection, daemon error, a server without group steps
            self._discard(stream)
            raise GroupFailed(self.peer_id, f"connection lost: {type(exc).__name__}: {exc}") from exc
        if len(self._idle) < MAX_IDLE_STREAMS:
            self._idle.append(stream)
        else:
            self._discard(stream)
        self.messages += 1
        self.steps += len(batch)
        return self._split(reply, len(batch))

    def _split(self, reply: Message, count: int) -> list[Message]:
        """The group answer as one answer per step, in the form a single step's answer has."""
        try:
            answer = parse_meta(GroupReply, reply.meta)
        except WireError as exc:
            raise GroupFailed(self.peer_id, str(exc)) from None
        if not answer.ok:
            raise GroupFailed(self.peer_id, answer.error or "unknown error")
        if len(answer.results) != count or sum(r.ok for r in answer.results) != len(reply.tensors):
            raise GroupFailed(self.peer_id, f"answered a group of {count} steps with {len(answer.results)} "
                                            f"results and {len(reply.tensors)} tensors")
        tensors = iter(zip(reply.tensors, reply.codecs))
        out = []
        for result in answer.results:
            meta = result.model_dump(exclude_none=True)
            if result.ok:
                tensor, codec = next(tensors)
                out.append(Message(meta=meta, tensors=[tensor], codecs=[codec]))
            else:
                out.append(Message(meta=meta))
        return out

    def _discard(self, stream: RpcStream | None) -> None:
        if stream is not None:
            self._spawn(stream.close())  # bounded; the failing step's session need not wait for it

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(s.close() for s in idle), return_exceptions=True)


class StepGroups:
    """The client's group channels, one per server, created on first use; only servers that
    announced group steps get one (an older server keeps every session on its own stream)."""

    def __init__(self, node: SwarmNode, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        self.channels: dict[str, GroupChannel] = {}
        self.supported: set[str] = set()

    def note(self, records) -> None:
        """Learn from fresh server records (`ServerRecord`) which servers answer group steps."""
        for record in records:
            if record.group_steps:
                self.supported.add(record.peer_id)
            else:
                self.supported.discard(record.peer_id)

    def channel(self, peer_id: str) -> GroupChannel:
        if peer_id not in self.channels:
            self.channels[peer_id] = GroupChannel(self.node, peer_id, self.timeout)
        return self.channels[peer_id]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels.values()), return_exceptions=True)
