"""A server killed mid-generation costs a retry, never a wrong or lost answer (2 replicas per span)."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from swarmshard.client.model import DistributedModelForCausalLM
from swarmshard.client.session import SwarmUnavailable
from swarmshard.demo import wait_for_route
from swarmshard.launch import LocalSwarm

pytestmark = pytest.mark.slow

SPANS = [(0, 15), (15, 30)]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def replicated(smollm2, store_home):
    swarm = LocalSwarm("smollm2-135m", SPANS * 2, home=store_home, cache_tokens=4096)
    with swarm:
        yield swarm


@pytest.fixture(scope="module")
def client(replicated, store_home):
    model = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=replicated.initial_peers, home=store_home, timeout=15
    )
    try:
        wait_for_route(model, timeout=60)
        yield model
    finally:
        model.close()


@pytest.fixture(scope="module")
def prompt(client):
    return torch.tensor([client.tokenizer("A short story about a lighthouse keeper:")["input_ids"]])


@pytest.fixture(scope="module")
def reference(client, prompt, smol_local):
    """The uninterrupted greedy run (through the swarm; also equal to local)."""
    out = client.generate(prompt, max_new_tokens=NEW_TOKENS)
    expected = smol_local.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
    assert out.tolist() == expected.tolist()
    return out.tolist()


def _kill(swarm: LocalSwarm, peer_id: str):
    node = next(n for n in swarm.servers if n.peer_id == peer_id)
    os.killpg(node.pid, signal.SIGKILL)  # the machine dies: server and its p2pd at once
    node.popen.wait(timeout=10)
    return node


def _restore(swarm: LocalSwarm) -> None:
    """Bring every span back to two live replicas for the next test."""
    for start, end in SPANS:
        live = [n for n in swarm.servers if n.alive() and (n.info.get("start"), n.info.get("end")) == (start, end)]
        for _ in range(2 - len(live)):
            swarm.start_server(start, end)


def _generate_with_kill(client, swarm, prompt, hop: int, step: int):
    """Generate, killing the server of hop ``hop`` just before step ``step`` (0 = the prompt) reaches it."""
    killed = []
    prompt_len = prompt.shape[1]

    def before_step(index, hop_session, position):
        current = 0 if position < prompt_len else position - prompt_len + 1
        if not killed and index == hop and current == step:
            killed.append((_kill(swarm, hop_session.hop.peer_id), time.monotonic()))

    with client.inference_session(max_length=prompt_len + NEW_TOKENS) as session:
        session.remote.before_step = before_step
        out = client.generate(prompt, max_new_tokens=NEW_TOKENS)
        failovers = list(session.remote.failovers)
    assert killed, "the kill point was never reached"
    return out.tolist(), killed[0][0], failovers


@pytest.mark.parametrize(
    "hop, step",
    [(1, 0), (0, 1), (1, NEW_TOKENS // 2), (0, NEW_TOKENS - 1)],
    ids=["during-prefill", "first-decoded-token", "middle", "last-token"],
)
def test_kill_one_server_output_is_identical(replicated, client, prompt, reference, hop, step):
    _restore(replicated)
    out, killed, failovers = _generate_with_kill(client, replicated, prompt, hop, step)
    assert out == reference
    _check_failovers(replicated, failovers, killed)
    assert SPANS[hop] in {f.blocks for f in failovers if f.failed_peer == killed.peer_id}
    assert killed.peer_id not in {h.peer_id for h in client.last_route}


def _check_failovers(swarm, failovers, killed) -> None:
    """The killed server was replaced; any other failover was a dead server still announced in the DHT."""
    failed = [f.failed_peer for f in failovers]
    assert killed.peer_id in failed
    dead = {n.peer_id for n in swarm.servers if not n.alive()}
    assert set(failed) <= dead


@pytest.mark.parametrize("seed", [11, 23])
def test_kill_at_random_points_output_is_identical(replicated, client, prompt, reference, seed):
    """Property-style: the kill point (hop and step) is drawn at random; the answer never changes."""
    rng = random.Random(seed)
    _restore(replicated)
    out, killed, failovers = _generate_with_kill(client, replicated, prompt, rng.randrange(2),
                                                 rng.randrange(NEW_TOKENS))
    assert out == reference
    _check_failovers(replicated, failovers, killed)


def test_no_replacement_fails_in_bounded_time_naming_blocks(replicated, store_home, prompt):
    _restore(replicated)
    impatient = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=replicated.initial_peers, home=store_home, timeout=8
    )
    try:
        wait_for_route(impatient, timeout=60)

        def kill_both(index, hop_session, position):
            if index == 1 and position > prompt.shape[1]:
                for node in [n for n in replicated.servers if n.alive() and n.info.get("start") == 15]:
                    _kill(replicated, node.peer_id)

        began = time.monotonic()
        with impatient.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            session.remote.before_step = kill_both
            with pytest.raises(SwarmUnavailable, match="blocks 15:30"):
                impatient.generate(prompt, max_new_tokens=NEW_TOKENS)
        assert time.monotonic() - began < 60
    finally:
        impatient.close()


def test_kill_during_grouped_steps_output_is_identical(replicated, client, prompt, reference):
    """Two sessions step together (one group message per server, client/group.py); their server
    dies mid-generation: both fail over and still produce the uninterrupted output."""
    from concurrent.futures import ThreadPoolExecutor

    _restore(replicated)
    killed = []
    prompt_len = prompt.shape[1]
    # both sessions open before either generates, so they share a route and group their steps
    sessions = [client.open_session(max_length=prompt_len + NEW_TOKENS) for _ in range(2)]
    try:
        assert sessions[0].route == sessions[1].route

        def before_step(index, hop_session, position):
            if not killed and index == 1 and position == prompt_len + NEW_TOKENS // 2:
                killed.append(_kill(replicated, hop_session.hop.peer_id))

        sessions[0].remote.before_step = before_step
        channel = client.step_groups.channel(sessions[0].route[1].peer_id)
        grouped = channel.steps
        with ThreadPoolExecutor(max_workers=2) as pool:
            outs = list(pool.map(lambda s: client.generate(prompt, max_new_tokens=NEW_TOKENS, session=s).tolist(),
                                 sessions))
        assert killed, "the kill point was never reached"
        assert channel.steps > grouped  # steps to the killed server did travel grouped
        assert outs == [reference, reference]
        for session in sessions:
            _check_failovers(replicated, session.remote.failovers, killed[0])
            assert killed[0].peer_id not in {h.peer_id for h in session.route}
    finally:
        for session in sessions:
            session.close()
