"""Executable pipeline stages from a slicing plan.

Each stage is its own fx ``GraphModule`` holding only the parameters its ops use (a parameter
shared across stages, such as tied embeddings, is present in each stage that uses it). A stage
takes its inputs and returns its outputs as flat tuples, in the order named by its
:class:`StageSpec`, so a runtime -- or :func:`run_stages` -- can chain stages by value name alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from swarmshard.core.graph import TracedModel
from swarmshard.core.slicing import Plan

__all__ = ["StageSpec", "Stage", "StagedModel", "build_stages", "run_stages"]


@dataclass(frozen=True)
class StageSpec:
    """What a stage computes and exchanges: value names, in calling/return order.

    ``inputs`` are graph inputs or values from earlier stages; ``outputs`` are values later stages
    or the model's output need. ``params`` are the state tensors (parameters, buffers, constants)
    the stage holds.
    """

    index: int
    ops: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...]


@dataclass
class Stage:
    spec: StageSpec
    module: torch.fx.GraphModule

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        if len(inputs) != len(self.spec.inputs):
            raise ValueError(f"stage {self.spec.index} takes {len(self.spec.inputs)} inputs "
                             f"{self.spec.inputs}, got {len(inputs)}")
        return tuple(self.module(*inputs))

    @property
    def param_bytes(self) -> int:
        state = dict(self.module.named_parameters())
        state.update(self.module.named_buffers())
        return sum(t.numel() * t.element_size() for t in state.values())


@dataclass
class StagedModel:
    """The stages of one plan plus what is needed to feed and reassemble them."""

    stages: list[Stage]
    traced: TracedModel
    constants: dict[str, Any]  # model outputs that are attributes, not computed values

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, index: int) -> Stage:
        return self.stages[index]


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    for name, value in vars(module).items():  # plain tensor attributes (export's lifted constants)
        if isinstance(value, torch.Tensor) and name not in state:
            state[name] = value
    for prefix, sub in module.named_children():
        for name, value in _state_tensors(sub).items():
            state.setdefault(f"{prefix}.{name}", value)
    return state


def build_stages(traced: TracedModel, plan: Plan) -> StagedModel:
    """One ``GraphModule`` per plan stage, in plan order.

    Stages must be ordered so that each one only consumes graph inputs and values of earlier
    stages (true for contiguous slices of a topological order); anything else is refused.
    """
    gm = traced.module
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    op_names = set(traced.graph.nodes)
    stage_of: dict[str, int] = {}
    for s, ops in enumerate(plan.stages):
        for name in ops:
            if name not in op_names:
                raise ValueError(f"plan names op {name!r}, which is not in the traced graph")
            if name in stage_of:
                raise ValueError(f"op {name!r} is in stages {stage_of[name]} and {s}")
            stage_of[name] = s
    if len(stage_of) != len(op_names):
        raise ValueError(f"plan covers {len(stage_of)} of {len(op_names)} ops")

    # who needs each value: later stages, or the model output (stage index = number of stages)
    n_stages = len(plan.stages)
    needed_by: dict[str, set[int]] = {}
    for name in op_names:
        for user in fx_nodes[name].users:
            target = n_stages if user.op == "output" else stage_of[user.name]
            needed_by.setdefault(name, set()).add(target)

    stages: list[Stage] = []
    for s, ops in enumerate(plan.stages):
        graph = torch.fx.Graph()
        env: dict[str, torch.fx.Node] = {}
        inputs: list[str] = []
        attrs: dict[str, torch.fx.Node] = {}

        def lookup(node: torch.fx.Node) -> torch.fx.Node:
            if node.op == "get_attr":
                if node.name not in attrs:
                    attrs[node.name] = graph.get_attr(str(node.target))
                return attrs[node.name]
            if node.name in env:
                return env[node.name]
            if node.op != "placeholder" and stage_of[node.name] >= s:
                raise ValueError(f"stage {s} needs {node.name!r} from stage {stage_of[node.name]}; "
                                 "stages must be in a topological order of the quotient graph")
            inputs.append(node.name)
            env[node.name] = graph.placeholder(node.name)
            return env[node.name]

        # placeholders are created on first use (so in ``inputs`` order); hoist them to the top
        for name in ops:
            env[name] = graph.node_copy(fx_nodes[name], lookup)
        outputs = tuple(name for name in ops if any(t > s for t in needed_by.get(name, ())))
        graph.output(tuple(env[name] for name in outputs))
        _hoist_placeholders(graph, [env[name] for name in inputs])
        module = torch.fx.GraphModule(gm, graph, class_name=f"Stage{s}")
        params = tuple(_state_tensors(module))
        spec = StageSpec(index=s, ops=tuple(ops), inputs=tuple(inputs), outputs=outputs, params=params)
        stages.append(Stage(spec=spec, module=module))

    constants = {n.name: _fetch(gm, str(n.target)) for n in fx_nodes.values()
                 if n.op == "get_attr" and n.name in traced.output_sources}
    return StagedModel(stages=stages, traced=traced, constants=constants)


def _hoist_placeholders(graph: torch.fx.Graph, placeholders: Sequence[torch.fx.Node]) -> None:
    """Move ``placeholders`` to the top of ``graph``, keeping their order (the calling order)."""
    head = next(iter(graph.nodes))
    for ph in reversed(placeholders):
        if ph is not head:
            head.prepend(ph)
        head = ph
    graph.lint()


def _fetch(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def run_stages(stages: StagedModel, *args: Any, **kwargs: Any) -> Any:
    """Run the stages in order, passing values by name; returns what the original model returns."""
    traced = stages.traced
    values: dict[str, Any] = dict(zip(traced.input_names, traced.flatten_inputs(*args, **kwargs)))
    values.update(stages.constants)
    with torch.no_grad():
        for stage in stages.stages:
            outs = stage(*(values[name] for name in stage.spec.inputs))
            values.update(zip(stage.spec.outputs, outs))
    return traced.unflatten_outputs([values[name] for name in traced.output_sources])
