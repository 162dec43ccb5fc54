"""`--blocks auto` servers place themselves and rebalance while a generation runs through them.

Three real server processes of a 6-block tiny model, speeds declared with --block-speed so the
decisions are deterministic (tests/server/test_autoplace.py checks the same numbers; they are small
so that per-token costs differ by far more than any round-trip noise):
- A (20 tok/s per block) and B (12, never rebalances) have memory for all 6 blocks: both serve 0:6;
- a client's second concurrent session goes to B (A's load makes it slower); then a greedy
  generation, alone, is routed through A (3.33 tok/s beats B's 2);
- C (15) joins with memory for 3 blocks: it fills 0:3 (bottleneck stays 5.33 tok/s, fewer weakest blocks);
- A's next check finds that moving to 3:6 lifts the bottleneck 5.33 -> 7 tok/s (> 1.15x) with B still
  covering every block, so it loads 3:6, announces it and answers the session's next step 'moved';
- the client fails over to B, replays its inputs, and the text equals the local model's.
"""

from __future__ import annotations

import time

import pytest
import torch

from swarmshard.client.model import DistributedModelForCausalLM
from swarmshard.demo import wait_for_route
from swarmshard.launch import LocalSwarm

pytestmark = pytest.mark.slow

CACHE_TOKENS = 1024
NEW_TOKENS = 20
PAUSE_AT = 6  # the generated token after which C joins and the swarm rebalances


def memory_gb(manifest, blocks: int) -> str:
    """--memory-gb for which exactly ``blocks`` blocks (weights + KV reserve) fit."""
    per_block = max(manifest.block_bytes) + manifest.kv_bytes_per_token_per_block * CACHE_TOKENS
    return f"{(blocks + 0.5) * per_block / 1e9:.9f}"


class PauseAt:
    """A transformers streamer that runs ``action`` once, after the ``at``-th generated token."""

    def __init__(self, at: int, action) -> None:
        self.at, self.action, self.seen = at, action, -1  # the first put() is the prompt

    def put(self, value) -> None:
        self.seen += 1
        if self.seen == self.at:
            self.action()

    def end(self) -> None:
        pass


def test_auto_servers_place_themselves_and_rebalance_mid_generation(store, store_home, tiny_model_dirs):
    path = str(tiny_model_dirs["tiny-llama"])
    manifest = store.resolve(path, progress=False)
    local = store.load_full_model(manifest)
    whole, half = memory_gb(manifest, 6), memory_gb(manifest, 3)
    swarm = LocalSwarm(path, [], home=store_home, cache_tokens=CACHE_TOKENS,
                       server_args=["--announce-period", "2", "--rtt-period", "2"])
    with swarm:
        # together: whether or not they see each other, the whole model fits and 0:6 is their best span
        # declared speeds and machines: they stand for two different computers
        a, b = swarm.start_auto_servers([["--block-speed", "20", "--memory-gb", whole, "--rebalance-period", "1",
                                          "--machine", "machine-a"],
                                         ["--block-speed", "12", "--memory-gb", whole, "--rebalance-period", "0",
                                          "--machine", "machine-b"]])
        assert [(n.info["start"], n.info["end"]) for n in (a, b)] == [(0, 6), (0, 6)]

        client = DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                             home=store_home, timeout=20)
        try:
            wait_for_route(client, timeout=60)
            # our own open sessions count as load: a second session goes to B (2/3.33 s > 1/2 s per token)
            first, second = client.open_session(max_length=16), client.open_session(max_length=16)
            spread = [[h.peer_id for h in s.route] for s in (first, second)]
            first.close()
            second.close()
            assert spread == [[a.peer_id], [b.peer_id]]
            ids = torch.randint(0, local.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
            seen: dict = {}

            def join_and_rebalance() -> None:
                seen["route"] = [(h.peer_id, h.start, h.end) for h in session.route]
                seen["c"] = c = swarm.start_auto_server(
                    extra=["--block-speed", "15", "--memory-gb", half, "--rebalance-period", "1", "--machine", "machine-c"])
                want = {a.peer_id: (3, 6), b.peer_id: (0, 6), c.peer_id: (0, 3)}
                deadline = time.monotonic() + 90
                while True:
                    records = {r.peer_id: r for r in client.servers()}
                    if {p: (r.start, r.end) for p, r in records.items()} == want and a.peer_id in records[b.peer_id].rtt:
                        seen["records"] = records
                        return
                    assert time.monotonic() < deadline, f"swarm did not rebalance: {records}\n{a.log_tail()}"
                    time.sleep(0.5)

            with client.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                out = client.generate(ids, max_new_tokens=NEW_TOKENS, streamer=PauseAt(PAUSE_AT, join_and_rebalance))
                failovers = list(session.remote.failovers)
                final_route = [(h.peer_id, h.start, h.end) for h in session.route]
        finally:
            client.close()

        expected = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=0)
        assert out.tolist() == expected.tolist()
        c = seen["c"]
        # the generation was running on A when C joined; A's move sent it to B with its history replayed
        assert seen["route"] == [(a.peer_id, 0, 6)]
        assert [f.failed_peer for f in failovers] == [a.peer_id]
        assert "moved from blocks 0:6 to 3:6" in failovers[0].reason
        assert failovers[0].replayed_steps == PAUSE_AT  # the prompt, then tokens 1..PAUSE_AT-1 (the last is sent next)
        assert final_route == [(b.peer_id, 0, 6)]
        # what each server decided and announced
        placed_c = next(e for e in c.events if e["event"] == "placed")
        assert (placed_c["start"], placed_c["end"], placed_c["servers_seen"]) == (0, 3, 2)
        assert "blocks 0:3 (3 of the 3 that fit" in placed_c["reason"]
        moves = [e for e in a.events if e["event"] == "moved"]
        assert [(m["from"], m["to"]) for m in moves] == [([0, 6], [3, 6])]
        assert (moves[0]["bottleneck_before"], moves[0]["bottleneck_after"]) == (pytest.approx(16 / 3, abs=1e-3),
                                                                                 pytest.approx(7.0, abs=1e-3))
        assert not [e for e in (*b.events, *c.events) if e["event"] == "moved"]
        records = seen["records"]
        assert {p: (r.block_speed, r.auto) for p, r in records.items()} == {
            a.peer_id: (20.0, True), b.peer_id: (12.0, True), c.peer_id: (15.0, True)}
        assert records[a.peer_id].throughput == pytest.approx(20 / 3, abs=1e-3)  # 20 tok/s per block over 3 blocks
        assert records[c.peer_id].memory_bytes == int(float(half) * 1e9)
        assert 0.0 < records[b.peer_id].rtt[a.peer_id] < 5.0
    for node in [*swarm.servers, swarm.bootstrap]:
        assert not node.alive(), f"{node.name} (pid {node.pid}) survived stop"
