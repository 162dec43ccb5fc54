"""Stage modules built from plans reproduce the model, stage by stage and end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from swarmshard.core.slicing import NodeSpec, Plan, plan_graph, quotient_is_acyclic
from swarmshard.core.stages import build_stages, run_stages

# 2-4 heterogeneous nodes per model; slow links make the planner care about where cuts go
NODES = [
    NodeSpec(speed=2e6, bandwidth=4e5),
    NodeSpec(speed=1e6, bandwidth=2e5, memory=2e4),
    NodeSpec(speed=3e6, bandwidth=1e6),
    NodeSpec(speed=1.5e6, bandwidth=5e5),
]
STAGE_COUNTS = {"mlp": 3, "resnet": 4, "vit": 3, "bert": 4, "gpt2": 3, "unet": 2, "dict_io": 2, "moe": 4}


def _reference_values(traced, *args, **kwargs) -> dict[str, object]:
    """Every value of the traced graph on these inputs, by node name."""
    interp = torch.fx.Interpreter(traced.module, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*traced.flatten_inputs(*args, **kwargs))
    return {node.name: value for node, value in interp.env.items()}


def _close(a, b) -> float:
    la, lb = tree_flatten(a)[0], tree_flatten(b)[0]
    assert len(la) == len(lb)
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            if x.numel():
                worst = max(worst, float((x.detach().double() - y.detach().double()).abs().max()))
        else:
            assert x == y
    return worst


@pytest.fixture(scope="module")
def staged(zoo):
    cache = {}

    def get(name: str):
        if name not in cache:
            traced = zoo[name].traced
            plan = plan_graph(traced.graph, NODES[: STAGE_COUNTS[name]])
            cache[name] = (plan, build_stages(traced, plan))
        return cache[name]

    return get


def test_stages_match_the_model_stage_by_stage_and_end_to_end(zoo, zoo_name, staged):
    entry = zoo[zoo_name]
    plan, stages = staged(zoo_name)
    assert len(stages) == STAGE_COUNTS[zoo_name] and quotient_is_acyclic(entry.traced.graph, plan.stages)
    reference = _reference_values(entry.traced, *entry.args, **entry.kwargs)
    for stage in stages:
        outs = stage(*(reference[name] for name in stage.spec.inputs))
        assert len(outs) == len(stage.spec.outputs)
        for name, value in zip(stage.spec.outputs, outs):
            assert _close(value, reference[name]) <= 1e-4, f"stage {stage.spec.index} output {name}"
    with torch.no_grad():
        expected = entry.model(*entry.args, **entry.kwargs)
        got = run_stages(stages, *entry.args, **entry.kwargs)
    assert type(got) is type(expected)
    assert _close(got, expected) <= 1e-4


def test_stage_interfaces_chain(zoo, zoo_name, staged):
    traced = zoo[zoo_name].traced
    plan, stages = staged(zoo_name)
    available = set(traced.input_names)
    for stage, ops in zip(stages, plan.stages):
        assert stage.spec.ops == ops
        assert set(stage.spec.inputs) <= available, "a stage reads a value no earlier stage sends"
        assert len(set(stage.spec.inputs)) == len(stage.spec.inputs)
        placeholders = [n.name for n in stage.module.graph.nodes if n.op == "placeholder"]
        assert placeholders == list(stage.spec.inputs)
        available |= set(stage.spec.outputs)
    assert set(traced.output_sources) <= available
    # nothing is sent that nobody reads
    read = set(traced.output_sources).union(*(s.spec.inputs for s in stages))
    assert all(set(s.spec.outputs) <= read for s in stages)


def test_each_stage_holds_only_its_own_parameters(zoo, zoo_name, staged):
    traced = zoo[zoo_name].traced
    graph = traced.graph
    plan, stages = staged(zoo_name)

    def resolve(name: str) -> torch.Tensor:
        obj = traced.module
        for atom in name.split("."):
            obj = getattr(obj, atom)
        return obj

    total = 0
    for stage in stages:
        wanted = {id(resolve(p)) for op in stage.spec.ops
                  for p in (*graph.nodes[op].params, *graph.nodes[op].shared_params)}
        held = {id(resolve(p)) for p in stage.spec.params}
        assert held == wanted
        total += stage.param_bytes
    owned = sum(graph.nodes[op].param_bytes for ops in plan.stages for op in ops)
    assert owned == graph.total_param_bytes
    assert total >= graph.total_param_bytes  # tensors shared across stages are held by each user


def test_tied_weights_split_across_stages_are_held_by_both(zoo):
    traced = zoo["gpt2"].traced
    graph = traced.graph
    (_, (owner, other)), = graph.shared_params.items()
    order = list(graph.nodes)
    cut = order.index(owner) + 1  # embedding in stage 0, lm_head in stage 1
    nodes = (NodeSpec(1.0, 1.0), NodeSpec(1.0, 1.0))
    plan = Plan(order=tuple(order), cuts=(0, cut, len(order)), nodes=nodes, costs=(), bottleneck=0.0)
    stages = build_stages(traced, plan)
    assert other in stages[1].spec.ops
    assert stages[0].param_bytes + stages[1].param_bytes > graph.total_param_bytes
    entry = zoo["gpt2"]
    assert _close(run_stages(stages, *entry.args), entry.model(*entry.args)) <= 1e-4


def test_out_of_order_stages_are_refused(zoo):
    traced = zoo["mlp"].traced
    plan = plan_graph(traced.graph, NODES[:2])
    swapped = dataclasses.replace(plan, order=plan.order[plan.cuts[1]:] + plan.order[: plan.cuts[1]],
                                  cuts=(0, len(plan.order) - plan.cuts[1], len(plan.order)))
    with pytest.raises(ValueError, match="topological order of the quotient"):
        build_stages(traced, swapped)
    missing = dataclasses.replace(plan, order=plan.order[:-1], cuts=(0, plan.cuts[1], len(plan.order) - 1))
    with pytest.raises(ValueError, match="covers"):
        build_stages(traced, missing)
