"""`DistributedModelForCausalLM`: a causal LM whose blocks run on the swarm, with `generate()`.

Embeddings, final norm and head stay here (servers only ever see hidden states). ``generate``
follows `transformers`' semantics for greedy decoding, sampling (temperature, top-k, top-p,
repetition penalty, using transformers' own logits processors) and streamers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from swarmshard.aio import LoopThread
from swarmshard.client.group import StepGroups
from swarmshard.client.rows import RowBatcher
from swarmshard.client.session import BanList, RemoteSession, remote_forward
from swarmshard.core.routing import (
    DEFAULT_LOAD_PENALTY,
    Candidate,
    NoRoute,
    RouteHop,
    choose_route,
    prefer_shared_route,
)
from swarmshard.core.store import Manifest, ModelStore
from swarmshard.transport.codecs import accepted_codecs, check_codec
from swarmshard.transport.p2p import SwarmNode
from swarmshard.transport.rtt import RttCache
from swarmshard.transport.schemas import ServerRecord


ROUTE_LOOKUPS = 3
ROUTE_RETRY_DELAY = 0.5
UNMEASURED_RTT_S = 0.05  # round trip assumed for a server that did not answer our ping (yet)
# Combined head calls of 2 to this many rows are padded to this many: against SmolLM2's 49152-row
# head, torch's CPU GEMM is slower for 2-15 rows than for 16 (8 rows: 17.4 ms, 16 rows: 9.3 ms on
# 2 threads). One row keeps its own path: a lone session computes exactly what local generate does.
HEAD_PAD_ROWS = 16


class DigestRefused(RuntimeError):
    """Every server for some blocks announced weights other than the client's model."""


class CodecRefused(NoRoute):
    """Servers for some blocks exist, but none accepts the client's wire codec."""


def codec_records(records: list[ServerRecord], wire_codec: str) -> list[ServerRecord]:
    """Servers whose ``--wire-codec`` accepts ``wire_codec`` (for what we send and ask back)."""
    return [r for r in records if wire_codec in accepted_codecs(r.wire_codec)]


def trusted_records(records: list[ServerRecord], block_digests: list[str]) -> list[ServerRecord]:
    """Servers whose announced block digests equal our model's; the others are refused."""
    n_blocks = len(block_digests)
    return [
        r for r in records
        if r.n_blocks == n_blocks and r.end <= n_blocks and r.block_digests == block_digests[r.start : r.end]
    ]


def candidates_from_records(
    records: Sequence[ServerRecord],
    rtts: Mapping[str, float | None],
    local_load: Mapping[str, int] | None = None,
) -> list[Candidate]:
    """Routing's view of the servers: our measured round trip to each (``UNMEASURED_RTT_S`` when
    unknown), announced throughput and cache, and as load the larger of the sessions it announced
    and the sessions we hold on it (announcements lag; adding both would count ours twice)."""
    local_load = local_load or {}
    out = []
    for r in records:
        rtt = rtts.get(r.peer_id)
        out.append(Candidate(r.peer_id, r.start, r.end, r.throughput, r.cache_tokens_left,
                             UNMEASURED_RTT_S if rtt is None else rtt,
                             float(max(r.sessions, local_load.get(r.peer_id, 0))), r.machine))
    return out


@dataclass
class GenerationStats:
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, over the time spent producing them."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


class InferenceSession:
    """A multi-turn session: servers keep the KV cache, successive ``generate`` calls continue it."""

    def __init__(self, model: "DistributedModelForCausalLM", remote: RemoteSession) -> None:
        self.model = model
        self.remote = remote
        self.pending: torch.Tensor | None = None  # last generated token, not yet sent through the swarm

    @property
    def position(self) -> int:
        return self.remote.position

    @property
    def route(self) -> list[RouteHop]:
        return self.remote.route

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        # no outer timeout: every network wait inside has its own, and failover may legitimately take a while
        return self.model._loop.run(self.remote.step(hidden))

    def close(self) -> None:
        self.model._loop.run(self.model._close_remote(self.remote), timeout=10)
        if self.model._active is self:
            self.model._active = None


class DistributedModelForCausalLM:
    """Client of a swarm serving one model; see the module docstring."""

    def __init__(self, manifest: Manifest, store: ModelStore, initial_peers: Sequence[str], timeout: float = 30.0,
                 wire_codec: str = "none"):
        # The activation codec of every hidden state we send, and of every reply we ask for
        # (transport/codecs.py); "none" sends float32 as is and keeps outputs token-identical.
        self.wire_codec = check_codec(wire_codec)
        self.manifest = manifest
        self.store = store
        self.config = store.load_config(manifest)
        self.generation_config = store.load_generation_config(manifest)
        self.tokenizer = store.load_tokenizer(manifest)
        self.client = store.load_client(manifest)
        # Sessions generating concurrently (threads) share one head pass per round: see client/rows.py.
        self.head = RowBatcher(self._head_rows)
        self.timeout = timeout
        self._loop = LoopThread()
        try:
            self.node: SwarmNode = self._loop.run(
                SwarmNode.create(initial_peers=list(initial_peers), client_mode=True), timeout=60
            )
        except BaseException:
            self._loop.stop()
            raise
        self._active: InferenceSession | None = None
        # Steps of our sessions bound for the same server share a message (client/group.py).
        self.step_groups = StepGroups(self.node, timeout)
        # Routing inputs: cached round trips to servers, and our own sessions on each server (live
        # ones, plus routes chosen but not opened yet) so concurrent sessions spread over replicas.
        self.rtts = RttCache(self.node)
        self.load_penalty = DEFAULT_LOAD_PENALTY
        self._live: list[RemoteSession] = []
        self._reserved: Counter[str] = Counter()
        self._reserved_routes: list[list[RouteHop]] = []  # routes planned for sessions being opened
        self.last_stats = GenerationStats()
        self.banned = BanList()
        self.last_route: list[RouteHop] = []
        self.last_failovers: list = []

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        initial_peers: Sequence[str],
        home: str | None = None,
        timeout: float = 30.0,
        wire_codec: str = "none",
    ) -> "DistributedModelForCausalLM":
        """``wire_codec``: "none" (default), "fp16", "blockwise8" or "blockwise4" (lossy, smaller)."""
        store = ModelStore(home)
        return cls(store.resolve(model), store, initial_peers, timeout, wire_codec)

    def _head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        if 1 < rows < HEAD_PAD_ROWS:
            padding = hidden.new_zeros(HEAD_PAD_ROWS - rows, *hidden.shape[1:])
            return self.client.head(torch.cat([hidden, padding]))[:rows]
        return self.client.head(hidden)

    # ---- swarm view ---------------------------------------------------------------------------------

    def servers(self) -> list[ServerRecord]:
        return self._loop.run(self.node.fetch(self.manifest.model_id), timeout=self.timeout)

    def plan_route(self, need_tokens: int = 0) -> list[RouteHop]:
        return self._loop.run(self._plan_route(need_tokens), timeout=self.timeout)

    def _local_load(self) -> Counter[str]:
        """Our sessions per server: open ones (on their current hops) and routes being opened."""
        load = Counter(h.peer_id for remote in self._live for h in remote.route)
        load.update(self._reserved)
        return load

    async def _close_remote(self, remote: RemoteSession) -> None:
        try:
            await remote.close()
        finally:
            if remote in self._live:
                self._live.remove(remote)

    async def _plan_route(self, need_tokens: int = 0, start: int = 0, end: int | None = None,
                          banned: set[str] | None = None, reserve: bool = False) -> list[RouteHop]:
        """Route over trusted servers; also tells our daemon where the chosen peers are.

        Hops cost our measured round trip plus compute slowed by the server's load (core/routing).
        A DHT lookup can come back short (a peer slow to answer), so a failed routing is retried a
        few times on fresh lookups before it is reported. ``reserve`` counts the route as one more
        session on its servers until the caller registers the opened session.
        """
        banned = self.banned.active() if banned is None else banned
        for attempt in range(ROUTE_LOOKUPS):
            records = await self.node.fetch(self.manifest.model_id)
            trusted = trusted_records(records, self.manifest.block_digests)
            self.step_groups.note(trusted)
            usable = codec_records(trusted, self.wire_codec)
            rtts = await self.rtts.measure([r for r in usable if r.peer_id not in banned])
            candidates = candidates_from_records(usable, rtts, self._local_load())
            try:
                route = choose_route(candidates, self.manifest.n_blocks, need_tokens, banned, start, end,
                                     load_penalty=self.load_penalty)
                # Our concurrent sessions keep to few routes, so servers can stack their steps.
                known = [remote.route for remote in self._live] + self._reserved_routes
                route = prefer_shared_route(route, known, candidates, need_tokens, banned, self.load_penalty)
                if reserve:
                    self._reserved.update(h.peer_id for h in route)
                    self._reserved_routes.append(route)
                break
            except NoRoute as exc:
                if attempt + 1 < ROUTE_LOOKUPS:
                    await asyncio.sleep(ROUTE_RETRY_DELAY)
                    continue
                failure = exc
        else:
            if len(trusted) < len(records):
                raise DigestRefused(
                    f"{failure}; {len(records) - len(trusted)} server(s) were refused for announcing "
                    f"weights that differ from {self.manifest.model_id}'s digests"
                ) from failure
            if len(usable) < len(trusted):
                caps = sorted({r.wire_codec for r in trusted if r not in usable})
                raise CodecRefused(
                    f"{failure}; {len(trusted) - len(usable)} server(s) skipped: they do not accept wire codec "
                    f"{self.wire_codec!r} (their --wire-codec: {', '.join(caps)}); pick one they accept",
                    failure.missing_blocks,
                ) from failure
            raise failure
        by_peer = {r.peer_id: r for r in trusted}
        try:
            for hop in route:
                await self.node.connect(by_peer[hop.peer_id])
        except BaseException:
            if reserve:
                self._release(route)
            raise
        return route

    def _release(self, route: list[RouteHop]) -> None:
        """Undo ``_plan_route(reserve=True)``: the session is registered (or was never opened)."""
        self._reserved.subtract(h.peer_id for h in route)
        self._reserved = +self._reserved  # drop zero counts
        if route in self._reserved_routes:
            self._reserved_routes.remove(route)

    # ---- sessions -----------------------------------------------------------------------------------

    def open_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        need = max_length * batch_size

        async def find_route(start: int, end: int, banned: set[str]) -> list[RouteHop]:
            return await self._plan_route(need, start, end, banned)

        async def start() -> RemoteSession:
            route = await self._plan_route(need, reserve=True)
            remote = RemoteSession(
                self.node, self.manifest.model_id, route, max_length, batch_size,
                self.manifest.hidden_size, self.timeout, find_route=find_route, bans=self.banned,
                wire_codec=self.wire_codec, groups=self.step_groups,
            )
            self._live.append(remote)
            self._release(route)
            try:
                await remote.open()
            except BaseException:
                self._live.remove(remote)
                raise
            return remote

        remote = self._loop.run(start(), timeout=self.timeout * 4 + 30)
        self.last_route = remote.route
        return InferenceSession(self, remote)

    @contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1):
        """``with model.inference_session(max_length=...) as s:`` makes ``generate`` continue ``s``."""
        session = self.open_session(max_length, batch_size)
        previous, self._active = self._active, session
        try:
            yield session
        finally:
            session.close()
            self._active = previous

    # ---- compute -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of a stateless forward pass (no session, no cache)."""
        input_ids = torch.as_tensor(input_ids).long()
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)
        hidden = self.client.embed(input_ids, positions)
        route = self.plan_route()
        hidden = self._loop.run(
            remote_forward(self.node, self.manifest.model_id, route, hidden, self.timeout, self.wire_codec),
            timeout=self.timeout * len(route) + 5,
        )
        return self.client.head(hidden)

    __call__ = forward

    @torch.inference_mode()
    def _logits(self, session: InferenceSession, input_ids: torch.Tensor) -> torch.Tensor:
        start = session.position
        positions = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)
        hidden = session.step(self.client.embed(input_ids, positions))
        return self.head(hidden[:, -1:], group=tuple(session.route))[:, -1]

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer=None,
        generation_config=None,
        session: InferenceSession | None = None,
        **unsupported,
    ) -> torch.Tensor:
        """Like `transformers`' ``generate``: returns ``input_ids`` followed by the new tokens."""
        from transformers import GenerationConfig

        if unsupported:
            raise TypeError(f"generate() does not support: {', '.join(sorted(unsupported))}")
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        input_ids = torch.as_tensor(input_ids).long()
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
            raise ValueError("padded batches (attention_mask with zeros) are not supported: pass equal-length prompts")
        base = generation_config or self.generation_config or GenerationConfig()
        config = GenerationConfig.from_dict({**base.to_dict()})
        overrides = dict(
            max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        session = session or self._active
        prior = session.position + (session.pending is not None) if session else 0
        if config.max_new_tokens is not None:
            new_tokens = config.max_new_tokens
        else:
            new_tokens = (config.max_length or 20) - input_ids.shape[1] - prior
        if new_tokens < 1:
            raise ValueError("nothing to generate: max_new_tokens / max_length leave no room for new tokens")
        processors = self._processors(config)
        eos = config.eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)
        pad = config.pad_token_id if config.pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)

        own = session is None
        if own:
            session = self.open_session(input_ids.shape[1] + new_tokens, batch_size=input_ids.shape[0])
        stats = GenerationStats()
        try:
            if streamer is not None:
                streamer.put(input_ids.cpu())
            feed = input_ids if session.pending is None else torch.cat([session.pending, input_ids], dim=1)
            sequences = input_ids
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            begin = time.perf_counter()
            with self.head.participant():  # concurrent sessions step together (client/rows.py)
                for index in range(new_tokens):
                    logits = self._logits(session, feed)
                    scores = processors(sequences, logits)
                    if config.do_sample:
                        token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                    else:
                        token = scores.argmax(dim=-1)
                    token = torch.where(finished, torch.full_like(token, pad), token)
                    if len(eos_ids):
                        finished |= torch.isin(token, eos_ids)
                    feed = token.unsqueeze(1)
                    sequences = torch.cat([sequences, feed], dim=1)
                    if streamer is not None:
                        streamer.put(token.cpu())
                    now = time.perf_counter()
                    if index == 0:
                        stats.prefill_s = now - begin
                    else:
                        stats.decode_s += now - begin
                    begin = now
                    stats.new_tokens += 1
                    if bool(finished.all()):
                        break
            session.pending = feed
        finally:
            if streamer is not None:
                streamer.end()
            self.last_route = session.route
            self.last_failovers = list(session.remote.failovers)
            if own:
                session.close()
        self.last_stats = stats
        return sequences

    @staticmethod
    def _processors(config):
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        processors = LogitsProcessorList()
        if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if config.do_sample:
            if config.temperature is not None and config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k is not None and config.top_k != 0:
                processors.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                processors.append(TopPLogitsWarper(config.top_p))
        return processors

    def close(self) -> None:
        """Stop the client's P2P daemon and loop thread."""
        if self._active is not None:
            self._active.close()
        try:
            try:
                self._loop.run(self.step_groups.close(), timeout=10)
            finally:
                self._loop.run(self.node.shutdown(), timeout=15)
        finally:
            self._loop.stop()

    def __enter__(self) -> "DistributedModelForCausalLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
