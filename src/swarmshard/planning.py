"""`swarmshard plan`: trace a factory's model, slice it for a set of nodes, describe the result.

Nodes come from a YAML file (validated with pydantic) so heterogeneous swarms can be described
once and planned for many models::

    nodes:
      - name: desktop
        speed: 40 GFLOPS        # FLOP/s: a number, or with a unit (kFLOPS .. TFLOPS)
        bandwidth: 1 Gbit/s     # bytes/s: a number, or B/s .. GB/s, KiB/s .. GiB/s, kbit/s .. Gbit/s
        memory: 8 GiB           # fast memory, bytes or B .. TB, KiB .. TiB; omit for unlimited
      - name: laptop
        speed: 10 GFLOPS
        bandwidth: 100 Mbit/s
        memory: 2 GiB
        allow_overflow: false   # memory is a hard limit (default: overflow is streamed, and costs time)

Stage i runs on node i. A file with one node describes k identical nodes.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.table import Table

from swarmshard.core.factory import GraphExample, make_example
from swarmshard.core.graph import TracedModel, trace_model
from swarmshard.core.graph_plan import GraphPlan, make_graph_plan
from swarmshard.core.slicing import NodeSpec, Plan, brkga_search, plan_graph

__all__ = ["NodesFileError", "NodeEntry", "NodesFile", "DEFAULT_NODE", "load_nodes", "nodes_for", "PlanResult",
           "make_plan", "plan_table", "bottleneck_stage"]

# a modest CPU and a 1 Gbit/s link: the reference node when no nodes file is given
DEFAULT_NODE = NodeSpec(speed=20e9, bandwidth=125e6)


class NodesFileError(ValueError):
    """A nodes file that cannot be read or does not validate; the text names the entry and field."""


_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")
_UNITS = {  # unit (after the prefix, lower case) -> factor to the base unit
    "speed": {"flops": 1.0, "flop/s": 1.0},
    "bandwidth": {"b/s": 1.0, "bit/s": 1 / 8},
    "memory": {"b": 1.0},
}


def _quantity(value: Any, kind: str) -> Any:
    """A number, or a string like ``"40 GFLOPS"`` / ``"1 Gbit/s"`` / ``"8 GiB"`` in base units."""
    if not isinstance(value, str):
        return value
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a number with an optional unit")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit:
        return number
    for base, factor in _UNITS[kind].items():
        if unit.endswith(base) and unit[: len(unit) - len(base)] in _PREFIX:
            return number * _PREFIX[unit[: len(unit) - len(base)]] * factor
    allowed = ", ".join(_UNITS[kind])
    raise ValueError(f"unknown unit {match.group(2)!r} (use a prefix k, M, G, T, Ki, Mi, Gi, Ti and one of {allowed})")


class NodeEntry(BaseModel):
    """One machine of the nodes file (units are converted to FLOP/s, bytes/s and bytes)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    speed: float = Field(gt=0)
    bandwidth: float = Field(gt=0)
    memory: float | None = Field(None, ge=0)
    allow_overflow: bool = True
    overflow_bandwidth: float | None = Field(None, gt=0)

    @field_validator("speed", mode="before")
    @classmethod
    def _speed(cls, v: Any) -> Any:
        return _quantity(v, "speed")

    @field_validator("bandwidth", "overflow_bandwidth", mode="before")
    @classmethod
    def _bandwidth(cls, v: Any) -> Any:
        return _quantity(v, "bandwidth")

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return _quantity(v, "memory")

    def spec(self) -> NodeSpec:
        return NodeSpec(speed=self.speed, bandwidth=self.bandwidth,
                        memory=math.inf if self.memory is None else self.memory,
                        allow_overflow=self.allow_overflow, overflow_bandwidth=self.overflow_bandwidth)


class NodesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: list[NodeEntry] = Field(min_length=1)


def load_nodes(path: str | Path) -> list[NodeEntry]:
    """Read and validate a nodes file (a mapping with ``nodes:``, or a bare list of nodes)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise NodesFileError(f"cannot read nodes file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise NodesFileError(f"nodes file {path} is not valid YAML: {exc}") from None
    if isinstance(data, list):
        data = {"nodes": data}
    try:
        return NodesFile.model_validate(data).nodes
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        raise NodesFileError(f"nodes file {path} is invalid: " + "; ".join(parts)) from None


def nodes_for(stages: int | None, entries: Sequence[NodeEntry] | None) -> tuple[list[NodeSpec], list[str]]:
    """The k node specs (and names) to plan for, from ``--stages`` and/or a nodes file."""
    if entries:
        if stages is None:
            stages = len(entries)
        if len(entries) == 1:
            entries = list(entries) * stages
        elif len(entries) != stages:
            raise NodesFileError(f"the nodes file lists {len(entries)} nodes but {stages} stages were asked for "
                                 "(give one node per stage, or a single node for all)")
        names = [e.name or f"node{i}" for i, e in enumerate(entries)]
        return [e.spec() for e in entries], names
    if stages is None or stages < 1:
        raise NodesFileError("give --stages K (K >= 1) or a --nodes file")
    return [DEFAULT_NODE] * stages, ["default"] * stages


@dataclass
class PlanResult:
    doc: GraphPlan
    example: GraphExample
    traced: TracedModel
    plan: Plan
    node_names: list[str]


def make_plan(factory: str, nodes: Sequence[NodeSpec], node_names: Sequence[str] | None = None,
              input_shape: Sequence[int] | None = None, search: bool = False, seed: int = 0) -> PlanResult:
    """Trace ``factory``'s model and slice it optimally for ``nodes`` (stage i on node i).

    ``search`` also runs the genetic search over topological orders (never worse than Kahn's).
    """
    example = make_example(factory, input_shape)
    traced = trace_model(example.model, example.args, example.kwargs)
    if search:
        plan = brkga_search(traced.graph, list(nodes), random.Random(seed)).plan
    else:
        plan = plan_graph(traced.graph, list(nodes))
    doc, _ = make_graph_plan(example, traced, plan)
    names = list(node_names) if node_names is not None else [f"node{i}" for i in range(len(nodes))]
    return PlanResult(doc=doc, example=example, traced=traced, plan=plan, node_names=names)


def bottleneck_stage(plan: Plan) -> int:
    return max(range(len(plan.costs)), key=lambda i: plan.costs[i].total)


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def _names(values: Sequence[Any], limit: int = 3) -> str:
    names = [v.name for v in values]
    shown = ", ".join(names[:limit]) + (f", +{len(names) - limit}" if len(names) > limit else "")
    return f"{len(names)}: {shown}" if names else "0"


def plan_table(result: PlanResult) -> Table:
    """One row per stage: ops, params, GFLOPs, boundary values and bytes, estimated time; bottleneck marked."""
    doc, plan = result.doc, result.plan
    worst = bottleneck_stage(plan)
    table = Table(title=f"{doc.factory} -> {doc.n_stages} stages ({doc.graph_id}, {doc.n_ops} ops, traced with {doc.method})",
                  caption=f"bottleneck: stage {worst}, {_num(plan.bottleneck * 1e3)} ms per forward "
                          f"(~{_num(1 / plan.bottleneck) if plan.bottleneck > 0 else 'inf'} forwards/s pipelined)")
    for column, justify in [("stage", "right"), ("node", "left"), ("ops", "right"), ("params MB", "right"),
                            ("GFLOPs", "right"), ("inputs", "left"), ("outputs", "left"), ("boundary MB", "right"),
                            ("est. ms", "right"), ("", "left")]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for i, (entry, cost) in enumerate(zip(doc.stages, plan.costs)):
        table.add_row(
            str(i), result.node_names[i] if i < len(result.node_names) else "", str(len(entry.ops)),
            _num(entry.param_bytes / 1e6), _num(cost.work / 1e9), _names(entry.inputs), _names(entry.outputs),
            _num(cost.io_bytes / 1e6), _num(cost.total * 1e3), "◀ bottleneck" if i == worst else "",
            style="bold red" if i == worst else None,
        )
    return table
