"""Bad input gets an error naming the problem and the server stays up; SIGTERM exits cleanly."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from swarmshard.demo import chat_input_ids, local_generate
from swarmshard.transport.schemas import GROUP_RPC, INFERENCE_RPC, Message
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


def _meta(reply: Message) -> dict:
    return {**reply.meta, "shapes": [tuple(t.shape) for t in reply.tensors]}


def test_group_steps_run_open_sessions_and_refuse_what_is_wrong(raw, smol_swarm):
    """GroupStep carries steps of sessions opened on inference streams; a bad entry is refused on
    its own, a bad message as a whole, and the sessions go on."""
    hidden = torch.randn(2, 1, 3, 576, generator=torch.Generator().manual_seed(0)) * 2

    async def scenario(node, peer):
        streams = [await node.open_stream(peer, INFERENCE_RPC) for _ in range(3)]
        group = await node.open_stream(peer, GROUP_RPC)
        try:
            ids = [f"group-session-{i:04d}" for i in range(3)]
            for stream, sid in zip(streams, ids):
                assert (await stream.send(Message(meta={**OPEN, "session_id": sid}))).meta["ok"] is True
            entries = [{"session_id": ids[0], "step": 0, "position": 0}, {"session_id": ids[1], "step": 0, "position": 0}]
            together = await group.send(Message(meta={"kind": "group_step", "steps": entries},
                                                tensors=[hidden[0], hidden[1]]))
            alone = await streams[2].send(Message(meta={"kind": "step", "step": 0, "position": 0}, tensors=[hidden[0]]))
            step = lambda sid, pos: {"session_id": sid, "step": 1, "position": pos}  # noqa: E731
            replies = [
                # one bad entry (position past the cache) beside a good one: refused alone
                await group.send(Message(meta={"kind": "group_step", "steps": [step(ids[0], 3), step(ids[1], 7)]},
                                         tensors=[hidden[0][:, :1], hidden[1][:, :1]])),
                await group.send(Message(meta={"kind": "group_step", "steps": [step("never-opened-01", 0)]},
                                         tensors=[hidden[0]])),
                await group.send(Message(meta={"kind": "group_step", "steps": [step(ids[0], 4)] * 2},
                                         tensors=[hidden[0][:, :1]] * 2)),
                await group.send(Message(meta={"kind": "group_step", "steps": [step(ids[0], 4)]}, tensors=[])),
                await group.send(Message(meta={"kind": "group_step", "steps": []})),
                await group.send(Message(meta={"kind": "step", "step": 0, "position": 0}, tensors=[hidden[0]])),
            ]
            # the sessions still step, on their own streams or grouped
            after = await streams[0].send(Message(meta={"kind": "step", "step": 2, "position": 4},
                                                  tensors=[hidden[0][:, :1]]))
            return _meta(together), together.tensors, alone.tensors[0], [_meta(r) for r in replies], _meta(after)
        finally:
            for stream in [*streams, group]:
                await stream.close()

    together, outs, alone, replies, after = raw.run(scenario)
    assert together["ok"] is True and [r["ok"] for r in together["results"]] == [True, True]
    assert together["shapes"] == [(1, 3, 576), (1, 3, 576)]
    assert torch.allclose(outs[0], alone, atol=1e-4)  # grouped (stacked) = alone
    first = replies[0]["results"]
    assert first[0]["ok"] is True and first[1]["ok"] is False
    assert "starts at position 7 but the session holds 3" in first[1]["error"] and replies[0]["shapes"] == [(1, 1, 576)]
    assert "unknown session never-opened-01" in replies[1]["results"][0]["error"]
    assert "same session more than once" in replies[2]["error"]
    assert "a group of 1 steps carries 0 tensors" in replies[3]["error"]
    assert "malformed GroupStep" in replies[4]["error"] and "steps" in replies[4]["error"]
    assert "malformed GroupStep" in replies[5]["error"] and "kind" in replies[5]["error"]
    assert after["ok"] is True and after["shapes"] == [(1, 1, 576)]


def test_group_steps_cannot_reach_another_peers_session(raw, smol_swarm):
    async def open_one(node, peer):
        stream = await node.open_stream(peer, INFERENCE_RPC)
        assert (await stream.send(Message(meta={**OPEN, "session_id": "owned-by-raw-01"}))).meta["ok"] is True
        return stream

    stream = raw.run(open_one)
    try:
        with raw_peer(smol_swarm) as other:
            async def intrude(node, peer):
                group = await node.open_stream(peer, GROUP_RPC)
                try:
                    steps = [{"session_id": "owned-by-raw-01", "step": 0, "position": 0}]
                    return (await group.send(Message(meta={"kind": "group_step", "steps": steps},
                                                     tensors=[torch.zeros(1, 2, 576)]))).meta
                finally:
                    await group.close()

            reply = other.run(intrude)
        assert reply["ok"] is True and reply["results"][0]["ok"] is False
        assert "unknown session owned-by-raw-01" in reply["results"][0]["error"]
    finally:
        raw.run(lambda node, peer: stream.close())


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
