"""MTPP slicing benchmark: plan quality (exact DP vs baselines), BRKGA's gain, slicing wall time.

Prints one JSON object per line: {"name": ..., "value": ..., "unit": ...}. Bottlenecks are in
seconds of the slowest stage under the cost model; ratios are baseline / DP (>= 1, higher means
the DP helps more). Run from the repository root: ``python bench/slicing.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmshard.core.graph import OpGraph, random_op_graph  # noqa: E402
from swarmshard.core.slicing import (  # noqa: E402
    NodeSpec,
    SegmentCost,
    brkga_search,
    slice_greedy,
    slice_optimal,
    slice_uniform,
    topological_order,
)


def emit(name: str, value: float, unit: str) -> None:
    print(json.dumps({"name": name, "value": round(value, 6), "unit": unit}), flush=True)


def heterogeneous(k: int, seed: int, bandwidth: float, memory: float = float("inf")) -> list[NodeSpec]:
    rng = random.Random(seed)
    return [NodeSpec(speed=rng.uniform(1, 4), bandwidth=bandwidth * rng.uniform(0.5, 1.5), memory=memory,
                     overflow_bandwidth=bandwidth / 4) for _ in range(k)]


def compare(prefix: str, graph: OpGraph, nodes: list[NodeSpec]) -> None:
    cost = SegmentCost(graph, topological_order(graph))
    dp = slice_optimal(cost, nodes).bottleneck
    uniform = slice_uniform(cost, nodes).bottleneck
    greedy = slice_greedy(cost, nodes).bottleneck
    emit(f"{prefix}.dp_bottleneck", dp, "s")
    emit(f"{prefix}.uniform_bottleneck", uniform, "s")
    emit(f"{prefix}.greedy_bottleneck", greedy, "s")
    emit(f"{prefix}.uniform_over_dp", uniform / dp, "ratio")
    emit(f"{prefix}.greedy_over_dp", greedy / dp, "ratio")


def zoo_models(quick: bool) -> None:
    """The test zoo (tests/core/conftest.py): real models, traced."""
    import torch

    from swarmshard.core.graph import trace_model
    from tests.core.conftest import ZOO

    nodes = [NodeSpec(2e6, 4e5), NodeSpec(1e6, 2e5, memory=2e4), NodeSpec(3e6, 1e6), NodeSpec(1.5e6, 5e5)]
    for name, make in ZOO.items():
        torch.manual_seed(0)
        model, args, kwargs = make()
        graph = trace_model(model.eval(), args, kwargs).graph
        k = min(4, len(graph))
        compare(f"zoo.{name}.k{k}", graph, nodes[:k])
        if not quick and name in {"moe", "unet", "bert"}:
            result = brkga_search(graph, nodes[:k], random.Random(0), population=16, generations=12)
            emit(f"zoo.{name}.k{k}.brkga_gain_over_kahn", result.gain, "fraction")


def random_dags(quick: bool) -> None:
    n = 300 if quick else 1000
    for family, kw in (("local", {"max_skip": 64}), ("wide", {})):
        graph = random_op_graph(n, random.Random(1), **kw)
        compare(f"dag.{family}.n{n}.k8.compute", graph, heterogeneous(8, 2, bandwidth=100.0))
        compare(f"dag.{family}.n{n}.k8.io_heavy", graph, heterogeneous(8, 2, bandwidth=1.0))
        params = sum(node.param_bytes for node in graph.nodes.values())
        compare(f"dag.{family}.n{n}.k8.overflow", graph, heterogeneous(8, 2, bandwidth=50.0, memory=params / 16))


def brkga_gain(quick: bool) -> None:
    """Graphs with parallel branches, where the order matters; I/O-bound so cuts cost."""
    seeds = range(2 if quick else 5)
    gains = []
    for seed in seeds:
        graph = random_op_graph(80, random.Random(seed), backbone=False, max_skip=32, skip_prob=0.2)
        nodes = heterogeneous(4, seed, bandwidth=5.0)
        start = time.perf_counter()
        result = brkga_search(graph, nodes, random.Random(seed), population=20, generations=15)
        emit(f"brkga.dag80.seed{seed}.gain_over_kahn", result.gain, "fraction")
        emit(f"brkga.dag80.seed{seed}.wall", time.perf_counter() - start, "s")
        gains.append(result.gain)
    emit("brkga.dag80.mean_gain_over_kahn", sum(gains) / len(gains), "fraction")


def wall_times(quick: bool) -> None:
    sizes = (1000, 10_000) if quick else (1000, 10_000, 50_000)
    cases = [("local", {"max_skip": 64}, 100.0), ("wide", {}, 100.0)]
    if not quick:
        cases += [("local", {"max_skip": 64}, 1.0), ("wide", {}, 1.0)]
    for family, kw, bandwidth in cases:
        regime = "compute" if bandwidth > 1 else "io_heavy"
        for n in sizes:
            if n > 10_000 and regime == "io_heavy":
                continue  # O(k n^2) regime; 10k already shows it
            graph = random_op_graph(n, random.Random(1), **kw)
            nodes = heterogeneous(8, 2, bandwidth=bandwidth)
            start, cpu = time.perf_counter(), time.process_time()
            order = topological_order(graph)
            cost = SegmentCost(graph, order)
            built = time.perf_counter()
            slice_optimal(cost, nodes)
            done = time.perf_counter()
            emit(f"wall.{family}.{regime}.n{n}.k8.total", done - start, "s")
            emit(f"wall.{family}.{regime}.n{n}.k8.dp", done - built, "s")
            # CPU time of this process: robust to other jobs sharing the machine
            emit(f"cpu.{family}.{regime}.n{n}.k8.total", time.process_time() - cpu, "s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, no 50k run, fewer BRKGA runs")
    args = parser.parse_args()
    random_dags(args.quick)
    wall_times(args.quick)
    brkga_gain(args.quick)
    zoo_models(args.quick)


if __name__ == "__main__":
    main()
