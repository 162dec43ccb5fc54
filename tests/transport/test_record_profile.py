"""Announced node profiles: new record fields are optional (older records still validate) and bounded."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from swarmshard.transport.schemas import MAX_RTT_PEERS, ServerRecord

OLD = {"peer_id": "p", "model_id": "m", "start": 0, "end": 2, "n_blocks": 4, "block_digests": ["a", "b"],
       "throughput": 12.5, "cache_tokens_left": 10, "cache_tokens_total": 20, "addrs": [], "version": "0.1",
       "quant": "none", "wire_codec": "none"}


def test_a_record_without_a_profile_still_validates():
    r = ServerRecord.model_validate(OLD)
    assert (r.block_speed, r.memory_bytes, r.sessions, r.rtt, r.auto, r.machine) == (0.0, 0, 0, {}, False, "")


def test_profile_fields_round_trip():
    r = ServerRecord.model_validate({**OLD, "block_speed": 50.0, "memory_bytes": 8 * 10**9, "sessions": 3,
                                     "rtt": {"q": 0.0123}, "auto": True, "machine": "0123abcd"})
    assert ServerRecord.model_validate(r.model_dump()) == r


@pytest.mark.parametrize("field, value", [
    ("rtt", {f"peer{i}": 0.01 for i in range(MAX_RTT_PEERS + 1)}),
    ("rtt", {"q": -0.1}),
    ("sessions", -1),
    ("block_speed", -5.0),
    ("memory_bytes", -1),
    ("machine", "m" * 65),
])
def test_out_of_range_profiles_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        ServerRecord.model_validate({**OLD, field: value})


def test_the_machine_fingerprint_is_stable_and_reveals_nothing():
    from pathlib import Path

    from swarmshard.server.node import machine_fingerprint

    first = machine_fingerprint()
    assert first == machine_fingerprint() and len(first) == 16 and int(first, 16) >= 0
    raw = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else ""
    assert not raw or raw[:16] != first
