"""`RemoteStagedModel`: any traced model whose stages run on the swarm, called like the original.

The client rebuilds the model from the plan's factory only to learn its input/output structure and
to check the plan; it drops the weights and runs nothing locally. Each call finds the stage servers
in the DHT (records under the plan's graph id whose weight digests match the plan), chains stage
0..k-1 with one stateless forward per hop, and passes values by name, like
:func:`swarmshard.core.stages.run_stages` does in one process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from swarmshard.aio import LoopThread
from swarmshard.client.session import RemoteError
from swarmshard.core.factory import make_example
from swarmshard.core.graph_plan import GraphPlan, Rebuilt, rebuild
from swarmshard.core.routing import Candidate, NoRoute, RouteHop, choose_route
from swarmshard.transport.p2p import SwarmNode
from swarmshard.transport.schemas import FORWARD_RPC, Message, Reply, ServerRecord, StageForward, WireError, parse_meta
from swarmshard.transport.stage_wire import STAGE_LIMITS, decode_values, encode_values


def trusted_stage_records(records: Sequence[ServerRecord], doc: GraphPlan) -> list[ServerRecord]:
    """Stage servers of exactly this plan: one stage each, announcing that stage's weight digest."""
    k = doc.n_stages
    return [
        r for r in records
        if r.kind == "stage" and r.n_blocks == k and 0 <= r.start < k and r.end == r.start + 1
        and r.block_digests == [doc.stages[r.start].param_digest]
    ]


class RemoteStagedModel:
    """Client of the stage servers of one graph plan; see the module docstring."""

    def __init__(self, rebuilt: Rebuilt, initial_peers: Sequence[str], timeout: float = 30.0) -> None:
        self.doc = rebuilt.doc
        # structure only: the traced module (all weights) is not kept, the client computes nothing
        self.structure = dataclasses.replace(rebuilt.traced, module=None)  # type: ignore[arg-type]
        self.constants = dict(rebuilt.staged.constants)
        self.timeout = timeout
        self.banned: set[str] = set()
        self.last_route: list[RouteHop] = []
        self.last_hop_seconds: list[float] = []
        self._connected: set[str] = set()
        self._loop = LoopThread(name="swarmshard-graph-client")
        try:
            self.node: SwarmNode = self._loop.run(
                SwarmNode.create(initial_peers=list(initial_peers), client_mode=True, limits=STAGE_LIMITS), timeout=60
            )
        except BaseException:
            self._loop.stop()
            raise

    @classmethod
    def from_plan(cls, factory: str, plan: str | Path | GraphPlan, initial_peers: Sequence[str],
                  timeout: float = 30.0) -> "RemoteStagedModel":
        """Rebuild ``factory``'s model, check it against ``plan`` (a path or a loaded plan), connect."""
        doc = plan if isinstance(plan, GraphPlan) else GraphPlan.load(plan)
        rebuilt = rebuild(make_example(factory, doc.input_shape), doc, stages=())
        return cls(rebuilt, initial_peers, timeout)

    # ---- swarm view ---------------------------------------------------------------------------------

    def servers(self) -> list[ServerRecord]:
        return self._loop.run(self.node.fetch(self.doc.graph_id), timeout=self.timeout)

    def plan_route(self, records: Sequence[ServerRecord] | None = None) -> list[RouteHop]:
        """The fastest chain of stage servers for stages 0..k-1 (announced throughput)."""
        trusted = trusted_stage_records(self.servers() if records is None else records, self.doc)
        candidates = [Candidate(r.peer_id, r.start, r.end, r.throughput, 0) for r in trusted]
        return choose_route(candidates, self.doc.n_stages, 0, self.banned)

    def wait_for_route(self, timeout: float = 60.0) -> list[RouteHop]:
        """Poll the DHT until every stage is served (announcements take a moment to spread)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.plan_route()
            except NoRoute:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # ---- compute -----------------------------------------------------------------------------------

    def _check_inputs(self, flat: Sequence[torch.Tensor]) -> None:
        for spec, tensor in zip(self.doc.inputs, flat):
            dtype = str(tensor.dtype).removeprefix("torch.")
            if [list(tensor.shape)] != spec.shapes or [dtype] != spec.dtypes:
                raise ValueError(
                    f"input {spec.name!r} must be {spec.dtypes[0]} of shape {tuple(spec.shapes[0])} as in the plan, got "
                    f"{dtype} of shape {tuple(tensor.shape)}; plan again with --input-shape for other shapes"
                )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on the swarm; returns what the original model returns (same structure)."""
        flat = self.structure.flatten_inputs(*args, **kwargs)
        self._check_inputs(flat)
        values: dict[str, Any] = dict(zip(self.structure.input_names, flat))
        values.update(self.constants)
        records = self.servers()
        route = self.plan_route(records)
        by_peer = {r.peer_id: r for r in records}
        self.last_route = route
        self.last_hop_seconds = self._loop.run(self._run(route, by_peer, values),
                                               timeout=self.timeout * (len(route) + 1) + 5)
        return self.structure.unflatten_outputs([values[name] for name in self.structure.output_sources])

    forward = __call__

    async def _run(self, route: list[RouteHop], by_peer: dict[str, ServerRecord],
                   values: dict[str, Any]) -> list[float]:
        loop = asyncio.get_running_loop()
        seconds: list[float] = []
        for hop in route:
            entry = self.doc.stages[hop.start]
            if hop.peer_id in by_peer and hop.peer_id not in self._connected:
                await self.node.connect(by_peer[hop.peer_id])
                self._connected.add(hop.peer_id)
            begin = loop.time()
            stream = await asyncio.wait_for(self.node.open_stream(hop.peer_id, FORWARD_RPC), self.timeout)
            try:
                names = [spec.name for spec in entry.inputs]
                entries, tensors = encode_values(names, [values[name] for name in names])
                meta = StageForward(model_id=self.doc.graph_id, start=hop.start, end=hop.end, values=entries)
                reply = await asyncio.wait_for(stream.send(Message(meta=meta.model_dump(), tensors=tensors)),
                                               self.timeout)
            finally:
                await stream.close()
            try:
                answer = parse_meta(Reply, reply.meta)
                if not answer.ok:
                    raise RemoteError(hop.peer_id, answer.error or "unknown error")
                outputs = decode_values(answer.values or [], reply.tensors, entry.outputs,
                                        f"stage {hop.start} should send")
            except WireError as exc:
                raise RemoteError(hop.peer_id, f"malformed reply: {exc}") from None
            values.update(zip((spec.name for spec in entry.outputs), outputs))
            seconds.append(loop.time() - begin)
        return seconds

    def close(self) -> None:
        """Stop the client's P2P daemon and loop thread."""
        try:
            self._loop.run(self.node.shutdown(), timeout=15)
        finally:
            self._loop.stop()

    def __enter__(self) -> "RemoteStagedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
