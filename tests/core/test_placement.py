"""Placement core: the throughput model, span choice, rebalancing, the planner and its bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmshard.core.placement import (
    Assignment,
    ModelSpec,
    NodeProfile,
    Span,
    best_span,
    bottleneck,
    choose_span,
    decide_move,
    exact_plan,
    max_span_length,
    memory_proportional_split,
    petals_best_start,
    petals_greedy,
    petals_rates,
    petals_should_move,
    plan_swarm,
    sequential_join,
    should_move,
    span_rates,
    span_throughput,
    swarm_throughput_per_block,
    uniform_split,
    upper_bound,
)

SETTINGS = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def toy_model(num_blocks: int) -> ModelSpec:
    """Blocks of 100 bytes, no KV reserve, 1-byte activations: memory = 100 * max blocks."""
    return ModelSpec(num_blocks=num_blocks, block_bytes=100, kv_bytes_per_token=0, activation_bytes=1, cache_tokens=0)


def node(name: str, speed: float, blocks: int, net: float = 1e9) -> NodeProfile:
    return NodeProfile(name, block_speed=speed, prefill_speed=speed, memory_bytes=100 * blocks, bandwidth=net)


def brute_force_optimum(profiles: list[NodeProfile], model: ModelSpec) -> float:
    """Independent check of exact_plan: try every span of every node (tiny instances only)."""
    L = model.num_blocks
    options = []
    for p in profiles:
        rates = span_rates(p, model)
        options.append([(a, n, rates[n - 1]) for n in range(1, rates.size + 1) for a in range(L - n + 1)])
    best = 0.0
    for combo in itertools.product(*options):
        T = np.zeros(L)
        for a, n, r in combo:
            T[a : a + n] += r
        best = max(best, float(T.min()))
    return best


# ------------------------------------------------------------------------------------- the model


def test_max_span_length_counts_weights_and_kv_reserve() -> None:
    model = ModelSpec(num_blocks=80, block_bytes=1000, kv_bytes_per_token=2, activation_bytes=8, cache_tokens=100)
    assert max_span_length(NodeProfile("a", 1.0, 1.0, 12_000, 1.0), model) == 10  # 1200 bytes per block
    assert max_span_length(NodeProfile("b", 1.0, 1.0, 1_199, 1.0), model) == 0
    assert max_span_length(NodeProfile("c", 1.0, 1.0, 10**9, 1.0), model) == 80  # capped at L
    quantised = NodeProfile("d", 1.0, 1.0, 12_000, 1.0, block_bytes=500)
    assert max_span_length(quantised, model) == 17  # 700 bytes per block


def test_rates_are_speed_over_length_capped_by_network() -> None:
    model = ModelSpec(num_blocks=8, block_bytes=100, kv_bytes_per_token=0, activation_bytes=10, cache_tokens=0)
    p = NodeProfile("a", block_speed=120.0, prefill_speed=1.0, memory_bytes=600, bandwidth=400.0)  # net: 40 tok/s
    assert span_rates(p, model).tolist() == [40.0, 40.0, 40.0, 30.0, 24.0, 20.0]
    assert span_throughput(p, model, 4) == 30.0
    assert span_throughput(p, model, 7) == 0.0  # does not fit
    # Petals announces compute / ((n + 1) / 2): it over-reports long spans
    assert petals_rates(p, model)[5] == pytest.approx(2 * 120 / 7)


def test_per_block_throughput_and_bottleneck() -> None:
    a = [Assignment("x", Span(0, 3), 2.0), Assignment("y", Span(2, 5), 1.5)]
    assert swarm_throughput_per_block(a, 5).tolist() == [2.0, 2.0, 3.5, 1.5, 1.5]
    assert bottleneck(a, 5) == 1.5
    assert bottleneck(a, 6) == 0.0  # block 5 unserved
    with pytest.raises(ValueError):
        swarm_throughput_per_block([Assignment("z", Span(0, 7), 1.0)], 6)
    with pytest.raises(ValueError):
        Span(3, 3)


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 10), st.floats(0.01, 100)), max_size=12))
@SETTINGS
def test_per_block_throughput_matches_naive_sum(raw: list[tuple[int, int, float]]) -> None:
    assignments = [Assignment(f"n{i}", Span(a, min(a + n, 10)), r) for i, (a, n, r) in enumerate(raw)]
    naive = np.zeros(10)
    for x in assignments:
        naive[x.span.start : x.span.end] += x.throughput
    np.testing.assert_allclose(swarm_throughput_per_block(assignments, 10), naive, atol=1e-9)


# ----------------------------------------------------------------------------------- choose_span


def test_choose_span_concentrates_on_a_hole_but_spreads_over_an_even_swarm() -> None:
    model = toy_model(4)
    me = node("me", speed=4.0, blocks=4)
    others = [Assignment("a", Span(0, 2), 10.0), Assignment("b", Span(3, 4), 10.0)]
    # block 2 is unserved: one block at full speed beats spreading 1 tok/s over four
    assert choose_span(me, others, model).span == Span(2, 3)
    flat = [Assignment("a", Span(0, 4), 10.0)]
    assert choose_span(me, flat, model).span == Span(0, 4)
    # [10, 11, 11, 11]: a 1-block span gives sorted T' [11, 11, 11, 14], the full span [11, 12, 12, 12]
    uneven = [Assignment("a", Span(0, 4), 10.0), Assignment("b", Span(1, 4), 1.0)]
    chosen = choose_span(me, uneven, model)
    assert chosen.span == Span(0, 4) and chosen.throughput == 1.0


def test_choose_span_ignores_the_nodes_own_announcement() -> None:
    model = toy_model(3)
    me = node("me", speed=3.0, blocks=1)
    others = [Assignment("me", Span(0, 1), 3.0), Assignment("a", Span(0, 3), 1.0)]
    assert choose_span(me, others, model).span == Span(0, 1)  # all blocks tie without me: leftmost


def test_choose_span_rejects_a_node_that_holds_nothing() -> None:
    with pytest.raises(ValueError):
        choose_span(node("tiny", 1.0, 0), [], toy_model(3))


@given(
    T=st.lists(st.one_of(st.just(0.0), st.floats(0.1, 50)), min_size=1, max_size=14),
    speed=st.floats(0.5, 60),
    net=st.floats(0.5, 60),
    max_len=st.integers(1, 14),
)
@SETTINGS
def test_best_span_is_optimal_on_bottleneck_and_coverage(
    T: list[float], speed: float, net: float, max_len: int
) -> None:
    """Brute force over every span: the chosen one leaves the fewest blocks unserved, and among
    those reaches the highest bottleneck."""
    per_block = np.array(T)
    L = per_block.size
    n = np.arange(1, min(max_len, L) + 1)
    rates = np.minimum(speed / n, net)
    chosen = best_span(per_block, rates)
    assert chosen.end <= L and chosen.length <= rates.size

    def outcome(span: Span) -> tuple[int, float]:
        after = per_block.copy()
        after[span.start : span.end] += rates[span.length - 1]
        return int((after == 0).sum()), float(after.min())

    candidates = [Span(a, a + k) for k in range(1, rates.size + 1) for a in range(L - k + 1)]
    fewest = min(outcome(s)[0] for s in candidates)
    best_min = max(outcome(s)[1] for s in candidates)
    got_uncovered, got_min = outcome(chosen)
    assert got_uncovered == fewest
    assert got_min >= best_min * (1 - 1e-9)


# ---------------------------------------------------------------------------------- rebalancing


def test_sole_server_of_a_block_never_moves() -> None:
    model = toy_model(4)
    me = node("me", speed=1.0, blocks=1)
    swarm = [Assignment("me", Span(0, 1), 1.0), Assignment("a", Span(1, 4), 100.0)]
    decision = should_move(me, swarm, model)
    assert not decision.move and decision.span == Span(0, 1)


def test_moves_only_past_the_hysteresis_threshold() -> None:
    model = toy_model(2)
    me = node("me", speed=3.0, blocks=1)
    # me on block 0 next to a; block 1 is the bottleneck (10 vs 13); moving gives min(10, 13) = 10...
    swarm = [Assignment("me", Span(0, 1), 3.0), Assignment("a", Span(0, 2), 10.0)]
    decision = should_move(me, swarm, model, threshold=1.15)
    assert decision.new_bottleneck == pytest.approx(10.0) and decision.current_bottleneck == pytest.approx(10.0)
    assert not decision.move
    # ...but on a weaker swarm the same move is worth 13/10 = 1.3x: above 1.15, below 1.5
    weak = [Assignment("me", Span(0, 1), 3.0), Assignment("a", Span(0, 2), 10.0), Assignment("b", Span(0, 1), 5.0)]
    assert should_move(me, weak, model, threshold=1.15).move
    assert should_move(me, weak, model, threshold=1.15).span == Span(1, 2)
    assert not should_move(me, weak, model, threshold=1.5).move
    with pytest.raises(ValueError):
        should_move(me, weak, model, threshold=0.9)


def test_a_redundant_server_moves_to_cover_a_hole() -> None:
    model = toy_model(3)
    me = node("me", speed=2.0, blocks=1)
    swarm = [Assignment("me", Span(0, 1), 2.0), Assignment("a", Span(0, 2), 5.0)]
    decision = should_move(me, swarm, model)
    assert decision.move and decision.span == Span(2, 3)
    assert decision.current_bottleneck == 0.0 and decision.new_bottleneck == pytest.approx(2.0)


@given(
    spans=st.lists(st.tuples(st.integers(0, 9), st.integers(1, 6), st.floats(0.5, 20)), min_size=1, max_size=10),
    threshold=st.sampled_from([1.0, 1.15, 1.5]),
)
@SETTINGS
def test_should_move_never_uncovers_a_block(spans: list[tuple[int, int, float]], threshold: float) -> None:
    L = 10
    model = toy_model(L)
    profiles = [node(f"n{i}", speed=s, blocks=6) for i, (_, _, s) in enumerate(spans)]
    swarm = []
    for p, (a, n, _) in zip(profiles, spans):
        span = Span(min(a, L - n), min(a, L - n) + n)
        swarm.append(Assignment(p.node_id, span, span_throughput(p, model, n)))
    before = swarm_throughput_per_block(swarm, L) > 0
    for p, mine in zip(profiles, swarm):
        decision = should_move(p, swarm, model, threshold)
        if not decision.move:
            assert decision.span == mine.span
            continue
        others = [a for a in swarm if a.node_id != p.node_id]
        # the other servers alone keep every block that was served (the mover may be reloading)
        assert np.all(swarm_throughput_per_block(others, L)[before] > 0)
        moved = others + [Assignment(p.node_id, decision.span, span_throughput(p, model, decision.span.length))]
        after = swarm_throughput_per_block(moved, L)
        assert np.count_nonzero(after > 0) >= np.count_nonzero(before)
        if before.all():
            assert after.min() > threshold * swarm_throughput_per_block(swarm, L).min()


def test_decide_move_with_exact_counts_matches_inferred_counts() -> None:
    T = np.array([5.0, 8.0, 8.0, 3.0])
    rates = np.array([3.0, 1.5])
    inferred = decide_move(T, Span(1, 3), rates, 1.15)
    exact = decide_move(T, Span(1, 3), rates, 1.15, counts=np.array([1, 2, 2, 1]))
    assert inferred == exact
    assert exact.move and exact.span == Span(3, 4)  # 3 -> 6 on the weakest block: min 5 vs 3


# ----------------------------------------------------------------------- planner, bound, optimum


def test_upper_bound_examples() -> None:
    model = toy_model(2)
    # a (10 tok/s) and b (1 tok/s), both hold the model: optimum 5.5 = (10 + 1) / 2, both full span
    a, b = node("a", 10.0, 2), node("b", 1.0, 2)
    assert upper_bound([a, b], model) == pytest.approx(5.5)
    assert plan_swarm([a, b], model).bottleneck == pytest.approx(5.5)
    # a single-block node cannot cover two blocks
    assert upper_bound([node("c", 5.0, 1)], model) == 0.0
    # the network caps per-block rates: 2 nodes at most 1 tok/s each per block
    slow_net = [node("d", 100.0, 2, net=1.0), node("e", 100.0, 2, net=1.0)]
    assert upper_bound(slow_net, model) == pytest.approx(2.0)


def test_exact_plan_matches_brute_force() -> None:
    model = toy_model(5)
    profiles = [node("a", 8.4, 3, net=27.0), node("b", 5.3, 5, net=3.4), node("c", 2.0, 2)]
    exact = exact_plan(profiles, model)
    assert exact.bottleneck == pytest.approx(brute_force_optimum(profiles, model))
    assert exact.upper_bound == exact.bottleneck


def test_planner_escapes_where_single_moves_stall() -> None:
    """Optimum: the fast node shrinks to [0, 5) while the small one takes [5, 7); from the greedy
    start (fast node on all 7 blocks) no single node can move without losing a block."""
    model = toy_model(7)
    small = node("small", speed=4.77, blocks=3, net=3.63)
    fast = node("fast", speed=12.03, blocks=7, net=20.5)
    plan = plan_swarm([small, fast], model)
    exact = exact_plan([small, fast], model)
    assert plan.bottleneck >= 0.99 * exact.bottleneck
    assert exact.bottleneck == pytest.approx(min(12.03 / 5, 4.77 / 2), rel=1e-6)


instance = st.integers(1, 10).flatmap(
    lambda L: st.tuples(
        st.just(L),
        st.lists(
            st.tuples(st.floats(1.0, 20.0), st.integers(1, L), st.floats(1.0, 30.0)),
            min_size=1,
            max_size=6,
        ),
    )
)


@given(instance)
@settings(deadline=None, database=None, max_examples=30, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_planner_is_near_optimal_and_bound_is_valid(inst: tuple[int, list[tuple[float, int, float]]]) -> None:
    L, raw = inst
    model = toy_model(L)
    profiles = [node(f"n{i}", s, m, net) for i, (s, m, net) in enumerate(raw)]
    exact = exact_plan(profiles, model)
    plan = plan_swarm(profiles, model)
    assert plan.upper_bound >= exact.bottleneck * (1 - 1e-9)
    assert plan.bottleneck <= exact.bottleneck * (1 + 1e-9)
    assert plan.bottleneck >= 0.95 * exact.bottleneck
    assert plan.bottleneck == pytest.approx(bottleneck(list(plan.assignments), L))
    for a, p in zip(plan.assignments, profiles):
        assert a.span.length <= max_span_length(p, model)


@given(
    L=st.integers(1, 20),
    raw=st.lists(st.tuples(st.floats(0.5, 50.0), st.integers(0, 20)), min_size=1, max_size=15),
)
@settings(deadline=None, database=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
def test_placements_cover_every_block_whenever_memory_allows(L: int, raw: list[tuple[float, int]]) -> None:
    model = toy_model(L)
    profiles = [node(f"n{i}", s, m) for i, (s, m) in enumerate(raw)]
    if sum(min(m, L) for _, m in raw) < L:
        assert upper_bound(profiles, model) == 0.0
        return
    for assignments in (list(plan_swarm(profiles, model).assignments), sequential_join(profiles, model)):
        assert bottleneck(assignments, L) > 0


def test_planner_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(3)
    model = toy_model(12)
    profiles = [node(f"n{i}", float(rng.uniform(1, 20)), int(rng.integers(1, 12))) for i in range(9)]
    assert plan_swarm(profiles, model, seed=4) == plan_swarm(profiles, model, seed=4)


# ------------------------------------------------------------------------------------ baselines


def test_baselines_respect_memory_and_bounds() -> None:
    rng = np.random.default_rng(0)
    model = toy_model(20)
    profiles = [node(f"n{i}", float(rng.uniform(1, 10)), int(rng.integers(1, 21))) for i in range(15)]
    bound = upper_bound(profiles, model)
    for split in (uniform_split, memory_proportional_split, petals_greedy, sequential_join):
        assignments = split(profiles, model)
        by_id = {p.node_id: p for p in profiles}
        for a in assignments:
            assert a.span.end <= 20
            assert a.span.length <= max_span_length(by_id[a.node_id], model)
            assert a.throughput == span_throughput(by_id[a.node_id], model, a.span.length)
        assert 0 <= bottleneck(assignments, 20) <= bound * (1 + 1e-9)
    # Petals always takes as many blocks as fit
    assert all(a.span.length == max_span_length(p, model) for a, p in zip(petals_greedy(profiles, model), profiles))


def test_memory_proportional_split_gives_shares_by_memory() -> None:
    model = toy_model(12)
    profiles = [node("big", 1.0, 12), node("small", 1.0, 6)]  # one ring: 8 and 4 blocks
    spans = {a.node_id: a.span for a in memory_proportional_split(profiles, model)}
    assert spans == {"big": Span(0, 8), "small": Span(8, 12)}


@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=12), st.integers(1, 12))
@SETTINGS
def test_petals_best_start_matches_petals_rule(values: list[float], length: int) -> None:
    T = np.array(values)
    length = min(length, T.size)
    reference = min((sorted(T[i : i + length]), i) for i in range(T.size - length + 1))[-1]
    assert petals_best_start(T, length) == reference


def test_petals_rebalancing_moves_a_duplicate_to_an_empty_stretch() -> None:
    rng = np.random.default_rng(0)
    # two servers on [0, 2) of 4 blocks, nothing on [2, 4): Petals moves one of them
    move = petals_should_move(np.array([0, 0]), np.array([2, 2]), np.array([1.0, 1.0]), 0, 4, rng)
    assert move == 2
    # evenly spread: nothing to gain
    assert petals_should_move(np.array([0, 2]), np.array([2, 2]), np.array([1.0, 1.0]), 0, 4, rng) is None
