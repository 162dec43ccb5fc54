"""Route choice: min-latency chain of whole spans, bans, cache admission, clear errors."""

from __future__ import annotations

import pytest

from swarmshard.core.routing import Candidate, NoRoute, choose_route, missing_blocks


def c(peer, start, end, throughput=100.0, cache=1000, rtt=0.001):
    return Candidate(peer, start, end, throughput, cache, rtt)


def test_picks_faster_chain():
    cands = [c("a", 0, 10, 50), c("b", 10, 30, 50), c("fast", 0, 30, 40), c("c", 0, 10, 500), c("d", 10, 30, 500)]
    route = choose_route(cands, 30)
    assert [h.peer_id for h in route] == ["c", "d"]


def test_bans_and_cache_admission_reroute():
    cands = [c("a", 0, 10), c("a2", 0, 10, cache=10), c("b", 10, 20)]
    assert [h.peer_id for h in choose_route(cands, 20, need_tokens=5, banned={"a"})] == ["a2", "b"]
    with pytest.raises(NoRoute, match="blocks 0-9") as info:
        choose_route(cands, 20, need_tokens=50, banned={"a"})
    assert info.value.missing_blocks == list(range(10))


def test_uncovered_blocks_are_named():
    with pytest.raises(NoRoute, match="blocks 5-7, 12 of 13"):
        choose_route([c("a", 0, 5), c("b", 8, 12)], 13)
    assert missing_blocks([c("a", 0, 5), c("b", 8, 12)], 13) == [5, 6, 7, 12]


def test_spans_that_do_not_chain():
    with pytest.raises(NoRoute, match="do not chain"):
        choose_route([c("a", 0, 10), c("b", 5, 20)], 20)


def test_fewer_hops_break_ties():
    cands = [c("a", 0, 5, 200), c("b", 5, 10, 200), c("whole", 0, 10, 100, rtt=0.001)]
    # a+b: 2*(0.001 + 0.005) = 0.012 ; whole: 0.001 + 0.01 = 0.011
    assert [h.peer_id for h in choose_route(cands, 10)] == ["whole"]
