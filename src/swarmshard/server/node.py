"""The node runner: serve a span, announce it in the DHT, answer inference streams until stopped."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from swarmshard import __version__
from swarmshard.core.placement import NodeProfile, Span
from swarmshard.core.shard import Shard
from swarmshard.core.store import ModelStore
from swarmshard.server import autoplace
from swarmshard.server.batching import StepBatcher
from swarmshard.server.cache import CacheFull, Session, SessionCache, UnknownSession
from swarmshard.server.shard import BadRequest, SpanBackend
from swarmshard.server.stage import StageBackend
from swarmshard.transport.codecs import accepted_codecs, encode_tensor
from swarmshard.transport.p2p import SwarmNode
from swarmshard.transport.rtt import RttCache
from swarmshard.transport.schemas import (
    FORWARD_RPC,
    GROUP_RPC,
    INFERENCE_RPC,
    MAX_RTT_PEERS,
    Forward,
    GroupReply,
    GroupStep,
    Message,
    OpenSession,
    Reply,
    ServerRecord,
    SessionStep,
    StageForward,
    Step,
    TensorLimits,
    WireError,
    WireTensor,
    parse_meta,
)



@dataclass
class ServerSettings:
    model: str
    start: int
    end: int
    initial_peers: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    cache_tokens: int = 16384
    announce_period: float = 10.0
    record_ttl: float = 30.0
    idle_timeout: float = 600.0
    home: str | None = None
    quant: str = "none"  # weights of the span: "none" or "int8" (server/quant.py)
    # Activation codec (transport/codecs.py): replies use it unless a request asks for another,
    # and requests may use it or any codec with fewer bytes per value; "none" accepts all.
    wire_codec: str = "none"
    # a graph stage instead of a span: stage `stage` of plan file `plan` for factory MODULE:FUNCTION `graph`
    graph: str | None = None
    plan: str | None = None
    stage: int | None = None
    # --blocks auto: start/end are ignored; the span is chosen from the swarm's announcements and
    # this node's profile (server/autoplace.py), and re-checked every ~rebalance_period seconds.
    auto: bool = False
    memory_gb: float | None = None  # memory for weights + KV reserve (None: 80% of what is available)
    block_speed: float | None = None  # declared decode tokens/s through one block (None: measured)
    rebalance_period: float = 120.0  # mean seconds between move checks (auto only; 0: never move)
    move_threshold: float = 1.15  # move only if the swarm's bottleneck grows more than this factor
    rtt_period: float = 60.0  # seconds between pings of other servers of the model (0: never)
    machine: str | None = None  # machine identity announced for routing (None: machine_fingerprint())


def machine_fingerprint() -> str:
    """A stable, anonymous id of this machine: servers announcing the same one share its cores.

    From the OS's machine id (or, failing that, the host name), hashed so it reveals nothing.
    """
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as file:
                raw = file.read().strip()
        except OSError:
            continue
        if raw:
            break
    else:
        raw = socket.gethostname()
    return hashlib.sha256(f"swarmshard-machine:{raw}".encode()).hexdigest()[:16]


AUTO_MEMORY_FRACTION = 0.8  # of psutil's available memory, when --memory-gb is not given
SWARM_LOOKUPS = 2  # DHT lookups merged before a placement decision (one can come back short)


def memory_budget(memory_gb: float | None) -> int:
    """Bytes a ``--blocks auto`` server may fill with weights and KV cache."""
    if memory_gb is not None:
        if not memory_gb > 0:
            raise ValueError(f"--memory-gb must be positive, got {memory_gb}")
        return int(memory_gb * 1e9)
    import psutil

    return int(psutil.virtual_memory().available * AUTO_MEMORY_FRACTION)


def _error(text: str) -> Message:
    return Message(meta=Reply(ok=False, error=text).model_dump(exclude_none=True))


# Refusals whose text goes back as is; anything else is reported as an internal error.
_REFUSALS = (WireError, BadRequest, CacheFull, UnknownSession)


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _REFUSALS) else f"internal error: {type(exc).__name__}: {exc}"


@dataclass
class _OpenStream:
    """What an inference stream opened: its session, and the span state it was opened on (after a
    move the session's steps are refused, so its client fails over and replays elsewhere)."""

    session: Session
    sessions: SessionCache
    batcher: StepBatcher
    shard: Shard
    reply_codec: str
    peer: str
    busy: bool = False  # a step is in the batcher: one at a time, whichever message it came in


class ShardServer:
    """One shard served over the swarm: a span of a model's blocks, or a stage of a graph plan."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.stage: StageBackend | None = None
        self.sessions: SessionCache | None = None
        if settings.graph is not None:  # the stateless kind of shard: no model store, no KV cache
            self.stage = StageBackend.load(settings.graph, settings.plan or "", settings.stage or 0)
            self.backend: SpanBackend | StageBackend = self.stage
        else:
            self.store = ModelStore(settings.home)
            self.manifest = self.store.resolve(settings.model)
            self.spec = autoplace.model_spec(self.manifest, settings.cache_tokens, settings.wire_codec)
            # --blocks auto: one block, loaded to measure its speed; run() swaps in the chosen span
            start, end = (0, 1) if settings.auto else (settings.start, settings.end)
            self.backend = SpanBackend(self.store, self.manifest, start, end, settings.quant)
            self.sessions = SessionCache(settings.cache_tokens, self.backend.new_cache)
        self.model_id = self.backend.shard.model_id
        self.accepted_codecs = accepted_codecs(settings.wire_codec)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.batcher = StepBatcher(self.backend, self.executor) if self.sessions is not None else None
        self.measured_throughput = self.backend.measure_throughput()
        self.throughput, self.block_speed = self._rates(self.measured_throughput)
        self.memory_bytes = memory_budget(settings.memory_gb) if self.stage is None else 0  # announced
        self.rtt: dict[str, float] = {}  # peer id -> seconds, announced
        self.machine = settings.machine or machine_fingerprint()
        self.placement: autoplace.Placement | None = None
        self.moves = 0
        self.on_event: Callable[[str, dict], None] | None = None  # placement and move log (serve() prints it)
        self._busy: Counter[StepBatcher] = Counter()  # steps in flight per batcher, to retire an old span
        self._streams: dict[str, _OpenStream] = {}  # session id -> its open inference stream
        self.group_messages = 0  # GroupStep messages answered (reports, tests)
        self._move_lock = asyncio.Lock()  # one placement decision or move at a time
        self._tasks: list[asyncio.Task] = []
        self.node: SwarmNode | None = None
        self._addrs: list[str] = []
        self.stopping = asyncio.Event()

    # ---- profile and placement (span servers) -----------------------------------------------------

    def _rates(self, measured: float) -> tuple[float, float]:
        """(throughput announced for the loaded span, decode tokens/s through one block).

        Measured: the span's tokens/s, and that times its length per block (core.placement's model).
        Declared with --block-speed: the model's rate for this span length, so placement decisions
        do not depend on a noisy measurement.
        """
        if self.stage is not None:
            return measured, 0.0
        n = self.backend.shard.length
        if self.settings.block_speed:
            speed = float(self.settings.block_speed)
            return min(speed / n, autoplace.DEFAULT_BANDWIDTH / self.spec.activation_bytes), speed
        return measured, measured * n

    def profile(self) -> NodeProfile:
        assert self.node is not None
        return autoplace.node_profile(self.node.peer_id, self.block_speed, self.memory_bytes, self.manifest,
                                      self.settings.quant, rtt=self.rtt)

    def _emit(self, kind: str, payload: dict) -> None:
        if self.on_event is not None:
            self.on_event(kind, payload)

    async def _swarm_records(self) -> list[ServerRecord]:
        """The model's announcements, merged over a few lookups (one can miss a slow peer)."""
        assert self.node is not None
        merged: dict[str, ServerRecord] = {}
        for attempt in range(SWARM_LOOKUPS):
            if attempt:
                await asyncio.sleep(0.3)
            for r in await self.node.fetch(self.model_id):
                merged[r.peer_id] = r
        return list(merged.values())

    async def _load(self, span: Span) -> tuple[SpanBackend, float]:
        """Load ``span`` beside the one being served (weights off the event loop), and measure it."""
        loop = asyncio.get_running_loop()
        backend = await loop.run_in_executor(
            None, SpanBackend, self.store, self.manifest, span.start, span.end, self.settings.quant
        )
        measured = await loop.run_in_executor(self.executor, backend.measure_throughput)
        return backend, measured

    def _commit(self, backend: SpanBackend, measured: float) -> tuple[SpanBackend, StepBatcher | None]:
        """Serve ``backend`` from now on; returns the previous span's backend and batcher."""
        old = (self.backend, self.batcher)
        self.backend = backend
        self.sessions = SessionCache(self.settings.cache_tokens, backend.new_cache)
        self.batcher = StepBatcher(backend, self.executor)
        self.measured_throughput = measured
        self.throughput, self.block_speed = self._rates(measured)
        return old

    async def _place(self) -> None:
        """--blocks auto: pick the span that most raises the swarm's weakest blocks, then load it."""
        async with self._move_lock:
            records = await self._swarm_records()
            placement = autoplace.choose_initial(self.profile(), records, self.manifest, self.spec)
            backend, measured = await self._load(placement.assignment.span)
            self._commit(backend, measured)
            self.placement = placement
            self._emit("placed", {**placement.as_dict(), "block_speed": round(self.block_speed, 3),
                                  "memory_bytes": self.memory_bytes})

    async def _rebalance_loop(self) -> None:
        """Check ``should_move`` every ~rebalance_period s (jittered, so servers do not check in
        lockstep and all jump to the same blocks); after a move, wait two periods before the next
        check so the swarm sees the new announcement first."""
        period = self.settings.rebalance_period
        last_move = -float("inf")
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=period * random.uniform(0.5, 1.5))
                return
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - last_move < 2 * period:
                continue
            try:
                if await self.rebalance_once():
                    last_move = time.monotonic()
            except Exception as exc:  # a failed check must not take the server down
                self._emit("rebalance_error", {"error": f"{type(exc).__name__}: {exc}"})

    async def rebalance_once(self) -> bool:
        """One rebalancing check; moves (load new span, serve it, announce, retire the old one) only
        if the hysteresis rule still holds after loading. Returns whether it moved."""
        assert self.node is not None
        s = self.settings
        async with self._move_lock:
            current = Span(self.backend.shard.start, self.backend.shard.end)
            records = await self.node.fetch(self.model_id)
            decision = autoplace.check_move(self.profile(), current, records, self.manifest, self.spec,
                                            s.move_threshold)
            self._emit("rebalance_check", {"start": current.start, "end": current.end, "move": decision.move,
                                           "bottleneck": round(decision.current_bottleneck, 3),
                                           "best_other": round(decision.new_bottleneck, 3),
                                           "reason": autoplace.describe_move(current, decision, s.move_threshold)})
            if not decision.move:
                return False
            began = time.monotonic()
            backend, measured = await self._load(decision.span)
            confirm = autoplace.check_move(self.profile(), current, await self._swarm_records(), self.manifest,
                                           self.spec, s.move_threshold)
            if not (confirm.move and confirm.span == decision.span):
                self._emit("move_abandoned", {"start": current.start, "end": current.end,
                                              "target": [decision.span.start, decision.span.end],
                                              "reason": "the swarm changed while loading: "
                                                        + autoplace.describe_move(current, confirm, s.move_threshold)})
                return False
            old_backend, old_batcher = self._commit(backend, measured)
            self.batcher.start()
            await self._announce()  # replaces our record: the new span is served and the old one withdrawn
            self.moves += 1
            self._emit("moved", {"from": [current.start, current.end], "to": [decision.span.start, decision.span.end],
                                 "bottleneck_before": round(confirm.current_bottleneck, 3),
                                 "bottleneck_after": round(confirm.new_bottleneck, 3),
                                 "throughput": round(self.throughput, 3), "load_s": round(time.monotonic() - began, 3),
                                 "reason": autoplace.describe_move(current, confirm, s.move_threshold)})
            await self._retire(old_batcher)
            return True

    async def _retire(self, batcher: StepBatcher | None, grace: float = 60.0) -> None:
        """Let steps already queued on the old span finish (bounded), then stop its batcher; its
        sessions answer every further step with a 'moved' error, so clients fail over."""
        deadline = time.monotonic() + grace
        while batcher is not None and self._busy[batcher] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if batcher is not None:
            await batcher.stop()
            self._busy.pop(batcher, None)

    async def _rtt_loop(self) -> None:
        """Ping up to MAX_RTT_PEERS other servers of the model every rtt_period s; announced."""
        assert self.node is not None
        cache = RttCache(self.node, ttl=self.settings.rtt_period, samples=3, timeout=2.0, max_peers=MAX_RTT_PEERS)
        while not self.stopping.is_set():
            try:
                others = [r for r in await self.node.fetch(self.model_id) if r.peer_id != self.node.peer_id]
                others = random.sample(others, min(len(others), MAX_RTT_PEERS))
                measured = await cache.measure(others)
                self.rtt = {peer: round(rtt, 6) for peer, rtt in measured.items() if rtt is not None}
            except Exception as exc:
                self._emit("rtt_error", {"error": f"{type(exc).__name__}: {exc}"})
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.settings.rtt_period)
            except asyncio.TimeoutError:
                pass

    # ---- lifecycle --------------------------------------------------------------------------------

    async def run(self, on_ready=None) -> None:
        s = self.settings
        limits = self.stage.limits if self.stage is not None else TensorLimits(codecs=self.accepted_codecs)
        self.node = await SwarmNode.create(initial_peers=s.initial_peers, host=s.host, port=s.port, limits=limits)
        try:
            if s.auto:
                await self._place()
            await self.node.add_stream_handler(INFERENCE_RPC, self._inference)
            await self.node.add_stream_handler(FORWARD_RPC, self._forward)
            await self.node.add_stream_handler(GROUP_RPC, self._group)
            await self.node.add_ping_handler()
            if self.batcher is not None:
                self.batcher.start()
            await self._announce()
            if self.stage is None and s.rtt_period > 0:
                self._tasks.append(asyncio.create_task(self._rtt_loop()))
            if s.auto and s.rebalance_period > 0:
                self._tasks.append(asyncio.create_task(self._rebalance_loop()))
            if on_ready is not None:
                on_ready(self.node.peer_id, await self.node.visible_addrs())
            while not self.stopping.is_set():
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=s.announce_period)
                except asyncio.TimeoutError:
                    if self.sessions is not None:
                        self.sessions.expire_idle(s.idle_timeout)
                    await self._announce()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            try:
                await asyncio.wait_for(self.node.withdraw(self.model_id), timeout=5)
            except Exception:
                pass
            if self.batcher is not None:
                await self.batcher.stop()
            await self.node.shutdown()
            self.executor.shutdown(wait=False, cancel_futures=True)

    def record(self) -> ServerRecord:
        assert self.node is not None
        if self.stage is not None:
            return self.stage.record(self.node.peer_id, self.throughput, self._addrs, __version__)
        return ServerRecord(
            peer_id=self.node.peer_id,
            model_id=self.manifest.model_id,
            start=self.backend.shard.start,
            end=self.backend.shard.end,
            n_blocks=self.manifest.n_blocks,
            block_digests=self.manifest.block_digests[self.backend.shard.start : self.backend.shard.end],
            throughput=round(self.throughput, 3),
            cache_tokens_left=self.sessions.tokens_left,
            cache_tokens_total=self.sessions.capacity_tokens,
            addrs=self._addrs,
            version=__version__,
            quant=self.settings.quant,
            wire_codec=self.settings.wire_codec,
            block_speed=round(self.block_speed, 3),
            memory_bytes=self.memory_bytes,
            sessions=len(self.sessions),
            rtt=dict(list(self.rtt.items())[:MAX_RTT_PEERS]),
            auto=self.settings.auto,
            machine=self.machine,
            group_steps=True,
        )

    async def _announce(self) -> None:
        assert self.node is not None
        self._addrs = await self.node.visible_addrs()
        await self.node.announce(self.record(), ttl=self.settings.record_ttl)

    async def _compute(self, hidden: torch.Tensor, position: int, cache) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.backend.forward, hidden, position, cache)

    # ---- RPC handlers -----------------------------------------------------------------------------

    def _reply_codec(self, requested: str | None) -> str:
        """The codec replies use: what the request asked for, if this server allows it."""
        codec = requested or self.settings.wire_codec
        if codec not in self.accepted_codecs:
            raise BadRequest(
                f"reply codec {codec!r} not allowed by this server (--wire-codec {self.settings.wire_codec} "
                f"allows {', '.join(self.accepted_codecs)})"
            )
        return codec

    @staticmethod
    def _encode(out: torch.Tensor, codec: str) -> WireTensor:
        # On the event loop: a codec pass is cheap next to the forward, and the compute thread
        # may already be running the next batch.
        return encode_tensor(out, codec)

    def _check_span(self, model_id: str, start: int, end: int) -> None:
        shard = self.backend.shard
        if model_id != shard.model_id:
            raise BadRequest(f"this server serves model {shard.model_id!r}, not {model_id!r}")
        if (start, end) != (shard.start, shard.end):
            raise BadRequest(f"this server serves blocks {shard.start}:{shard.end}, not {start}:{end}")

    async def _inference(self, messages: AsyncIterator[Message], peer: str) -> AsyncIterator[Message]:
        """One stream = one session: ``open`` first, then ``step`` messages; freed when the stream ends.

        The session's steps may also come in `GroupStep` messages (``_group``) while the stream is open.
        """
        opened: _OpenStream | None = None
        try:
            async for message in messages:
                try:
                    if "__wire_error__" in message.meta:
                        raise WireError(message.meta["__wire_error__"])
                    if self.sessions is None:
                        raise BadRequest(f"{self.backend.shard} is a stateless graph stage: "
                                         "it answers stage forwards, not inference sessions")
                    if opened is None:
                        request = parse_meta(OpenSession, message.meta)
                        sessions, batcher, shard = self.sessions, self.batcher, self.backend.shard
                        self._check_span(request.model_id, request.start, request.end)
                        reply_codec = self._reply_codec(request.reply_codec)
                        session = sessions.open(request.session_id, request.max_length, request.batch_size, peer)
                        opened = _OpenStream(session, sessions, batcher, shard, reply_codec, peer)
                        self._streams[session.session_id] = opened
                        yield Message(meta=Reply(ok=True, cache_tokens_left=sessions.tokens_left).model_dump())
                        continue
                    step = parse_meta(Step, message.meta)
                    if len(message.tensors) != 1:
                        raise BadRequest(f"a step carries exactly one tensor, got {len(message.tensors)}")
                    wire = await self._step(opened, step, message.tensors[0])
                    yield Message(meta=Reply(ok=True, step=step.step).model_dump(exclude_none=True), tensors=[wire])
                except Exception as exc:  # refusals, and bugs: neither may take the server down
                    yield _error(_error_text(exc))
        finally:
            if opened is not None:
                session_id = opened.session.session_id
                opened.sessions.close(session_id)
                if self._streams.get(session_id) is opened:
                    del self._streams[session_id]

    async def _step(self, opened: _OpenStream, step: Step, hidden: torch.Tensor) -> WireTensor:
        """Run one validated step of an open session through its batcher; the encoded output."""
        shard = opened.shard
        if opened.sessions is not self.sessions:
            now = self.backend.shard
            raise BadRequest(f"this server moved from blocks {shard.start}:{shard.end} to "
                             f"{now.start}:{now.end} (rebalancing): route blocks "
                             f"{shard.start}:{shard.end} through another server")
        session = opened.sessions.get(opened.session.session_id)
        self.backend.check_hidden(hidden, session.batch_size)
        if step.position + hidden.shape[1] > session.max_length:
            raise BadRequest(
                f"positions up to {step.position + hidden.shape[1]} exceed the session's "
                f"max_length {session.max_length}"
            )
        if opened.busy:
            raise BadRequest(f"session {session.session_id} already has a step in flight")
        opened.busy = True
        self._busy[opened.batcher] += 1
        try:
            out = await opened.batcher.submit(hidden, step.position, session.cache)
        finally:
            self._busy[opened.batcher] -= 1
            opened.busy = False
        session.position = step.position + hidden.shape[1]
        return self._encode(out, opened.reply_codec)

    async def _group(self, messages: AsyncIterator[Message], peer: str) -> AsyncIterator[Message]:
        """Steps of several of one peer's open sessions per message, answered by one message.

        A client stepping many sessions at once saves a message per session and server (CPU in
        both daemons, here and in the client), and the steps reach the batcher together.
        """
        async for message in messages:
            try:
                if "__wire_error__" in message.meta:
                    raise WireError(message.meta["__wire_error__"])
                request = parse_meta(GroupStep, message.meta)
                if len(message.tensors) != len(request.steps):
                    raise BadRequest(f"a group of {len(request.steps)} steps carries {len(message.tensors)} tensors")
                ids = [entry.session_id for entry in request.steps]
                if len(set(ids)) != len(ids):
                    raise BadRequest("a group names the same session more than once")
                outcomes = await asyncio.gather(
                    *(self._group_entry(entry, hidden, peer) for entry, hidden in zip(request.steps, message.tensors)),
                    return_exceptions=True,
                )
                results, wires = [], []
                for entry, outcome in zip(request.steps, outcomes):
                    if isinstance(outcome, BaseException):
                        results.append(Reply(ok=False, error=_error_text(outcome)))
                    else:
                        results.append(Reply(ok=True, step=entry.step))
                        wires.append(outcome)
                self.group_messages += 1
                yield Message(meta=GroupReply(ok=True, results=results).model_dump(exclude_none=True), tensors=wires)
            except Exception as exc:
                yield _error(_error_text(exc))

    async def _group_entry(self, entry: SessionStep, hidden: torch.Tensor, peer: str) -> WireTensor:
        opened = self._streams.get(entry.session_id)
        if opened is None or opened.peer != peer:  # another peer's session is as unknown as a closed one
            raise UnknownSession(f"unknown session {entry.session_id} (never opened, closed, or expired)")
        return await self._step(opened, Step(step=entry.step, position=entry.position), hidden)

    async def _forward(self, messages: AsyncIterator[Message], peer: str) -> AsyncIterator[Message]:
        """Stateless forwards: each message is answered on its own, nothing is cached."""
        async for message in messages:
            try:
                if "__wire_error__" in message.meta:
                    raise WireError(message.meta["__wire_error__"])
                if self.stage is not None:
                    yield await self._stage_forward(message)
                    continue
                request = parse_meta(Forward, message.meta)
                self._check_span(request.model_id, request.start, request.end)
                reply_codec = self._reply_codec(request.reply_codec)
                if len(message.tensors) != 1:
                    raise BadRequest(f"a forward carries exactly one tensor, got {len(message.tensors)}")
                self.backend.check_hidden(message.tensors[0])
                out = await self._compute(message.tensors[0], 0, None)
                wire = self._encode(out, reply_codec)
                yield Message(meta=Reply(ok=True).model_dump(exclude_none=True), tensors=[wire])
            except Exception as exc:  # refusals, and bugs: neither may take the server down
                yield _error(_error_text(exc))


    async def _stage_forward(self, message: Message) -> Message:
        """A graph stage's forward: named values in, named values out, checked against the plan."""
        assert self.stage is not None
        request = parse_meta(StageForward, message.meta)
        self._check_span(request.model_id, request.start, request.end)
        values = self.stage.inputs(request, message.tensors)
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self.executor, self.stage.forward, values)
        return self.stage.reply(outputs)


def serve(settings: ServerSettings, json_events: bool = False) -> None:
    """Blocking entry point: serve until SIGINT/SIGTERM, then withdraw and exit cleanly."""

    def ready(peer_id: str, addrs: list[str]) -> None:
        full = [f"{a}/p2p/{peer_id}" if "/p2p/" not in a else a for a in addrs]
        shard = server.backend.shard  # with --blocks auto: the span it chose
        if json_events:
            print(json.dumps({"event": "ready", "peer_id": peer_id, "addrs": full, "model_id": server.model_id,
                              "start": shard.start, "end": shard.end,
                              "throughput": server.throughput, "quant": settings.quant,
                              "wire_codec": settings.wire_codec, "auto": settings.auto,
                              "block_speed": server.block_speed}), flush=True)
        else:
            print(f"serving {shard} as {peer_id}", flush=True)
            if server.stage is None:
                print(f"weights: {settings.quant}; wire codec: {settings.wire_codec} "
                      f"(accepts {', '.join(server.accepted_codecs)})", flush=True)
            unit = "forwards/s" if server.stage is not None else "tok/s"
            print(f"throughput {server.throughput:.1f} {unit}; others join with:", flush=True)
            for addr in full:
                print(f"  --initial-peers {addr}", flush=True)

    def on_event(kind: str, payload: dict) -> None:
        """Placement, rebalancing and RTT events: one JSON line each, or one readable line."""
        if json_events:
            print(json.dumps({"event": kind, **payload}), flush=True)
        elif kind in ("placed", "moved", "move_abandoned", "rebalance_check"):
            print(f"{kind}: {payload['reason']}", flush=True)
        else:
            print(f"{kind}: {payload}", flush=True)

    server = ShardServer(settings)
    server.on_event = on_event

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stopping.set)
        await server.run(on_ready=ready)

    asyncio.run(main())
    print(json.dumps({"event": "stopped"}) if json_events else "stopped", flush=True)


def run_bootstrap(host: str, port: int, json_events: bool = False) -> None:
    """A DHT-only peer other nodes join through (no model served)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = await SwarmNode.create(host=host, port=port)
        try:
            addrs = [f"{a}/p2p/{node.peer_id}" for a in await node.visible_addrs()]
            if json_events:
                print(json.dumps({"event": "ready", "peer_id": node.peer_id, "addrs": addrs}), flush=True)
            else:
                print("swarm bootstrap peer; join with:", flush=True)
                for addr in addrs:
                    print(f"  --initial-peers {addr}", flush=True)
            await stop.wait()
        finally:
            await node.shutdown()

    asyncio.run(main())

