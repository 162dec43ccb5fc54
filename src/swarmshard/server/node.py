"""The node runner: serve a span, announce it in the DHT, answer inference streams until stopped."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from swarmshard import __version__
from swarmshard.core.store import ModelStore
from swarmshard.server.batching import StepBatcher
from swarmshard.server.cache import CacheFull, SessionCache, UnknownSession
from swarmshard.server.shard import BadRequest, SpanBackend
from swarmshard.server.stage import StageBackend
from swarmshard.transport.codecs import accepted_codecs, encode_tensor
from swarmshard.transport.p2p import SwarmNode
from swarmshard.transport.schemas import (
    FORWARD_RPC,
    INFERENCE_RPC,
    Forward,
    Message,
    OpenSession,
    Reply,
    ServerRecord,
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


def _error(text: str) -> Message:
    return Message(meta=Reply(ok=False, error=text).model_dump(exclude_none=True))


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
            self.backend = SpanBackend(self.store, self.manifest, settings.start, settings.end, settings.quant)
            self.sessions = SessionCache(settings.cache_tokens, self.backend.new_cache)
        self.model_id = self.backend.shard.model_id
        self.accepted_codecs = accepted_codecs(settings.wire_codec)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.batcher = StepBatcher(self.backend, self.executor) if self.sessions is not None else None
        self.throughput = self.backend.measure_throughput()
        self.node: SwarmNode | None = None
        self._addrs: list[str] = []
        self.stopping = asyncio.Event()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def run(self, on_ready=None) -> None:
        s = self.settings
        limits = self.stage.limits if self.stage is not None else TensorLimits(codecs=self.accepted_codecs)
        self.node = await SwarmNode.create(initial_peers=s.initial_peers, host=s.host, port=s.port, limits=limits)
        try:
            await self.node.add_stream_handler(INFERENCE_RPC, self._inference)
            await self.node.add_stream_handler(FORWARD_RPC, self._forward)
            if self.batcher is not None:
                self.batcher.start()
            await self._announce()
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
        """One stream = one session: ``open`` first, then ``step`` messages; freed when the stream ends."""
        session = None
        reply_codec = self.settings.wire_codec
        try:
            async for message in messages:
                try:
                    if "__wire_error__" in message.meta:
                        raise WireError(message.meta["__wire_error__"])
                    if self.sessions is None:
                        raise BadRequest(f"{self.backend.shard} is a stateless graph stage: "
                                         "it answers stage forwards, not inference sessions")
                    if session is None:
                        request = parse_meta(OpenSession, message.meta)
                        self._check_span(request.model_id, request.start, request.end)
                        reply_codec = self._reply_codec(request.reply_codec)
                        session = self.sessions.open(request.session_id, request.max_length, request.batch_size, peer)
                        yield Message(meta=Reply(ok=True, cache_tokens_left=self.sessions.tokens_left).model_dump())
                        continue
                    step = parse_meta(Step, message.meta)
                    if len(message.tensors) != 1:
                        raise BadRequest(f"a step carries exactly one tensor, got {len(message.tensors)}")
                    session = self.sessions.get(session.session_id)
                    hidden = message.tensors[0]
                    self.backend.check_hidden(hidden, session.batch_size)
                    if step.position + hidden.shape[1] > session.max_length:
                        raise BadRequest(
                            f"positions up to {step.position + hidden.shape[1]} exceed the session's "
                            f"max_length {session.max_length}"
                        )
                    out = await self.batcher.submit(hidden, step.position, session.cache)
                    session.position = step.position + hidden.shape[1]
                    wire = self._encode(out, reply_codec)
                    yield Message(meta=Reply(ok=True, step=step.step).model_dump(exclude_none=True), tensors=[wire])
                except (WireError, BadRequest, CacheFull, UnknownSession) as exc:
                    yield _error(str(exc))
                except Exception as exc:  # a bug must not take the server down
                    yield _error(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if session is not None:
                self.sessions.close(session.session_id)

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
            except (WireError, BadRequest) as exc:
                yield _error(str(exc))
            except Exception as exc:
                yield _error(f"internal error: {type(exc).__name__}: {exc}")


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
        if json_events:
            print(json.dumps({"event": "ready", "peer_id": peer_id, "addrs": full, "model_id": server.model_id,
                              "start": settings.start, "end": settings.end,
                              "throughput": server.throughput, "quant": settings.quant,
                              "wire_codec": settings.wire_codec}), flush=True)
        else:
            print(f"serving {server.backend.shard} as {peer_id}", flush=True)
            if server.stage is None:
                print(f"weights: {settings.quant}; wire codec: {settings.wire_codec} "
                      f"(accepts {', '.join(server.accepted_codecs)})", flush=True)
            unit = "forwards/s" if server.stage is not None else "tok/s"
            print(f"throughput {server.throughput:.1f} {unit}; others join with:", flush=True)
            for addr in full:
                print(f"  --initial-peers {addr}", flush=True)

    server = ShardServer(settings)

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

