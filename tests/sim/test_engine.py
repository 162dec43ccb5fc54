"""Discrete-event simulator: determinism, sane metrics, churn bookkeeping, routing, plots."""

from __future__ import annotations

import time

import numpy as np
import pytest

from swarmshard.core.placement import ModelSpec, bottleneck, sequential_join, upper_bound
from swarmshard.sim import SimConfig, plot_report, simulate
from swarmshard.sim.engine import _route
from swarmshard.sim.hardware import REFERENCE_MODEL, REGION_RTT_S, profile_of, sample_traits

SHORT = dict(duration_s=1800.0, latency_samples_per_s=1.0, sample_every_s=60.0)


def summary(report) -> tuple:
    return (
        report.events, report.throughput_tokens_per_s, report.mean_bottleneck, report.availability,
        report.latency_p50_s, report.latency_p99_s, report.moves, report.joins, report.leaves, report.crashes,
        report.requests_traced,
    )


def test_same_seed_same_run_and_other_seed_other_run() -> None:
    cfg = SimConfig(num_nodes=20, seed=7, **SHORT)
    a, b = simulate(cfg), simulate(cfg)
    assert summary(a) == summary(b)
    for key in a.timeline:
        np.testing.assert_array_equal(a.timeline[key], b.timeline[key])
    assert summary(simulate(SimConfig(num_nodes=20, seed=8, **SHORT))) != summary(a)


def test_metrics_are_consistent() -> None:
    report = simulate(SimConfig(num_nodes=30, seed=1, mean_lifetime_s=1800.0, **SHORT))
    assert 0.0 <= report.availability <= 1.0
    assert 0.0 <= report.request_failure_rate <= 1.0
    assert report.throughput_tokens_per_s <= report.offered_tokens_per_s * (1 + 1e-9)
    assert report.throughput_tokens_per_s <= report.mean_bottleneck * (1 + 1e-9)
    assert report.latency_p50_s <= report.latency_p90_s <= report.latency_p99_s
    assert report.joins > 0 and report.leaves + report.crashes > 0
    tl = report.timeline
    assert np.all(np.diff(tl["t"]) > 0) and tl["t"][-1] == pytest.approx(1800.0)
    assert np.all(np.diff(tl["moves"]) >= 0) and tl["moves"][-1] == report.moves
    assert set(np.unique(tl["covered"])) <= {0.0, 1.0}


def test_initial_swarm_is_placed_by_the_core_join_rule() -> None:
    """The simulator's bootstrap is nodes joining one by one through core.placement.best_span, so
    its first bottleneck equals sequential_join on the same machines (rebuilt from the seed)."""
    cfg = SimConfig(num_nodes=25, seed=4, **SHORT)
    nodes_rng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(3)[0])
    traits = sample_traits(cfg.num_nodes, nodes_rng)
    profiles = [profile_of(traits, i) for i in range(cfg.num_nodes)]
    expected = bottleneck(sequential_join(profiles, REFERENCE_MODEL), REFERENCE_MODEL.num_blocks)
    report = simulate(cfg)
    assert report.timeline["bottleneck"][0] == pytest.approx(expected, rel=1e-9)
    assert expected <= upper_bound(profiles, REFERENCE_MODEL)


def test_crash_fraction_splits_departures() -> None:
    crashes_only = simulate(SimConfig(num_nodes=15, seed=2, crash_fraction=1.0, mean_lifetime_s=900.0, **SHORT))
    leaves_only = simulate(SimConfig(num_nodes=15, seed=2, crash_fraction=0.0, mean_lifetime_s=900.0, **SHORT))
    assert crashes_only.leaves == 0 and crashes_only.crashes > 0
    assert leaves_only.crashes == 0 and leaves_only.leaves > 0


def test_policies_see_the_same_machines_and_churn() -> None:
    ours = simulate(SimConfig(num_nodes=12, seed=3, policy="ours", **SHORT))
    petals = simulate(SimConfig(num_nodes=12, seed=3, policy="petals", **SHORT))
    assert (ours.joins, ours.leaves, ours.crashes) == (petals.joins, petals.leaves, petals.crashes)
    assert ours.requests_traced == petals.requests_traced


def test_no_nodes_that_fit_means_no_availability() -> None:
    huge_blocks = ModelSpec(num_blocks=4, block_bytes=10**15, kv_bytes_per_token=0, activation_bytes=1)
    tiny = SimConfig(num_nodes=5, seed=0, model=huge_blocks, **SHORT)
    report = simulate(tiny)
    assert report.availability == 0.0
    assert report.throughput_tokens_per_s == 0.0
    assert report.request_failure_rate == 1.0


def test_small_swarm_hour_is_fast() -> None:
    start = time.perf_counter()
    report = simulate(SimConfig(num_nodes=50, seed=0, duration_s=3600.0, latency_samples_per_s=1.0))
    assert time.perf_counter() - start < 20.0
    assert report.availability > 0.9


def test_route_prefers_the_fast_local_chain() -> None:
    """Two ways through 4 blocks: one server in the client's region holding all of them, or two
    faster servers on another continent. The local one wins on latency; without it, the chain
    must use both remote servers in order."""
    one_way = REGION_RTT_S / 2
    starts, ends = np.array([0, 0, 2]), np.array([4, 2, 4])
    regions = np.array([0, 3, 3])
    block_s = np.array([0.01, 0.001, 0.001])
    hop_s = np.zeros(3)
    chains = _route(starts, ends, regions, block_s, hop_s, one_way, 4)
    assert chains[0] == [(0, 0, 4)]
    assert chains[3] == [(1, 0, 2), (2, 2, 4)]  # a client in region 3 stays local
    no_local = _route(starts[1:], ends[1:], regions[1:], block_s[1:], hop_s[1:], one_way, 4)
    assert no_local[0] == [(0, 0, 2), (1, 2, 4)]
    assert _route(np.array([0]), np.array([3]), np.array([0]), block_s[:1], hop_s[:1], one_way, 4)[0] is None


def test_servers_woken_by_a_hole_restore_availability() -> None:
    """Crashes in a 10-node swarm leave blocks unserved; servers woken at once by the hole move
    to close it, which the periodic checks alone do later (same machines and churn)."""
    kw = dict(num_nodes=10, seed=3, mean_lifetime_s=1800.0, **SHORT)
    woken = simulate(SimConfig(**kw))
    periodic = simulate(SimConfig(hole_checks=0, **kw))
    assert woken.availability > periodic.availability
    assert woken.moves > periodic.moves


def test_rejects_bad_configs() -> None:
    with pytest.raises(ValueError):
        SimConfig(policy="random")
    with pytest.raises(ValueError):
        SimConfig(num_nodes=0)
    with pytest.raises(ValueError):
        SimConfig(crash_fraction=1.5)


def test_plot_report_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    report = simulate(SimConfig(num_nodes=10, seed=0, duration_s=600.0, latency_samples_per_s=1.0))
    out = plot_report(report, tmp_path / "sim.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
