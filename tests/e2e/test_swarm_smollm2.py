"""The real SmolLM2 through three server processes equals the same model in one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from swarmshard.demo import chat_input_ids, local_generate

pytestmark = pytest.mark.slow


def test_greedy_generation_is_token_identical(smol_client, smol_local):
    ids = chat_input_ids(smol_client.tokenizer, "What is the capital of France? Answer briefly.")
    out = smol_client.generate(ids, max_new_tokens=24, do_sample=False)
    expected, _ = local_generate(smol_local, ids, 24)
    assert out[0, : ids.shape[1]].tolist() == ids[0].tolist()
    assert out[0, ids.shape[1]:].tolist() == expected.tolist()
    assert [(h.start, h.end) for h in smol_client.last_route] == [(0, 10), (10, 20), (20, 30)]
    assert smol_client.last_stats.new_tokens == len(expected) <= 24


@torch.inference_mode()
def test_forward_logits_match_local(smol_client, smol_local):
    ids = torch.tensor([[1, 504, 3458, 314, 4057, 28, 2]])
    error = (smol_client.forward(ids) - smol_local(ids).logits).abs().max().item()
    assert error <= 1e-4


def test_multi_turn_session_continues_the_cache(smol_client, smol_local):
    tok = smol_client.tokenizer
    first = torch.tensor([tok("The three primary colors are")["input_ids"]])
    second = torch.tensor([tok(". Another color is")["input_ids"]])
    with smol_client.inference_session(max_length=64) as session:
        turn1 = smol_client.generate(first, max_new_tokens=6)
        turn2 = smol_client.generate(second, max_new_tokens=6)
        assert session.position == first.shape[1] + 6 + second.shape[1] + 5
    whole = torch.cat([turn1, second], dim=1)
    expected, _ = local_generate(smol_local, whole, 6)
    assert turn2[0, second.shape[1]:].tolist() == expected.tolist()


def test_sampling_is_seeded_and_streamed(smol_client):
    ids = torch.tensor([smol_client.tokenizer("Once upon a time")["input_ids"]])

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        streamer = Collect()
        out = smol_client.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9,
                                   streamer=streamer)
        runs.append(out[0].tolist())
        assert streamer.chunks[0] == ids.tolist() and streamer.chunks[-1] == "end"
        assert [c[0] for c in streamer.chunks[1:-1]] == out[0, ids.shape[1]:].tolist()
    assert runs[0] == runs[1]


def test_status_reports_full_coverage(smol_swarm, store_home):
    cmd = [sys.executable, "-m", "swarmshard.cli", "status", "--json", "--home", store_home]
    for addr in smol_swarm.initial_peers:
        cmd += ["--initial-peers", addr]
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout)
    assert report["covered"] and report["missing"] == [] and report["n_blocks"] == 30
    spans = sorted((s["start"], s["end"]) for s in report["servers"])
    assert spans == [(0, 10), (10, 20), (20, 30)]
    assert all(s["throughput"] > 0 and s["cache_tokens_total"] == 4096 for s in report["servers"])
