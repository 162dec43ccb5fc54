"""The only module that touches hivemind: one P2P daemon + DHT node per process, RPC on top.

A `SwarmNode` owns a libp2p daemon (`p2pd` child process, stopped with its owner), a hivemind
`DHTNode` living in the same asyncio loop, and exposes:

- DHT records: ``announce`` / ``withdraw`` / ``fetch`` of `ServerRecord`s under one key per model,
  one subkey per peer, with expiration (servers refresh them periodically);
- RPC: streaming handlers (bidirectional, one message answered by one message) and clients, carrying
  `Message` (JSON metadata + raw tensors validated by `schemas`);
- round trips: an empty unary ping handler and bounded ``measure_rtts`` (cached by `transport.rtt`).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from swarmshard.transport.codecs import CODECS_KEY, decode_tensor, encode_tensor, header, parse_headers
from swarmshard.transport.schemas import (
    PING_RPC,
    Message,
    ServerRecord,
    TensorLimits,
    WireError,
    WireTensor,
)

MAX_META_BYTES = 64 * 1024
DHT_KEY_PREFIX = "swarmshard/v1/"

StreamHandler = Callable[[AsyncIterator[Message], str], AsyncIterator[Message]]


def message_to_proto(message: Message, response: bool) -> runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse:
    """Plain tensors travel as codec ``none``; `WireTensor`s (see transport/codecs.py) as encoded."""
    if CODECS_KEY in message.meta:
        raise WireError(f"metadata key {CODECS_KEY!r} is reserved for the transport")
    wires = [t if isinstance(t, WireTensor) else encode_tensor(t) for t in message.tensors]
    tensors = [runtime_pb2.Tensor(buffer=w.buffer, size=list(w.shape), dtype=w.dtype) for w in wires]
    meta = message.meta
    if any(w.codec != "none" for w in wires):
        meta = {**meta, CODECS_KEY: [header(w) for w in wires]}
    meta = json.dumps(meta, separators=(",", ":")).encode()
    cls = runtime_pb2.ExpertResponse if response else runtime_pb2.ExpertRequest
    return cls(tensors=tensors, metadata=meta)


def proto_to_message(proto, limits: TensorLimits) -> Message:
    """Decode and validate a wire message: bounded JSON metadata, checked tensors, no pickle."""
    if len(proto.metadata) > MAX_META_BYTES:
        raise WireError(f"metadata of {len(proto.metadata)} bytes exceeds {MAX_META_BYTES}")
    try:
        meta = json.loads(proto.metadata.decode()) if proto.metadata else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"metadata is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise WireError("metadata must be a JSON object")
    if proto.tensors and any(t.compression != runtime_pb2.NONE for t in proto.tensors):
        raise WireError(f"hivemind-compressed tensors are not accepted (codecs are declared in {CODECS_KEY})")
    total = sum(len(t.buffer) for t in proto.tensors)
    if total > limits.max_bytes:
        raise WireError(f"message carries {total} tensor bytes, limit is {limits.max_bytes}")
    entries = meta.pop(CODECS_KEY, None)
    headers = parse_headers(entries, len(proto.tensors)) if entries is not None else None
    tensors, codecs, decoded = [], [], 0
    for index, t in enumerate(proto.tensors):
        codec, block = (headers[index].codec, headers[index].block_size) if headers else ("none", 0)
        tensor = decode_tensor(WireTensor(t.buffer, tuple(t.size), t.dtype, codec, block), limits)
        decoded += tensor.numel() * tensor.element_size()
        if decoded > limits.max_bytes:
            raise WireError(f"message decodes to over {limits.max_bytes} tensor bytes")
        tensors.append(tensor)
        codecs.append(codec)
    return Message(meta=meta, tensors=tensors, codecs=codecs)


@dataclass
class SwarmNode:
    """A process's presence in the swarm: P2P daemon, DHT node and RPC endpoints."""

    p2p: P2P
    dht: DHTNode
    limits: TensorLimits
    bytes_sent: int = 0  # serialized RPC requests sent and replies received by this node's streams
    bytes_received: int = 0

    @classmethod
    async def create(
        cls,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        client_mode: bool = False,
        limits: TensorLimits | None = None,
    ) -> "SwarmNode":
        """Start a P2P daemon listening on ``host:port`` and a DHT node joined through ``initial_peers``."""
        peers = [Multiaddr(p) if isinstance(p, str) else p for p in initial_peers]
        host_maddrs = [] if client_mode else [f"/ip4/{host}/tcp/{port}"]
        p2p = await P2P.create(initial_peers=peers, host_maddrs=host_maddrs or [f"/ip4/{host}/tcp/0"])
        try:
            dht = await DHTNode.create(p2p=p2p, initial_peers=peers, client_mode=client_mode, num_workers=4)
        except BaseException:
            await p2p.shutdown()
            raise
        return cls(p2p=p2p, dht=dht, limits=limits or TensorLimits())

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    async def visible_addrs(self) -> list[str]:
        return [str(a) for a in await self.p2p.get_visible_maddrs()]

    async def shutdown(self) -> None:
        """Stop the DHT node and the P2P daemon (its `p2pd` child process)."""
        try:
            await asyncio.wait_for(self.dht.shutdown(), timeout=5)
        except asyncio.TimeoutError:
            # A DHT request still in flight can keep hivemind's shutdown waiting; stopping the
            # daemon below ends it anyway, and peers drop our records when they expire.
            pass
        finally:
            await self.p2p.shutdown()

    # ---- DHT records ----------------------------------------------------------------------------

    @staticmethod
    def model_key(model_id: str) -> str:
        return DHT_KEY_PREFIX + model_id

    async def announce(self, record: ServerRecord, ttl: float) -> bool:
        return await self.dht.store(
            self.model_key(record.model_id),
            subkey=record.peer_id,
            value=record.model_dump(),
            expiration_time=get_dht_time() + ttl,
        )

    async def withdraw(self, model_id: str) -> bool:
        """Replace our record with an already-expired tombstone so peers stop routing to us."""
        return await self.dht.store(
            self.model_key(model_id), subkey=self.peer_id, value=None, expiration_time=get_dht_time() + 1
        )

    async def fetch(self, model_id: str) -> list[ServerRecord]:
        """Every live, well-formed record for ``model_id`` (malformed ones are ignored)."""
        found = await self.dht.get(self.model_key(model_id), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        records = []
        now = get_dht_time()
        for subkey, entry in found.value.items():
            value = getattr(entry, "value", None)
            if not isinstance(value, dict) or getattr(entry, "expiration_time", 0) < now:
                continue
            try:
                record = ServerRecord.model_validate(value)
            except Exception:
                continue
            if record.peer_id == subkey:
                records.append(record)
        return records

    async def connect(self, record: ServerRecord) -> None:
        """Tell our daemon how to reach a peer announced in the DHT (best effort: the DHT may know)."""
        addrs = [Multiaddr(a.split("/p2p/")[0]) for a in record.addrs]
        if addrs:
            try:
                await self.p2p._client.connect(PeerID.from_base58(record.peer_id), addrs)
            except Exception:
                pass

    # ---- RPC ------------------------------------------------------------------------------------

    async def add_stream_handler(self, name: str, handler: StreamHandler) -> None:
        """Serve ``name``: ``handler(messages, peer_id)`` yields one reply per incoming message."""
        limits = self.limits

        async def _handle(requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
            async def decoded() -> AsyncIterator[Message]:
                async for proto in requests:
                    try:
                        yield proto_to_message(proto, limits)
                    except WireError as exc:
                        yield Message(meta={"__wire_error__": str(exc)})

            async for reply in handler(decoded(), context.remote_id.to_base58()):
                yield message_to_proto(reply, response=True)

        await self.p2p.add_protobuf_handler(
            name, _handle, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )

    # ---- round-trip times ----------------------------------------------------------------------

    async def add_ping_handler(self) -> None:
        """Answer empty pings so peers can measure their round trip to us (unary: no new stream)."""

        async def _pong(_: runtime_pb2.ExpertRequest, __: P2PContext) -> runtime_pb2.ExpertResponse:
            return runtime_pb2.ExpertResponse()

        await self.p2p.add_protobuf_handler(PING_RPC, _pong, runtime_pb2.ExpertRequest)

    async def ping(self, peer_id: str, timeout: float = 2.0) -> float:
        """Seconds for one empty request and its answer; raises TimeoutError or a daemon error."""
        peer = PeerID.from_base58(peer_id)
        begin = time.perf_counter()
        await asyncio.wait_for(
            self.p2p.call_protobuf_handler(peer, PING_RPC, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse),
            timeout,
        )
        return time.perf_counter() - begin

    async def measure_rtts(
        self, records: Sequence[ServerRecord], samples: int = 3, timeout: float = 2.0, concurrency: int = 8
    ) -> dict[str, float | None]:
        """Median round trip to each announced server (None: no answer within ``timeout``).

        Bounded: at most ``concurrency`` peers at once, ``samples`` pings each, every connect and
        ping under ``timeout``, so a dead or unreachable peer costs at most ``samples * timeout``.
        """
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(record: ServerRecord) -> float | None:
            async with gate:
                try:
                    await asyncio.wait_for(self.connect(record), timeout)
                except Exception:  # timeouts included: the ping below tells whether it matters
                    pass
                times = []
                for _ in range(max(1, samples)):
                    try:
                        times.append(await self.ping(record.peer_id, timeout))
                    except Exception:  # timeouts, unknown protocol (an older server), dead peer
                        break  # an unreachable peer is not retried here: the caller caches the miss
                return statistics.median(times) if times else None

        peers = {r.peer_id: r for r in records if r.peer_id != self.peer_id}
        values = await asyncio.gather(*(one(r) for r in peers.values()))
        return dict(zip(peers, values))

    async def open_stream(self, peer_id: str, name: str) -> "RpcStream":
        stream = RpcStream(self, PeerID.from_base58(peer_id), name)
        await stream.start()
        return stream


class RpcStream:
    """A client side of a bidirectional stream: ``await send(msg)`` returns the server's reply."""

    def __init__(self, node: SwarmNode, peer: PeerID, name: str) -> None:
        self._node = node
        self._peer = peer
        self._name = name
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._replies = None
        self.closed = False

    async def start(self) -> None:
        async def outgoing():
            while True:
                item = await self._outbox.get()
                if item is None:
                    return
                yield item

        self._replies = await self._node.p2p.iterate_protobuf_handler(
            self._peer, self._name, outgoing(), runtime_pb2.ExpertResponse
        )

    async def send(self, message: Message) -> Message:
        if self.closed:
            raise ConnectionError("stream is closed")
        request = message_to_proto(message, response=False)
        self._node.bytes_sent += request.ByteSize()
        await self._outbox.put(request)
        try:
            proto = await self._replies.__anext__()
        except StopAsyncIteration:
            self.closed = True
            raise ConnectionError(f"peer {self._peer.to_base58()[:12]}… closed the stream") from None
        self._node.bytes_received += proto.ByteSize()
        return proto_to_message(proto, self._node.limits)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self._outbox.put(None)
            if self._replies is not None:
                try:
                    await asyncio.wait_for(self._replies.aclose(), timeout=2)
                except (asyncio.TimeoutError, Exception):
                    pass

