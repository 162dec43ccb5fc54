"""A loaded graph stage: the stateless kind of shard (a transformer span is the KV-cached kind).

The server rebuilds the planner's traced graph from the same factory, checks it against the plan
(graph digest, this stage's weight digest, boundary values), then keeps only stage ``i``'s module:
the rest of the model is dropped, so the process holds this stage's parameters alone.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from swarmshard.core.factory import make_example
from swarmshard.core.graph_plan import GraphPlan, PlanMismatch, Rebuilt, rebuild
from swarmshard.core.shard import Shard
from swarmshard.core.stages import Stage
from swarmshard.transport.schemas import Message, Reply, ServerRecord, StageForward, TensorLimits
from swarmshard.transport.stage_wire import STAGE_LIMITS, decode_values, encode_values


class StageBackend:
    """Executes stage ``index`` of a graph plan on named values; nothing is kept between calls."""

    kind = "stage"

    def __init__(self, rebuilt: Rebuilt, index: int) -> None:
        doc = rebuilt.doc
        self.doc = doc
        self.index = index
        self.entry = doc.stages[index]
        self.shard = Shard(doc.graph_id, index, index + 1, doc.n_stages)
        self.stage: Stage = rebuilt.staged[index]
        self.example_inputs = [rebuilt.values[spec.name] for spec in self.entry.inputs]
        self.limits: TensorLimits = STAGE_LIMITS

    @classmethod
    def load(cls, factory: str, plan_path: str, index: int) -> "StageBackend":
        """Rebuild stage ``index`` of the plan at ``plan_path`` from ``factory``; refuses a mismatch."""
        doc = GraphPlan.load(plan_path)
        if not 0 <= index < doc.n_stages:
            raise PlanMismatch(f"{plan_path} has {doc.n_stages} stages (0..{doc.n_stages - 1}), there is no stage {index}")
        example = make_example(factory, doc.input_shape)
        backend = cls(rebuild(example, doc, stages=[index]), index)
        del example
        gc.collect()  # the full model is unreferenced now: free it before serving
        return backend

    @property
    def param_bytes(self) -> int:
        return self.stage.param_bytes

    def inputs(self, request: StageForward, tensors: list[torch.Tensor]) -> list[Any]:
        """The request's values in calling order, each checked against the plan (names, shapes, dtypes)."""
        return decode_values(request.values, tensors, self.entry.inputs, f"stage {self.index} takes")

    @torch.no_grad()
    def forward(self, values: list[Any]) -> list[Any]:
        return list(self.stage(*values))

    def reply(self, outputs: list[Any]) -> Message:
        entries, tensors = encode_values([spec.name for spec in self.entry.outputs], outputs)
        return Message(meta=Reply(ok=True, values=entries).model_dump(exclude_none=True), tensors=tensors)

    def measure_throughput(self, runs: int = 5, budget_s: float = 2.0) -> float:
        """Forwards/s on the plan's example inputs (announced for routing); bounded in runs and time."""
        self.forward(self.example_inputs)  # warm-up
        done, begin = 0, time.perf_counter()
        while done < runs and time.perf_counter() - begin < budget_s:
            self.forward(self.example_inputs)
            done += 1
        return done / max(time.perf_counter() - begin, 1e-9)

    def record(self, peer_id: str, throughput: float, addrs: list[str], version: str) -> ServerRecord:
        return ServerRecord(
            peer_id=peer_id, model_id=self.shard.model_id, kind="stage",
            start=self.shard.start, end=self.shard.end, n_blocks=self.shard.n_blocks,
            block_digests=[self.entry.param_digest], throughput=round(throughput, 3),
            cache_tokens_left=0, cache_tokens_total=0, addrs=addrs, version=version,
        )
