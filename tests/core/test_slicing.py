"""MTPP slicing: segment costs against their definitions, the DP against brute force, BRKGA."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmshard.core.graph import OpGraph, OpNode, random_op_graph
from swarmshard.core.slicing import (
    InfeasiblePlanError,
    NodeSpec,
    Plan,
    SegmentCost,
    brkga_search,
    plan_graph,
    quotient_is_acyclic,
    slice_greedy,
    slice_optimal,
    slice_uniform,
    topological_order,
)

# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def graphs_with_orders(draw, max_ops: int = 8) -> tuple[OpGraph, list[str]]:
    """A random DAG (random fan-in, inputs, outputs, sizes) and a random topological order of it."""
    n = draw(st.integers(1, max_ops))
    inputs = {f"x{i}": draw(st.integers(1, 64)) for i in range(draw(st.integers(0, 2)))}
    nodes: dict[str, OpNode] = {}
    for i in range(n):
        pool = list(nodes) + list(inputs)
        srcs = draw(st.lists(st.sampled_from(pool), unique=True, max_size=3)) if pool else []
        nodes[f"op{i}"] = OpNode(
            name=f"op{i}", op="call_function", target="f", inputs=tuple(srcs),
            flops=draw(st.floats(0, 100, allow_nan=False)),
            param_bytes=draw(st.integers(0, 64)), output_bytes=draw(st.integers(0, 64)),
        )
    outputs = draw(st.lists(st.sampled_from(list(nodes) + list(inputs)), unique=True, max_size=3))
    graph = OpGraph(nodes=nodes, inputs=inputs, outputs=tuple(outputs))
    keys = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=n, max_size=n))
    return graph, topological_order(graph, dict(zip(nodes, keys)))


node_specs = st.builds(
    NodeSpec,
    speed=st.floats(0.5, 4),
    bandwidth=st.floats(0.5, 8),
    memory=st.one_of(st.just(math.inf), st.floats(0, 300)),
    allow_overflow=st.booleans(),
    overflow_bandwidth=st.one_of(st.none(), st.floats(0.5, 8)),
)

# ---------------------------------------------------------------------------------------------
# the definitions, computed the slow obvious way


def _tensors(graph: OpGraph, order: list[str]) -> list[tuple[int, int, set[int]]]:
    """(bytes, producer position (-1: graph input), consumer positions (n: graph output))."""
    pos = {name: p for p, name in enumerate(order)}
    consumers: dict[str, set[int]] = {name: set() for name in [*graph.nodes, *graph.inputs]}
    for name, node in graph.nodes.items():
        for src in node.inputs:
            consumers[src].add(pos[name])
    out = []
    for name in [*graph.nodes, *graph.inputs]:
        size = graph.nodes[name].output_bytes if name in graph.nodes else graph.inputs[name]
        producer = pos[name] if name in graph.nodes else -1
        cons = consumers[name] | ({len(order)} if name in graph.outputs else set())
        out.append((size, producer, cons))
    return out


def naive_parts(graph: OpGraph, order: list[str], i: int, j: int) -> dict[str, float]:
    tensors = _tensors(graph, order)
    inside = range(i, j)
    ops = [graph.nodes[name] for name in order[i:j]]
    io = sum(w for w, p, c in tensors
             if (p in inside and any(x not in inside for x in c)) or (p not in inside and any(x in inside for x in c)))

    def live(x: int) -> int:  # the order's schedule: produced at or before x, still needed at or after x
        return sum(w for w, p, c in tensors if (c and p <= x <= max(c)) or (not c and p == x))

    passing = sum(w for w, p, c in tensors if c and p < i and max(c) >= j and not any(x in inside for x in c))

    def stage_live(x: int) -> int:  # what the stage alone must hold at step x
        held = 0
        for w, p, c in tensors:
            if p in inside and p <= x and (any(e >= x for e in c) or (not c and p == x)):
                held += w
            elif p < i and any(x <= e < j for e in c):
                held += w
        return held

    return {
        "work": sum(o.flops for o in ops),
        "params": sum(o.param_bytes for o in ops),
        "io": io,
        "peak": max(live(x) for x in inside) - passing,
        "true_peak": max(stage_live(x) for x in inside),
    }


def naive_cost(parts: dict[str, float], node: NodeSpec) -> float:
    excess = parts["params"] + parts["peak"] - node.memory
    if excess > 0 and not node.allow_overflow:
        return math.inf
    return (parts["work"] / node.speed + parts["io"] / node.bandwidth
            + max(excess, 0.0) / node.stream_bandwidth)


def brute_force(graph: OpGraph, order: list[str], nodes: list[NodeSpec]) -> float:
    n, k = len(order), len(nodes)
    parts = {(i, j): naive_parts(graph, order, i, j) for i in range(n) for j in range(i + 1, n + 1)}
    best = math.inf
    for inner in itertools.combinations(range(1, n), k - 1):
        cuts = (0, *inner, n)
        best = min(best, max(naive_cost(parts[a, b], node) for a, b, node in zip(cuts, cuts[1:], nodes)))
    return best


# ---------------------------------------------------------------------------------------------
# segment costs


@settings(max_examples=60, deadline=None)
@given(graphs_with_orders())
def test_segment_cost_matches_the_definitions(case):
    graph, order = case
    cost = SegmentCost(graph, order)
    n = len(order)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n + 1)]
    for i, j in pairs:
        want = naive_parts(graph, order, i, j)
        assert cost.work(i, j) == pytest.approx(want["work"], abs=1e-9)
        assert cost.param_bytes(i, j) == want["params"]
        assert cost.io_bytes(i, j) == want["io"]
        assert cost.peak_bytes(i, j) == want["peak"]
        assert want["true_peak"] <= cost.peak_bytes(i, j)  # peak is a safe (upper) bound
    i_arr, j_arr = np.array(pairs).T
    assert list(cost.io_bytes(i_arr, j_arr)) == [cost.io_bytes(i, j) for i, j in pairs]
    assert list(cost.peak_bytes(i_arr, j_arr)) == [cost.peak_bytes(i, j) for i, j in pairs]


def test_io_is_not_monotone_in_the_slice():
    """Why greedy 'extend while it fits' is not exact: absorbing a consumer removes traffic."""
    g = OpGraph(nodes={
        "a": OpNode("a", "call_function", "f", ("x",), 1.0, 0, 1000),
        "b": OpNode("b", "call_function", "f", ("a",), 1.0, 0, 1),
    }, inputs={"x": 1}, outputs=("b",))
    cost = SegmentCost(g, ["a", "b"])
    assert cost.io_bytes(0, 1) == 1 + 1000 and cost.io_bytes(0, 2) == 1 + 1


def test_segment_cost_rejects_bad_orders():
    g = random_op_graph(5, random.Random(0))
    with pytest.raises(ValueError, match="topological"):
        SegmentCost(g, list(reversed(list(g.nodes))))
    with pytest.raises(ValueError, match="exactly once"):
        SegmentCost(g, list(g.nodes)[:-1])
    cost = SegmentCost(g, list(g.nodes))
    with pytest.raises(IndexError):
        cost.io_bytes(3, 3)


# ---------------------------------------------------------------------------------------------
# orders and quotient graphs


def test_kahn_breaks_ties_by_priority_and_detects_cycles():
    g = OpGraph(nodes={
        "a": OpNode("a", "call_function", "f", (), 0.0, 0, 1),
        "b": OpNode("b", "call_function", "f", (), 0.0, 0, 1),
        "c": OpNode("c", "call_function", "f", ("a", "b"), 0.0, 0, 1),
    })
    assert topological_order(g) == ["a", "b", "c"]
    assert topological_order(g, {"a": 1.0, "b": 0.0, "c": 0.5}) == ["b", "a", "c"]
    cyclic = OpGraph(nodes={
        "p": OpNode("p", "call_function", "f", ("q",), 0.0, 0, 1),
        "q": OpNode("q", "call_function", "f", ("p",), 0.0, 0, 1),
    })
    with pytest.raises(ValueError, match="cycle"):
        topological_order(cyclic)


def test_quotient_check_finds_cycles():
    g = random_op_graph(3, random.Random(0), max_fan_in=1)  # a chain op0 -> op1 -> op2
    assert quotient_is_acyclic(g, [["op0", "op1"], ["op2"]])
    assert not quotient_is_acyclic(g, [["op0", "op2"], ["op1"]])
    with pytest.raises(ValueError, match="no stage"):
        quotient_is_acyclic(g, [["op0"], ["op1"]])


# ---------------------------------------------------------------------------------------------
# the exact DP


@settings(max_examples=150, deadline=None)
@given(graphs_with_orders(), st.lists(node_specs, min_size=1, max_size=4))
def test_dp_is_exactly_optimal(case, nodes):
    graph, order = case
    cost = SegmentCost(graph, order)
    if len(nodes) > len(order):
        with pytest.raises(InfeasiblePlanError, match="stages"):
            slice_optimal(cost, nodes)
        return
    best = brute_force(graph, order, nodes)
    if math.isinf(best):
        with pytest.raises(InfeasiblePlanError, match="memory"):
            slice_optimal(cost, nodes)
        return
    plan = slice_optimal(cost, nodes)
    assert plan.bottleneck == pytest.approx(best, rel=1e-9, abs=1e-12)
    # the plan's reported costs are the definitions' costs of its stages
    for (a, b), node, stage in zip(zip(plan.cuts, plan.cuts[1:]), nodes, plan.costs):
        assert stage.total == pytest.approx(naive_cost(naive_parts(graph, order, a, b), node), rel=1e-9, abs=1e-12)
    assert plan.bottleneck <= slice_greedy(cost, nodes).bottleneck
    assert plan.bottleneck <= slice_uniform(cost, nodes).bottleneck
    assert quotient_is_acyclic(graph, plan.stages)
    assert [name for stage in plan.stages for name in stage] == order and all(plan.stages)


def reference_dp(cost: SegmentCost, nodes: list[NodeSpec]) -> float:
    """The textbook O(k n^2) DP with no pruning, on SegmentCost's vectorised queries."""
    n = cost.n
    best = np.full(n + 1, math.inf)
    best[0] = 0.0
    for node in nodes:
        nxt = np.full(n + 1, math.inf)
        for j in range(1, n + 1):
            starts = np.arange(j)
            nxt[j] = np.min(np.maximum(best[:j], cost.cost(starts, np.full(j, j), node)))
        best = nxt
    return float(best[n])


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([None, 4, 32]), st.booleans(),
       st.lists(node_specs, min_size=2, max_size=5), st.sampled_from([0.01, 1.0, 100.0]))
def test_dp_pruning_is_exact_on_larger_graphs(seed, max_skip, backbone, nodes, bandwidth_scale):
    """Windows and bounds only skip slices that cannot matter: compare with the unpruned DP."""
    rng = random.Random(seed)
    g = random_op_graph(120, rng, max_skip=max_skip, backbone=backbone, skip_prob=0.3,
                        max_param_bytes=10, max_output_bytes=10)
    nodes = [dataclasses.replace(n, bandwidth=n.bandwidth * bandwidth_scale) for n in nodes]
    cost = SegmentCost(g, topological_order(g, {name: rng.random() for name in g.nodes}))
    want = reference_dp(cost, nodes)
    if math.isinf(want):
        with pytest.raises(InfeasiblePlanError):
            slice_optimal(cost, nodes)
    else:
        assert slice_optimal(cost, nodes).bottleneck == pytest.approx(want, rel=1e-9)


def test_refusals_name_the_reason():
    g = random_op_graph(6, random.Random(1))
    with pytest.raises(InfeasiblePlanError, match="7 stages need at least 7 ops"):
        plan_graph(g, [NodeSpec(1.0, 1.0)] * 7)
    tight = NodeSpec(1.0, 1.0, memory=10.0, allow_overflow=False)
    with pytest.raises(InfeasiblePlanError, match="hard memory limit"):
        plan_graph(g, [tight, tight])
    roomy = NodeSpec(1.0, 1.0, memory=1e9, allow_overflow=False)
    assert math.isfinite(plan_graph(g, [roomy, roomy]).bottleneck)


def test_overflow_is_charged_at_the_stream_bandwidth():
    g = random_op_graph(4, random.Random(2))
    cost = SegmentCost(g, list(g.nodes))
    fits = NodeSpec(1.0, 1.0)
    small = NodeSpec(1.0, 1.0, memory=0.0, overflow_bandwidth=2.0)
    whole = cost.stage_costs(0, 4, fits)
    spill = cost.stage_costs(0, 4, small)
    assert spill.overflow_time == pytest.approx((whole.param_bytes + whole.peak_bytes) / 2.0)
    assert spill.total == pytest.approx(whole.total + spill.overflow_time)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.lists(node_specs, min_size=2, max_size=5))
def test_every_plan_is_a_pipeline(seed, fan_in, nodes):
    rng = random.Random(seed)
    g = random_op_graph(40, rng, max_fan_in=fan_in, skip_prob=0.3, n_inputs=2)
    order = topological_order(g, {name: rng.random() for name in g.nodes})
    try:
        plan = slice_optimal(SegmentCost(g, order), nodes)
    except InfeasiblePlanError:
        return
    assert quotient_is_acyclic(g, plan.stages)
    assert len(plan.stages) == len(nodes) and all(plan.stages)


def test_plan_json_round_trip():
    g = random_op_graph(30, random.Random(4))
    nodes = [NodeSpec(2.0, 10.0), NodeSpec(1.0, 5.0, memory=5000.0, overflow_bandwidth=3.0),
             NodeSpec(3.0, 8.0, memory=1e6, allow_overflow=False)]
    plan = plan_graph(g, nodes)
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    data = json.loads(text)
    assert data["stages"] == [list(s) for s in plan.stages] and data["nodes"][0]["memory"] is None
    data["stages"][0] = data["stages"][0][:-1]
    with pytest.raises(ValueError, match="inconsistent"):
        Plan.from_json(json.dumps(data))


def test_slicing_10k_ops_into_8_stages_beats_greedy():
    """Scale check (its speed is measured by bench/slicing.py, not asserted here)."""
    g = random_op_graph(10_000, random.Random(7), max_skip=64)
    rng = random.Random(8)
    nodes = [NodeSpec(speed=rng.uniform(1, 4), bandwidth=rng.uniform(20, 100)) for _ in range(8)]
    plan = plan_graph(g, nodes)
    cost = SegmentCost(g, plan.order)
    assert plan.bottleneck <= slice_greedy(cost, nodes).bottleneck


# ---------------------------------------------------------------------------------------------
# BRKGA over orders


@settings(max_examples=12, deadline=None)
@given(graphs_with_orders(max_ops=10), st.lists(node_specs, min_size=1, max_size=3), st.integers(0, 2**32))
def test_brkga_is_never_worse_than_kahn(case, nodes, seed):
    graph, _ = case
    if len(nodes) > len(graph.nodes):
        return
    try:
        kahn = plan_graph(graph, nodes)
    except InfeasiblePlanError:
        return
    result = brkga_search(graph, nodes, random.Random(seed), population=8, generations=4)
    assert result.baseline == kahn
    assert result.plan.bottleneck <= kahn.bottleneck
    assert topological_order(graph, {n: i for i, n in enumerate(result.plan.order)}) == list(result.plan.order)
    again = brkga_search(graph, nodes, random.Random(seed), population=8, generations=4)
    assert again.plan == result.plan  # seeded: reproducible


def test_brkga_finds_a_better_order_than_an_interleaved_one():
    """Two independent chains listed interleaved: every cut of that order crosses both chains."""
    nodes_: dict[str, OpNode] = {}
    for step in range(4):
        for chain in "ab":
            src = ("x",) if step == 0 else (f"{chain}{step - 1}",)
            name = f"{chain}{step}"
            nodes_[name] = OpNode(name, "call_function", "f", src, 10.0, 0, 100)
    g = OpGraph(nodes=nodes_, inputs={"x": 1}, outputs=("a3", "b3"))
    nodes = [NodeSpec(1.0, 10.0), NodeSpec(1.0, 10.0)]
    result = brkga_search(g, nodes, np.random.default_rng(0), population=16, generations=10)
    # best cut of the interleaved order: 5 ops, reading x and sending one tensor of each chain
    assert result.baseline.bottleneck == pytest.approx(50 / 1 + 201 / 10)
    # chain a, then chain b: each stage reads x and sends its chain's output
    assert result.plan.bottleneck == pytest.approx(40 / 1 + 101 / 10)
    assert result.gain > 0
