"""Placement benchmark: JSON lines comparing placements on the same simulated swarms.

    .venv/bin/python bench/placement.py [--quick] [--plot sim.png]

- ``bottleneck_ratio`` vs ``optimum``: plan_swarm / exact MILP optimum on small random instances
  (value = worst case, target >= 0.95).
- ``bottleneck_ratio`` vs ``petals_greedy`` / ``uniform`` / ``memory_proportional`` /
  ``upper_bound``: on heterogeneous swarms drawn from sim.hardware (mean over seeds). ``ours`` says
  which of our placements: ``plan_swarm`` (centralised) or ``sequential_join`` (every node joining
  through choose_span, as decentralised servers do). ``vs: upper_bound`` bounds what ANY placement
  could reach, so ``petals_ceiling`` = upper_bound / petals is the largest ratio possible over Petals.
- ``churn_bottleneck_ratio`` and ``availability``: one simulated hour of churn, same machines,
  churn and requests for both policies (Petals' join rule and its rebalancing check vs ours).
- ``sim_wall_s``: wall time of 10,000 nodes x 1 simulated hour (target < 300 s).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from swarmshard.core.placement import (
    ModelSpec,
    NodeProfile,
    bottleneck,
    exact_plan,
    memory_proportional_split,
    petals_greedy,
    plan_swarm,
    sequential_join,
    uniform_split,
    upper_bound,
)
from swarmshard.sim import SimConfig, plot_report, simulate
from swarmshard.sim.hardware import REFERENCE_MODEL, sample_profiles


def emit(**record: object) -> None:
    print(json.dumps(record), flush=True)


def small_instances(count: int, seed: int) -> None:
    """Random heterogeneous instances of up to 6 nodes x 10 blocks against the MILP optimum."""
    rng = np.random.default_rng(seed)
    ratios, gaps = [], []
    for _ in range(count):
        L = int(rng.integers(2, 11))
        model = ModelSpec(num_blocks=L, block_bytes=100, kv_bytes_per_token=0, activation_bytes=1, cache_tokens=0)
        profiles = [
            NodeProfile(f"n{i}", float(rng.lognormal(2, 0.8)), 1.0, 100 * int(rng.integers(1, L + 1)),
                        float(rng.lognormal(2.5, 1.0)))
            for i in range(int(rng.integers(2, 7)))
        ]
        optimum = exact_plan(profiles, model).bottleneck
        if optimum <= 0:
            continue
        plan = plan_swarm(profiles, model)
        ratios.append(plan.bottleneck / optimum)
        gaps.append(plan.upper_bound / optimum)
    emit(name="bottleneck_ratio", vs="optimum", nodes=6, value=round(min(ratios), 4),
         mean=round(float(np.mean(ratios)), 4), instances=len(ratios), max_blocks=10, target=0.95)
    emit(name="upper_bound_over_optimum", nodes=6, value=round(float(np.mean(gaps)), 4), max=round(max(gaps), 4))


def swarm_comparison(nodes: int, seeds: list[int]) -> None:
    """All placements on the same heterogeneous swarms (the sim's hardware mix, 80-block model)."""
    L = REFERENCE_MODEL.num_blocks
    rows: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    for seed in seeds:
        profiles = sample_profiles(nodes, seed)
        found = {"upper_bound": upper_bound(profiles, REFERENCE_MODEL)}
        for name, place in [("uniform", uniform_split), ("memory_proportional", memory_proportional_split),
                            ("petals_greedy", petals_greedy), ("sequential_join", sequential_join)]:
            start = time.perf_counter()
            found[name] = bottleneck(place(profiles, REFERENCE_MODEL), L)
            wall.setdefault(name, []).append(time.perf_counter() - start)
        start = time.perf_counter()
        found["plan_swarm"] = plan_swarm(profiles, REFERENCE_MODEL, seed=seed).bottleneck
        wall.setdefault("plan_swarm", []).append(time.perf_counter() - start)
        for key, value in found.items():
            rows.setdefault(key, []).append(value)
    mean = {k: np.array(v) for k, v in rows.items()}
    for ours in ("plan_swarm", "sequential_join"):
        for vs in ("petals_greedy", "uniform", "memory_proportional", "upper_bound"):
            ratio = mean[ours] / mean[vs]
            emit(name="bottleneck_ratio", vs=vs, nodes=nodes, ours=ours, value=round(float(ratio.mean()), 4),
                 min=round(float(ratio.min()), 4), seeds=len(seeds))
    emit(name="bottleneck_ratio", vs="upper_bound", nodes=nodes, ours="petals_greedy",
         value=round(float((mean["petals_greedy"] / mean["upper_bound"]).mean()), 4), seeds=len(seeds))
    ceiling = float((mean["upper_bound"] / mean["petals_greedy"]).mean())
    emit(name="petals_ceiling", nodes=nodes, value=round(ceiling, 4),
         note="upper_bound / petals_greedy: no placement can beat Petals by more")
    emit(name="plan_wall_s", nodes=nodes, value=round(float(np.mean(wall["plan_swarm"])), 3))


def churn(nodes: int, seeds: list[int], hours: float) -> None:
    """Time-averaged true bottleneck and availability under churn, ours vs Petals' rules."""
    ratios, avail = [], {"ours": [], "petals": []}
    for seed in seeds:
        result = {}
        for policy in ("ours", "petals"):
            cfg = SimConfig(num_nodes=nodes, seed=seed, policy=policy, duration_s=3600.0 * hours,
                            mean_lifetime_s=3600.0, latency_samples_per_s=1.0, check_period_s=120.0)
            result[policy] = simulate(cfg)
            avail[policy].append(result[policy].availability)
        ratios.append(result["ours"].mean_bottleneck / result["petals"].mean_bottleneck)
    emit(name="churn_bottleneck_ratio", vs="petals_greedy", nodes=nodes, value=round(float(np.mean(ratios)), 4),
         min=round(float(np.min(ratios)), 4), seeds=len(seeds), sim_hours=hours, mean_lifetime_h=1.0)
    for policy, values in avail.items():
        emit(name="availability", policy=policy, nodes=nodes, value=round(float(np.mean(values)), 4),
             min=round(float(np.min(values)), 4), seeds=len(seeds))


def big_sim(nodes: int, plot: str | None) -> None:
    start = time.perf_counter()
    report = simulate(SimConfig(num_nodes=nodes, seed=0, duration_s=3600.0))
    wall = time.perf_counter() - start
    emit(name="sim_wall_s", nodes=nodes, sim_hours=1, value=round(wall, 2), events=report.events, target=300)
    emit(name="sim_report", nodes=nodes, availability=round(report.availability, 4),
         throughput_tokens_per_s=round(report.throughput_tokens_per_s, 1),
         mean_bottleneck=round(report.mean_bottleneck, 1), latency_p50_s=round(report.latency_p50_s, 2),
         latency_p99_s=round(report.latency_p99_s, 2), moves=report.moves, joins=report.joins,
         leaves=report.leaves, crashes=report.crashes)
    if plot:
        try:
            plot_report(report, plot)
        except ImportError as e:
            emit(name="plot", skipped=str(e))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances and seeds, no 10k-node run")
    parser.add_argument("--plot", help="write a PNG of the 10k-node run here (needs matplotlib)")
    args = parser.parse_args()
    small_instances(15 if args.quick else 40, seed=0)
    seeds = [0] if args.quick else [0, 1, 2]
    for nodes in (12, 100) if args.quick else (12, 100, 1000):
        swarm_comparison(nodes, seeds)
    for nodes in (12, 100):
        churn(nodes, seeds, hours=1.0)
    if not args.quick:
        big_sim(10_000, args.plot)


if __name__ == "__main__":
    main()
