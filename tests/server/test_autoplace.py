"""`--blocks auto`: DHT records as placement input, and the join / move decisions taken on them."""

from __future__ import annotations

import pytest

from swarmshard.core.placement import Assignment, NodeProfile, Span
from swarmshard.core.store import Manifest
from swarmshard.server import autoplace
from swarmshard.transport.schemas import ServerRecord

BLOCK = 150_000
KV = 256
CACHE = 1024
PER_BLOCK = BLOCK + KV * CACHE  # weights + KV reserve of one block


def manifest(n_blocks: int = 6, model_id: str = "tiny") -> Manifest:
    return Manifest(
        model_id=model_id, source="test", path="/nonexistent", n_blocks=n_blocks, hidden_size=64, dtype="float32",
        layout={}, block_digests=[f"digest{i}" for i in range(n_blocks)], client_digest="client",
        block_bytes=[BLOCK - 10, BLOCK] + [BLOCK - 5] * (n_blocks - 2), kv_bytes_per_token_per_block=KV,
        split_error=0.0,
    )


M = manifest()
SPEC = autoplace.model_spec(M, CACHE)


def record(peer: str, start: int, end: int, throughput: float, m: Manifest = M, **extra) -> ServerRecord:
    return ServerRecord(peer_id=peer, model_id=m.model_id, start=start, end=end, n_blocks=m.n_blocks,
                        block_digests=m.block_digests[start:end], throughput=throughput, cache_tokens_left=CACHE,
                        cache_tokens_total=CACHE, **extra)


def profile(peer: str, speed: float, blocks_fit: int, quant: str = "none") -> NodeProfile:
    return autoplace.node_profile(peer, speed, blocks_fit * PER_BLOCK + 100, M, quant)


def test_model_spec_takes_the_largest_block_and_the_wire_codec():
    assert (SPEC.num_blocks, SPEC.block_bytes, SPEC.kv_bytes_per_token, SPEC.cache_tokens) == (6, BLOCK, KV, CACHE)
    assert SPEC.activation_bytes == 64 * 4
    assert autoplace.model_spec(M, CACHE, "fp16").activation_bytes == 64 * 2
    with pytest.raises(ValueError, match="unknown wire codec 'zip'"):
        autoplace.model_spec(M, CACHE, "zip")


def test_memory_bounds_the_span_and_int8_weights_fit_more_blocks():
    assert autoplace.max_blocks(profile("a", 60, 3), SPEC) == 3
    assert autoplace.max_blocks(profile("a", 60, 20), SPEC) == 6  # never more than the model has
    roomy = autoplace.node_profile("q", 60, 3 * PER_BLOCK + 100, M, "int8")
    assert autoplace.max_blocks(roomy, SPEC) > 3
    with pytest.raises(autoplace.CannotServe, match="cannot hold one block.*1024 tokens.*--memory-gb"):
        autoplace.max_blocks(autoplace.node_profile("tiny", 60, PER_BLOCK - 1, M), SPEC)


def test_only_records_a_client_would_trust_count():
    other_model = manifest(model_id="other")
    records = [
        record("good", 0, 3, 20.0),
        record("tampered", 3, 6, 50.0).model_copy(update={"block_digests": ["x", "y", "z"]}),
        record("other", 0, 6, 50.0, m=other_model),
        record("deeper", 0, 3, 50.0).model_copy(update={"n_blocks": 7}),
        record("stage", 0, 1, 50.0).model_copy(update={"kind": "stage"}),
    ]
    assert autoplace.trusted_assignments(records, M) == [Assignment("good", Span(0, 3), 20.0)]


def test_first_servers_cover_as_many_blocks_as_they_can():
    first = autoplace.choose_initial(profile("a", 60, 3), [], M, SPEC)
    assert first.assignment == Assignment("a", Span(0, 3), 20.0)
    assert (first.bottleneck_before, first.bottleneck_after, first.max_blocks) == (0.0, 0.0, 3)
    second = autoplace.choose_initial(profile("b", 60, 3), [record("a", 0, 3, 20.0)], M, SPEC)
    assert second.assignment.span == Span(3, 6)
    assert second.bottleneck_after == pytest.approx(20.0)
    assert "blocks 3:6 (3 of the 3 that fit" in second.reason and "weakest blocks were 3-5 at 0.0" in second.reason
    assert second.as_dict()["start"] == 3 and second.as_dict()["servers_seen"] == 1


def test_a_joining_server_ignores_its_own_old_record():
    again = autoplace.choose_initial(profile("a", 60, 6), [record("a", 0, 3, 20.0)], M, SPEC)
    assert again.servers_seen == 0 and again.assignment.span == Span(0, 6)


# The e2e scenario (tests/e2e/test_rebalance.py): A (20 tok/s per block) and B (12) hold the whole
# model, C (15) only 3 blocks. C fills [0, 3); then A gains by moving to [3, 6): 5.33 -> 7 tok/s.
A, B = profile("A", 20, 6), profile("B", 12, 6)
C = profile("C", 15, 3)


def test_scenario_join_then_move():
    two = [record("A", 0, 6, 3.333), record("B", 0, 6, 2.0)]  # records carry 3 decimals
    assert not autoplace.check_move(A, Span(0, 6), two, M, SPEC, 1.15).move  # nothing to gain before C
    joined = autoplace.choose_initial(C, two, M, SPEC)
    assert joined.assignment == Assignment("C", Span(0, 3), 5.0)
    assert joined.bottleneck_after == pytest.approx(joined.bottleneck_before)  # fewer weakest blocks, same level
    three = [*two, record("C", 0, 3, 5.0)]
    move = autoplace.check_move(A, Span(0, 6), three, M, SPEC, 1.15)
    assert move.move and move.span == Span(3, 6)
    assert (move.current_bottleneck, move.new_bottleneck) == (pytest.approx(16 / 3), pytest.approx(7.0))
    assert autoplace.describe_move(Span(0, 6), move, 1.15) == (
        "move 0:6 -> 3:6: swarm bottleneck 5.3 -> 7.0 tok/s (> 1.15x), every block stays served")
    # a higher hysteresis threshold keeps it where it is
    assert not autoplace.check_move(A, Span(0, 6), three, M, SPEC, 1.35).move
    # after A moved, nobody gains enough to move again: the swarm is stable
    after = [record("A", 3, 6, 6.667), record("B", 0, 6, 2.0), record("C", 0, 3, 5.0)]
    for who, span in ((A, Span(3, 6)), (B, Span(0, 6)), (C, Span(0, 3))):
        decision = autoplace.check_move(who, span, after, M, SPEC, 1.15)
        assert not decision.move, who.node_id
        assert decision.current_bottleneck == pytest.approx(7.0, abs=1e-3)
    assert autoplace.describe_move(Span(3, 6), autoplace.check_move(A, Span(3, 6), after, M, SPEC, 1.15), 1.15) \
        .startswith("stay on 3:6: swarm bottleneck 7.0 tok/s")


def test_the_only_server_of_a_block_never_moves():
    lonely = autoplace.check_move(A, Span(0, 6), [record("A", 0, 6, 3.333), record("C", 0, 3, 5.0)], M, SPEC, 1.0)
    assert not lonely.move and lonely.span == Span(0, 6)


def test_own_rate_comes_from_the_profile_not_the_last_announcement():
    stale = [record("A", 0, 6, 999.0), record("B", 0, 6, 2.0)]
    mine = [a for a in autoplace.current_assignments(A, Span(0, 6), stale, M, SPEC) if a.node_id == "A"]
    assert mine == [Assignment("A", Span(0, 6), pytest.approx(20 / 6))]
    with pytest.raises(autoplace.CannotServe, match="span 0:6 no longer fits: 3 block"):
        autoplace.current_assignments(C, Span(0, 6), stale, M, SPEC)
