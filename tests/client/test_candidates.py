"""The client's routing inputs: measured round trips and load, from the servers' announcements."""

from __future__ import annotations

from swarmshard.client.model import UNMEASURED_RTT_S, candidates_from_records
from swarmshard.core.routing import choose_route
from swarmshard.transport.schemas import ServerRecord


def record(peer: str, start: int, end: int, throughput: float = 100.0, sessions: int = 0,
           machine: str = "") -> ServerRecord:
    return ServerRecord(peer_id=peer, model_id="m", start=start, end=end, n_blocks=6,
                        block_digests=[f"d{i}" for i in range(start, end)], throughput=throughput,
                        cache_tokens_left=500, cache_tokens_total=1000, sessions=sessions, machine=machine)


def test_round_trips_and_load_reach_the_candidates():
    records = [record("a", 0, 6, sessions=1, machine="m1"), record("b", 0, 6, sessions=4), record("c", 0, 3)]
    cands = candidates_from_records(records, {"a": 0.02, "b": None}, {"a": 3, "c": 1})
    by_peer = {x.peer_id: x for x in cands}
    assert by_peer["a"].rtt_s == 0.02 and by_peer["b"].rtt_s == UNMEASURED_RTT_S and by_peer["c"].rtt_s == UNMEASURED_RTT_S
    # load: the larger of what the server announced and what we hold on it (not both: that double counts)
    assert (by_peer["a"].load, by_peer["b"].load, by_peer["c"].load) == (3, 4, 1)
    assert (by_peer["a"].throughput, by_peer["a"].cache_tokens_left, by_peer["a"].start, by_peer["a"].end) == (
        100.0, 500, 0, 6)
    assert (by_peer["a"].machine, by_peer["b"].machine) == ("m1", "")


def test_our_own_sessions_push_the_next_one_to_another_replica():
    records = [record("a", 0, 6), record("b", 0, 6)]
    rtts = {"a": 0.001, "b": 0.002}
    assert [h.peer_id for h in choose_route(candidates_from_records(records, rtts), 6)] == ["a"]
    assert [h.peer_id for h in choose_route(candidates_from_records(records, rtts, {"a": 1}), 6)] == ["b"]
