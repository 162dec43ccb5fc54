"""Routing with real inputs: measured round trips and server load spread sessions over replicas."""

from __future__ import annotations

import pytest

from swarmshard.core.routing import Candidate, NoRoute, choose_route, hop_cost, spread_routes, with_load


def c(peer, start, end, throughput=100.0, cache=1000, rtt=0.001, load=0.0, machine=""):
    return Candidate(peer, start, end, throughput, cache, rtt, load, machine)


def peers(route):
    return [h.peer_id for h in route]


def test_hop_cost_adds_a_step_of_compute_per_session_already_served():
    assert hop_cost(c("a", 0, 1, throughput=50, rtt=0.01)) == pytest.approx(0.01 + 1 / 50)
    assert hop_cost(c("a", 0, 1, throughput=50, rtt=0.01, load=3)) == pytest.approx(0.01 + 4 / 50)
    assert hop_cost(c("a", 0, 1, throughput=50, rtt=0.01, load=3), load_penalty=0.5) == pytest.approx(0.01 + 2.5 / 50)
    assert hop_cost(c("a", 0, 1, throughput=50, rtt=0.01, load=3), load_penalty=0.0) == pytest.approx(0.01 + 1 / 50)
    with pytest.raises(ValueError, match="load_penalty must be >= 0"):
        hop_cost(c("a", 0, 1), load_penalty=-1)


def test_measured_round_trip_decides_between_equal_replicas():
    near, far = c("near", 0, 4, rtt=0.002), c("far", 0, 4, rtt=0.080)
    assert peers(choose_route([far, near], 4)) == ["near"]
    # a faster but far server loses once the round trip outweighs its compute advantage
    assert peers(choose_route([c("far-fast", 0, 4, 1000, rtt=0.050), c("near-slow", 0, 4, 50, rtt=0.001)], 4)) == [
        "near-slow"]


def test_a_busy_replica_sends_the_next_session_to_an_idle_one():
    busy, idle = c("busy", 0, 4, load=2), c("idle", 0, 4)
    assert peers(choose_route([busy, idle], 4)) == ["idle"]
    assert peers(choose_route([busy, idle], 4, load_penalty=0.0)) == ["busy"]  # first listed wins the tie


def test_load_can_make_a_two_hop_chain_cheaper_than_a_busy_whole_span():
    whole = c("whole", 0, 10, throughput=100, load=3)  # 0.001 + 4/100
    a, b = c("a", 0, 5, throughput=100), c("b", 5, 10, throughput=100)  # 2 * (0.001 + 1/100)
    assert peers(choose_route([whole, a, b], 10)) == ["a", "b"]
    assert peers(choose_route([c("whole", 0, 10, throughput=100), a, b], 10)) == ["whole"]


def test_with_load_adds_only_where_given():
    cands = [c("a", 0, 2, load=1), c("b", 0, 2)]
    out = with_load(cands, {"b": 2, "x": 5})
    assert [(x.peer_id, x.load) for x in out] == [("a", 1), ("b", 2)]
    assert cands[1].load == 0  # candidates are values: the input is untouched


def test_parallel_sessions_spread_over_equal_replicas():
    routes = spread_routes([c("r1", 0, 6), c("r2", 0, 6)], 6, sessions=4)
    assert [peers(r) for r in routes] == [["r1"], ["r2"], ["r1"], ["r2"]]


def test_parallel_sessions_favour_a_faster_replica_in_proportion():
    # fast: (1 + k) / 250 per token with k sessions on it; slow: (1 + k) / 100
    routes = spread_routes([c("fast", 0, 6, 250, rtt=0.0), c("slow", 0, 6, 100, rtt=0.0)], 6, sessions=4)
    assert [peers(r)[0] for r in routes] == ["fast", "fast", "slow", "fast"]


def test_parallel_sessions_run_out_of_cache_with_a_clear_error():
    cands = [c("a", 0, 3, cache=100), c("b", 3, 6, cache=250)]
    assert len(spread_routes(cands, 6, sessions=1, need_tokens=100)) == 1
    with pytest.raises(NoRoute, match="blocks 0-2 of 6"):
        spread_routes(cands, 6, sessions=2, need_tokens=100)
    with pytest.raises(ValueError, match="sessions must be >= 0"):
        spread_routes(cands, 6, sessions=-1)


def test_spread_respects_bans():
    routes = spread_routes([c("a", 0, 6), c("b", 0, 6), c("c", 0, 6)], 6, sessions=3, banned={"b"})
    assert sorted(peers(r)[0] for r in routes) == ["a", "a", "c"]


def test_concurrent_sessions_keep_to_few_routes():
    """Two replicas per span; each session is routed on fresh (jittery) round-trip measurements.
    On cost alone sessions end up on many mixes of replicas; with affinity they share the routes
    already in use, still balanced over the replicas."""
    import random
    from dataclasses import replace

    from swarmshard.core.routing import prefer_shared_route

    base = [c("a1", 0, 2, 101), c("b1", 0, 2, 100), c("a2", 2, 4, 100), c("b2", 2, 4, 104),
            c("a3", 4, 6, 100), c("b3", 4, 6, 99)]

    def route_all(affinity: float) -> list[list[str]]:
        load: dict[str, float] = {}
        routes = []
        jitter = random.Random(0)
        for _ in range(16):
            measured = [replace(x, rtt_s=0.001 + jitter.uniform(0, 0.002)) for x in base]
            cands = with_load(measured, load)
            best = choose_route(cands, 6)
            route = prefer_shared_route(best, routes, cands, affinity=affinity)
            routes.append(route)
            for hop in route:
                load[hop.peer_id] = load.get(hop.peer_id, 0) + 1
        return [peers(r) for r in routes]

    plain, shared = route_all(0.0), route_all(0.1)
    assert len({tuple(r) for r in plain}) > 2
    assert len({tuple(r) for r in shared}) == 2
    per_server = {p: sum(p in r for r in shared) for p in ("a1", "b1", "a2", "b2", "a3", "b3")}
    assert set(per_server.values()) == {8}  # still balanced over the replicas


def test_a_shared_route_is_dropped_when_unusable_or_much_slower():
    from swarmshard.core.routing import RouteHop, prefer_shared_route, route_cost

    fast, slow = c("fast", 0, 4, 100), c("slow", 0, 4, 50)
    known = [[RouteHop("slow", 0, 4)]]
    best = choose_route([fast, slow], 4)
    assert peers(best) == ["fast"]
    assert peers(prefer_shared_route(best, known, [fast, slow])) == ["fast"]  # 2x the cost: not shared
    assert peers(prefer_shared_route(best, known, [fast, c("slow", 0, 4, 85)])) == ["fast"]  # +18%: not shared
    near = c("slow", 0, 4, 95)
    assert peers(prefer_shared_route(best, known, [fast, near])) == ["slow"]  # within 10%: shared
    assert peers(prefer_shared_route(best, known, [fast, near], banned={"slow"})) == ["fast"]
    assert peers(prefer_shared_route(best, known, [fast, near], need_tokens=5000)) == ["fast"]  # no cache left
    assert peers(prefer_shared_route(best, known, [fast, c("slow", 0, 3, 95)])) == ["fast"]  # span moved
    assert peers(prefer_shared_route(best, [[RouteHop("slow", 0, 2)]], [fast, near])) == ["fast"]  # other blocks
    assert route_cost([RouteHop("gone", 0, 4)], [fast]) is None
    assert route_cost(best, [fast]) == pytest.approx(hop_cost(fast))


def test_replicas_on_one_machine_share_one_route():
    """Servers announcing one machine share its cores: spreading our sessions over them adds no
    compute, so all 16 keep to one route (and its servers stack them); on distinct machines the
    same swarm still spreads them evenly."""
    from dataclasses import replace

    from swarmshard.core.routing import prefer_shared_route

    base = [c("a1", 0, 2, 101), c("b1", 0, 2, 100), c("a2", 2, 4, 100), c("b2", 2, 4, 104),
            c("a3", 4, 6, 100), c("b3", 4, 6, 99)]

    def route_all(candidates) -> list[tuple[str, ...]]:
        load: dict[str, float] = {}
        routes = []
        for _ in range(16):
            cands = with_load(candidates, load)
            route = prefer_shared_route(choose_route(cands, 6), routes, cands)
            routes.append(route)
            for hop in route:
                load[hop.peer_id] = load.get(hop.peer_id, 0) + 1
        return [tuple(peers(r)) for r in routes]

    one_machine = route_all([replace(x, machine="m") for x in base])
    assert len(set(one_machine)) == 1
    per_machine = route_all([replace(x, machine=x.peer_id[0]) for x in base])  # replicas a* and b* apart
    assert len(set(per_machine)) == 2 and sorted(per_machine.count(r) for r in set(per_machine)) == [8, 8]
    unknown = route_all(base)  # machines not announced: each server counts as its own machine
    assert len(set(unknown)) == 2


def test_a_colocated_route_is_still_dropped_when_unusable_or_slower_idle():
    from dataclasses import replace

    from swarmshard.core.routing import RouteHop, prefer_shared_route

    known = [[RouteHop("slow", 0, 4)]]
    loaded = c("slow", 0, 4, 95, machine="m", load=8)
    fast = c("fast", 0, 4, 100, machine="m")
    best = choose_route([fast, loaded], 4)
    assert peers(best) == ["fast"]
    assert peers(prefer_shared_route(best, known, [fast, loaded])) == ["slow"]  # same machine: shared despite load
    assert peers(prefer_shared_route(best, known, [fast, replace(loaded, machine="n")])) == ["fast"]  # other machine
    assert peers(prefer_shared_route(best, known, [fast, c("slow", 0, 4, 50, machine="m", load=8)])) == ["fast"]
    assert peers(prefer_shared_route(best, known, [fast, loaded], banned={"slow"})) == ["fast"]
    assert peers(prefer_shared_route(best, known, [fast, loaded], need_tokens=5000)) == ["fast"]  # no cache left
    assert peers(prefer_shared_route(best, known, [fast, replace(loaded, machine="")])) == ["fast"]  # unknown
