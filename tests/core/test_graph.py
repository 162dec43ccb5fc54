"""Tracing arbitrary modules into annotated op graphs."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch.utils._pytree import tree_flatten

from swarmshard.core.graph import (
    OpGraph,
    OpNode,
    TraceError,
    profile_nodes,
    random_op_graph,
    trace_model,
)
from swarmshard.core.slicing import SegmentCost, topological_order

FX_MODELS = {"mlp", "unet", "dict_io", "moe"}


def _max_diff(a, b) -> float:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb
    return max(float((x - y).detach().abs().max()) for x, y in zip(la, lb) if isinstance(x, torch.Tensor))


def _resolve(module: torch.nn.Module, name: str) -> torch.Tensor:
    obj = module
    for atom in name.split("."):
        obj = getattr(obj, atom)
    return obj


def test_traced_module_reproduces_the_model(zoo, zoo_name):
    entry = zoo[zoo_name]
    with torch.no_grad():
        expected = entry.model(*entry.args, **entry.kwargs)
        got = entry.traced(*entry.args, **entry.kwargs)
    assert type(got) is type(expected)
    assert _max_diff(got, expected) <= 1e-5
    # plain fx where it works; torch.export for models fx cannot follow (transformers)
    assert entry.traced.method == ("fx" if zoo_name in FX_MODELS else "export")


def test_graph_is_a_consistent_dag(zoo, zoo_name):
    traced = zoo[zoo_name].traced
    g = traced.graph
    seen = set(g.inputs)
    for name, node in g.nodes.items():
        assert set(node.inputs) <= seen, f"{name} reads a value defined later"
        seen.add(name)
        for pred in g.predecessors(name):
            assert name in g.successors(pred)
    assert set(g.outputs) <= set(g.nodes) | set(g.inputs) and g.outputs
    flat = traced.flatten_inputs(*zoo[zoo_name].args, **zoo[zoo_name].kwargs)
    assert list(g.inputs.values()) == [t.numel() * t.element_size() for t in flat]
    assert topological_order(g) == list(g.nodes)


def test_each_parameter_is_attributed_once(zoo, zoo_name):
    entry = zoo[zoo_name]
    g, module = entry.traced.graph, entry.traced.module
    owned = [p for node in g.nodes.values() for p in node.params]
    tensors = [_resolve(module, p) for p in owned]
    assert len({id(t) for t in tensors}) == len(tensors), "a tensor is attributed to two ops"
    for node in g.nodes.values():
        assert node.param_bytes == sum(_resolve(module, p).numel() * _resolve(module, p).element_size()
                                       for p in node.params)
        assert not set(node.params) & set(node.shared_params)
    unique_params = {id(p): p for p in entry.model.parameters()}
    unique_state = dict(unique_params)
    unique_state.update({id(b): b for b in entry.model.buffers()})
    param_bytes = sum(p.numel() * p.element_size() for p in unique_params.values())
    state_bytes = sum(t.numel() * t.element_size() for t in unique_state.values())
    assert param_bytes <= g.total_param_bytes <= state_bytes


def test_tied_weights_are_counted_once_and_recorded():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=40, n_embd=8, n_layer=1, n_head=2, n_positions=16, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    traced = trace_model(model, (torch.randint(0, 40, (1, 4)),))
    g = traced.graph
    (name, users), = g.shared_params.items()
    owner, other = users
    assert name in g.nodes[owner].params and name in g.nodes[other].shared_params
    assert g.nodes[owner].target.endswith("embedding") and g.nodes[other].target.endswith("linear")
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups
    assert g.total_param_bytes == total


def test_flops_are_counted_per_op_kind(zoo):
    mlp = zoo["mlp"].traced.graph
    first_linear, relu = list(mlp.nodes.values())[:2]
    assert first_linear.flops == 2 * 2 * 8 * 16  # batch 2, 8 -> 16, multiply-add = 2 FLOPs
    assert relu.flops == 2 * 16  # elementwise: one per output element

    unet = zoo["unet"].traced.graph
    conv = unet.nodes["down1"]
    assert conv.flops == 2 * (1 * 4 * 8 * 8) * (3 * 3 * 3)  # per output element: 27 MACs

    gpt2 = zoo["gpt2"].traced.graph
    attention = [n for n in gpt2.nodes.values() if "scaled_dot_product_attention" in n.target]
    assert len(attention) == 2
    b, h, length, e = 1, 2, 8, 8
    assert all(n.flops == 2 * (2 * b * h * length * length * e) for n in attention)  # QK^T and AV

    bert = zoo["bert"].traced.graph
    views = [n for n in bert.nodes.values() if n.target.split("::")[-1].split(".")[0] in {"view", "transpose", "expand"}]
    assert views and all(n.flops == 0 for n in views)


def test_output_bytes_cover_tuple_outputs(zoo, zoo_name):
    g = zoo[zoo_name].traced.graph
    for node in g.nodes.values():
        tensor_bytes = sum(math.prod(s) * torch.empty((), dtype=getattr(torch, d)).element_size()
                           for s, d in zip(node.output_shapes, node.output_dtypes))
        extra = node.output_bytes - tensor_bytes
        assert extra >= 0 and extra % 8 == 0  # tensors plus 8 bytes per Python scalar
    if zoo_name == "moe":
        topk = next(n for n in g.nodes.values() if n.target == "topk")
        assert len(topk.output_shapes) == 2
        assert topk.output_bytes == 2 * 5 * 2 * 4 + 2 * 5 * 2 * 8  # float values + int64 indices


def test_export_and_fx_agree_on_a_plain_model(zoo):
    entry = zoo["mlp"]
    exported = trace_model(entry.model, entry.args, method="export")
    assert exported.method == "export"
    assert exported.graph.total_flops == entry.traced.graph.total_flops
    assert exported.graph.total_param_bytes == entry.traced.graph.total_param_bytes
    assert _max_diff(exported(*entry.args), entry.model(*entry.args)) <= 1e-6


def test_tracer_failures_are_reported(zoo):
    entry = zoo["gpt2"]
    with pytest.raises(TraceError, match="fx"):
        trace_model(entry.model, entry.args, method="fx")


def test_inputs_must_match_the_traced_signature(zoo):
    entry = zoo["dict_io"]
    batch = entry.args[0]
    with pytest.raises(ValueError, match="trace time"):
        entry.traced(batch, scale=2.0)
    with pytest.raises(ValueError, match="structure"):
        entry.traced({"a": batch["a"]}, scale=0.5)
    assert _max_diff(entry.traced(batch, scale=0.5), entry.model(batch, scale=0.5)) <= 1e-6


def test_profile_times_every_op(zoo):
    traced = zoo["moe"].traced
    ticks = itertools.count()
    timed = profile_nodes(traced, *zoo["moe"].args, repeats=3, clock=lambda: float(next(ticks)))
    assert set(timed.nodes) == set(traced.graph.nodes)
    assert all(n.measured_time == 1.0 for n in timed.nodes.values())  # one tick per op run
    assert all(n.measured_time is None for n in traced.graph.nodes.values())  # original untouched
    real = profile_nodes(traced, *zoo["moe"].args, repeats=1)
    assert all(n.measured_time >= 0 for n in real.nodes.values())
    cost = SegmentCost(real, list(real.nodes), work="time")
    assert cost.work(0, len(real)) == pytest.approx(sum(n.measured_time for n in real.nodes.values()))
    with pytest.raises(ValueError, match="measured_time"):
        SegmentCost(traced.graph, list(traced.graph.nodes), work="time")
    entry = zoo["mlp"]
    profiled = trace_model(entry.model, entry.args, profile=True)
    assert all(n.measured_time is not None for n in profiled.graph.nodes.values())


def test_op_graph_rejects_dangling_references():
    a = OpNode("a", "call_function", "f", ("x",), 1.0, 0, 4)
    with pytest.raises(ValueError, match="unknown value"):
        OpGraph(nodes={"a": a})
    with pytest.raises(ValueError, match="neither"):
        OpGraph(nodes={"a": a}, inputs={"x": 4}, outputs=("b",))


def test_random_graphs_are_network_shaped():
    g = random_op_graph(300, random.Random(3), max_skip=16)
    assert list(g.nodes) == topological_order(g)
    names = list(g.nodes)
    index = {n: i for i, n in enumerate(names)}
    assert all(index[n] - index[p] <= 16 for n in names for p in g.predecessors(n))
    sinks = {n for n in names if not g.successors(n)}
    assert set(g.outputs) == sinks
    assert random_op_graph(300, random.Random(3), max_skip=16) == g
