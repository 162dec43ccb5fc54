"""The plan file (``plan.json``): a sliced graph that servers and clients can rebuild and check.

A plan made on one machine is executed by processes elsewhere, each rebuilding the model from the
same factory. Nothing guarantees they get the same graph or weights (another library version,
another input shape, an unseeded factory), so the file carries what is needed to *check*:

- ``graph_digest``: SHA-256 of the traced graph's structure (ops, targets, edges, parameter
  names, output shapes and dtypes, input/output structure) -- not of FLOP estimates;
- per stage, ``param_digest``: SHA-256 of the stage's state tensors (names, dtypes, shapes, bytes);
- per stage, the boundary values it reads and sends (name, kind, shapes, dtypes), which become the
  wire contract of its forward;
- ``graph_id``: derived from all of the above and the cuts; it is the model id servers announce
  under, so only servers of exactly this plan meet in the DHT.

:func:`rebuild` traces the factory's model again and raises :class:`PlanMismatch` naming what
differs. Pure apart from running the model once on its example inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
from pydantic import BaseModel, ConfigDict, Field

from swarmshard.core.factory import GraphExample
from swarmshard.core.graph import TracedModel, trace_model
from swarmshard.core.slicing import Plan
from swarmshard.core.stages import StagedModel, build_stages

__all__ = [
    "PLAN_FORMAT",
    "PlanMismatch",
    "PlanFileError",
    "ValueSpec",
    "StageEntry",
    "GraphPlan",
    "Rebuilt",
    "graph_digest",
    "state_digest",
    "describe_value",
    "make_graph_plan",
    "rebuild",
]

PLAN_FORMAT = "swarmshard-graph-plan/1"


class PlanMismatch(ValueError):
    """The factory's model is not the one the plan was made for; the text says what differs."""


class PlanFileError(ValueError):
    """A plan file that cannot be read or is internally inconsistent."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValueSpec(_Model):
    """A value crossing a stage boundary: a tensor, a tuple of tensors, or a Python scalar."""

    name: str
    kind: Literal["tensor", "tuple", "scalar"]
    shapes: list[list[int]] = Field(default_factory=list)
    dtypes: list[str] = Field(default_factory=list)
    scalar_type: Literal["bool", "int", "float"] | None = None

    @property
    def nbytes(self) -> int:
        total = 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            count = 1
            for d in shape:
                count *= d
            total += count * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        return total if self.kind != "scalar" else 8


class StageEntry(_Model):
    index: int
    ops: list[str]
    inputs: list[ValueSpec]
    outputs: list[ValueSpec]
    param_count: int
    param_bytes: int
    param_digest: str


class GraphPlan(_Model):
    """Contents of ``plan.json``; ``plan`` is :meth:`Plan.to_json`'s object (order, cuts, nodes, costs)."""

    format: Literal["swarmshard-graph-plan/1"] = PLAN_FORMAT
    graph_id: str
    factory: str
    input_shape: list[int] | None = None
    method: Literal["fx", "export"]
    graph_digest: str
    n_ops: int
    total_flops: float
    total_param_bytes: int
    inputs: list[ValueSpec]
    outputs: list[str]
    stages: list[StageEntry]
    plan: dict[str, Any]

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def core_plan(self) -> Plan:
        return Plan.from_json(json.dumps(self.plan))

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "GraphPlan":
        """Parse and check internal consistency (stages match cuts, the id matches the contents)."""
        try:
            doc = cls.model_validate_json(text)
        except Exception as exc:
            first = str(exc).splitlines()
            raise PlanFileError(f"{source} is not a swarmshard graph plan ({PLAN_FORMAT}): "
                                f"{' '.join(first[:3])}") from None
        try:
            plan = doc.core_plan()
        except (KeyError, ValueError, TypeError) as exc:
            raise PlanFileError(f"{source}: its 'plan' section is malformed: {exc}") from None
        if [list(s) for s in plan.stages] != [s.ops for s in doc.stages]:
            raise PlanFileError(f"{source}: stage op lists do not match the plan's order and cuts")
        if [s.index for s in doc.stages] != list(range(len(doc.stages))):
            raise PlanFileError(f"{source}: stages must be numbered 0..{len(doc.stages) - 1} in order")
        expected = _graph_id(doc.graph_digest, [s.ops for s in doc.stages], [s.param_digest for s in doc.stages])
        if doc.graph_id != expected:
            raise PlanFileError(f"{source}: graph_id {doc.graph_id} does not match its contents ({expected}); "
                                "the file was edited or corrupted")
        return doc

    @classmethod
    def load(cls, path: str | Path) -> "GraphPlan":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PlanFileError(f"cannot read plan {path}: {exc.strerror or exc}") from None
        return cls.from_json(text, source=str(path))


# --------------------------------------------------------------------------------------------
# digests


def graph_digest(traced: TracedModel) -> str:
    """SHA-256 of what decides the computation's structure (see the module docstring)."""
    g = traced.graph
    body = {
        "method": traced.method,
        "in_spec": str(traced.in_spec),
        "out_spec": str(traced.out_spec),
        "input_names": list(traced.input_names),
        "output_sources": list(traced.output_sources),
        "inputs": sorted(g.inputs),
        "outputs": list(g.outputs),
        "nodes": [[n.name, n.op, n.target, list(n.inputs), list(n.params), list(n.shared_params),
                   [list(s) for s in n.output_shapes], list(n.output_dtypes)] for n in g.nodes.values()],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fetch(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def state_digest(module: torch.nn.Module, names: Iterable[str]) -> str:
    """SHA-256 over the named state tensors of ``module`` (sorted by name): the weights a stage runs."""
    h = hashlib.sha256()
    for name in sorted(names):
        tensor = _fetch(module, name)
        if not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{str(data.dtype).removeprefix('torch.')}|{list(data.shape)}|".encode())
        if data.numel():
            h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _graph_id(digest: str, stage_ops: Sequence[Sequence[str]], param_digests: Sequence[str]) -> str:
    body = json.dumps([digest, [list(s) for s in stage_ops], list(param_digests)], separators=(",", ":"))
    return "graph-" + hashlib.sha256(body.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# boundary values


def describe_value(name: str, value: Any) -> ValueSpec:
    """How ``value`` travels between stages; refuses what the wire cannot carry, naming it."""
    if isinstance(value, torch.Tensor):
        return ValueSpec(name=name, kind="tensor", shapes=[list(value.shape)],
                         dtypes=[str(value.dtype).removeprefix("torch.")])
    if isinstance(value, (tuple, list)) and value and all(isinstance(x, torch.Tensor) for x in value):
        return ValueSpec(name=name, kind="tuple", shapes=[list(x.shape) for x in value],
                         dtypes=[str(x.dtype).removeprefix("torch.") for x in value])
    if isinstance(value, (bool, int, float)):
        return ValueSpec(name=name, kind="scalar", scalar_type=type(value).__name__)  # type: ignore[arg-type]
    raise PlanMismatch(f"value {name!r} crossing a stage boundary is a {type(value).__name__}; only tensors, "
                       "tuples of tensors and Python scalars can travel between stages (try other cuts)")


class _Recorder(torch.fx.Interpreter):
    """Runs the flat module once, keeping only the values named in ``wanted``."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = result
        return result


def _boundary_values(traced: TracedModel, staged: StagedModel, example: GraphExample) -> dict[str, Any]:
    wanted = set(traced.input_names)
    for stage in staged:
        wanted.update(stage.spec.inputs, stage.spec.outputs)
    recorder = _Recorder(traced.module, wanted)
    with torch.no_grad():
        recorder.run(*traced.flatten_inputs(*example.args, **example.kwargs))
    return recorder.values


# --------------------------------------------------------------------------------------------
# making and checking plans


def _stage_entry(staged: StagedModel, index: int, values: dict[str, Any]) -> StageEntry:
    stage = staged[index]
    state = [name for name in stage.spec.params if isinstance(_fetch(stage.module, name), torch.Tensor)]
    return StageEntry(
        index=index,
        ops=list(stage.spec.ops),
        inputs=[describe_value(n, values[n]) for n in stage.spec.inputs],
        outputs=[describe_value(n, values[n]) for n in stage.spec.outputs],
        param_count=len(state),
        param_bytes=stage.param_bytes,
        param_digest=state_digest(stage.module, state),
    )


def make_graph_plan(example: GraphExample, traced: TracedModel, plan: Plan) -> tuple[GraphPlan, StagedModel]:
    """The plan document for ``plan`` over ``traced`` (built from ``example``) and its stages."""
    staged = build_stages(traced, plan)
    values = _boundary_values(traced, staged, example)
    entries = [_stage_entry(staged, i, values) for i in range(len(staged))]
    digest = graph_digest(traced)
    doc = GraphPlan(
        graph_id=_graph_id(digest, [e.ops for e in entries], [e.param_digest for e in entries]),
        factory=example.factory,
        input_shape=list(example.input_shape) if example.input_shape is not None else None,
        method=traced.method,
        graph_digest=digest,
        n_ops=len(traced.graph),
        total_flops=traced.graph.total_flops,
        total_param_bytes=traced.graph.total_param_bytes,
        inputs=[describe_value(n, values[n]) for n in traced.input_names],
        outputs=list(traced.output_sources),
        stages=entries,
        plan=json.loads(plan.to_json()),
    )
    return doc, staged


@dataclass
class Rebuilt:
    """A plan re-created from its factory and checked: the traced model, its stages, example values."""

    doc: GraphPlan
    traced: TracedModel
    staged: StagedModel
    values: dict[str, Any]  # example inputs/outputs of every stage boundary, by name


def rebuild(example: GraphExample, doc: GraphPlan, stages: Iterable[int] | None = None) -> Rebuilt:
    """Trace ``example`` like the planner did and check it against ``doc``.

    ``stages`` limits the weight check to the stages this process runs (a server hashes only its
    own). Raises :class:`PlanMismatch` naming the first difference.
    """
    traced = trace_model(example.model, example.args, example.kwargs, method=doc.method)
    digest = graph_digest(traced)
    if digest != doc.graph_digest:
        shape = f", input shape {list(example.input_shape)}" if example.input_shape else ""
        raise PlanMismatch(
            f"the plan does not match the graph: it was made for {doc.factory} (graph digest "
            f"{doc.graph_digest[:12]}, {doc.n_ops} ops), but {example.factory}{shape} traces to graph digest "
            f"{digest[:12]} ({len(traced.graph)} ops); re-run `swarmshard plan --graph {example.factory}`"
        )
    staged = build_stages(traced, doc.core_plan())
    values = _boundary_values(traced, staged, example)
    for i in (range(len(staged)) if stages is None else stages):
        if not 0 <= i < doc.n_stages:
            raise PlanMismatch(f"the plan has {doc.n_stages} stages (0..{doc.n_stages - 1}), there is no stage {i}")
        entry = _stage_entry(staged, i, values)
        want = doc.stages[i]
        if entry.param_digest != want.param_digest:
            raise PlanMismatch(
                f"stage {i}'s weights differ from the plan's (param digest {entry.param_digest[:12]}, plan has "
                f"{want.param_digest[:12]}): {example.factory} must build the same weights in every process "
                "(seed it or load a checkpoint)"
            )
        if (entry.inputs, entry.outputs) != (want.inputs, want.outputs):
            raise PlanMismatch(f"stage {i}'s boundary values differ from the plan's")
    return Rebuilt(doc=doc, traced=traced, staged=staged, values=values)
