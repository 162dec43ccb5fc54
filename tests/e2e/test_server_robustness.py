"""Bad input gets an error naming the problem and the server stays up; SIGTERM exits cleanly."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from swarmshard.demo import chat_input_ids, local_generate
from swarmshard.transport.schemas import Message
from tests.e2e.raw_peer import raw_peer

pytestmark = pytest.mark.slow

OPEN = {"kind": "open", "session_id": "test-session-0001", "model_id": "smollm2-135m", "start": 0, "end": 10,
        "max_length": 32}


@pytest.fixture(scope="module")
def raw(smol_swarm):
    with raw_peer(smol_swarm) as peer:
        yield peer


def test_malformed_requests_get_named_errors(raw):
    replies = raw.exchange([
        Message(meta={"kind": "open", "session_id": "x"}),                      # malformed open
        Message(meta={**OPEN, "start": 5}),                                     # wrong span
        Message(meta={**OPEN, "model_id": "other-model"}),                      # wrong model
        Message(meta={**OPEN, "max_length": 100_000}),                          # does not fit the cache
        Message(meta=OPEN),                                                     # valid open
        Message(meta={"kind": "step", "step": 0, "position": 0}, tensors=[torch.zeros(1, 3, 100)]),
        Message(meta={"kind": "step", "step": 0, "position": 0}, tensors=[torch.zeros(2, 3, 576)]),
        Message(meta={"kind": "step", "step": 0, "position": 0}, tensors=[torch.zeros(1, 3, 576, dtype=torch.int64)]),
        Message(meta={"kind": "step", "step": 0, "position": 0}, tensors=[torch.full((1, 3, 576), float("nan"))]),
        Message(meta={"kind": "step", "step": 0, "position": 5}, tensors=[torch.zeros(1, 3, 576)]),
        Message(meta={"kind": "step", "step": 0, "position": 30}, tensors=[torch.zeros(1, 3, 576)]),
        Message(meta={"kind": "step", "step": 0, "position": 0}, tensors=[]),
        Message(meta={"kind": "step", "step": 0, "position": 0}, tensors=[torch.zeros(1, 3, 576)]),  # valid
    ])
    errors = [r.get("error", "") for r in replies]
    assert "session_id" in errors[0] and "max_length" in errors[0]
    assert "serves blocks 0:10, not 5:10" in errors[1]
    assert "not 'other-model'" in errors[2]
    assert "needs 100000 cache tokens" in errors[3]
    assert replies[4]["ok"] is True and replies[4]["cache_tokens_left"] == 4096 - 32
    assert "(batch, seq_len >= 1, 576)" in errors[5]
    assert "opened for batch 1, got batch 2" in errors[6]
    assert "'int64' not accepted" in errors[7]
    assert "NaN" in errors[8]
    assert "starts at position 5 but the session holds 0" in errors[9]
    assert "exceed the session's max_length 32" in errors[10]
    assert "exactly one tensor" in errors[11]
    assert replies[12]["ok"] is True and replies[12]["shapes"] == [(1, 3, 576)]


def test_server_still_serves_correctly_after_bad_input(raw, smol_client, smol_local):
    raw.exchange([Message(meta={"garbage": True})])
    ids = chat_input_ids(smol_client.tokenizer, "Name a fruit.")
    out = smol_client.generate(ids, max_new_tokens=8)
    expected, _ = local_generate(smol_local, ids, 8)
    assert out[0, ids.shape[1]:].tolist() == expected.tolist()


def test_sigterm_withdraws_and_stops_p2pd(smol_swarm, smol_client):
    extra = smol_swarm.start_server(0, 10)
    children = psutil.Process(extra.pid).children(recursive=True)
    assert any("p2pd" in c.name() for c in children)
    deadline = time.monotonic() + 60
    while extra.peer_id not in {r.peer_id for r in smol_client.servers()}:
        assert time.monotonic() < deadline, "extra server never appeared in the DHT"
        time.sleep(0.5)
    began = time.monotonic()
    os.kill(extra.pid, signal.SIGTERM)
    assert extra.popen.wait(timeout=20) == 0
    assert time.monotonic() - began < 20
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    deadline = time.monotonic() + 30
    while extra.peer_id in {r.peer_id for r in smol_client.servers()}:
        assert time.monotonic() < deadline, "stopped server's record was not withdrawn"
        time.sleep(0.5)
