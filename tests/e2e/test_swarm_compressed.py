"""SmolLM2 through three real server processes started with ``--quant int8 --wire-codec blockwise8``.

Token identity with the local float32 model is NOT expected here: int8 weights and 8-bit hidden
states are lossy. What must hold is perplexity-level agreement (within +1% of local float32 on a
fixed text), close per-token predictions, a compressed wire, and strict negotiation: codecs a
server does not allow and malformed compressed payloads are refused by name, and the server stays up.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from swarmshard.client.model import CodecRefused, DistributedModelForCausalLM
from swarmshard.demo import chat_input_ids, wait_for_route
from swarmshard.launch import LocalSwarm
from swarmshard.transport.codecs import encode_tensor
from swarmshard.transport.schemas import Message, WireTensor
from tests.e2e.raw_peer import raw_peer

pytestmark = pytest.mark.slow

SPANS = [(0, 10), (10, 20), (20, 30)]
WINDOW = 512


@pytest.fixture(scope="module")
def int8_swarm(smollm2, store_home):
    swarm = LocalSwarm("smollm2-135m", SPANS, home=store_home, cache_tokens=4096,
                       server_args=["--quant", "int8", "--wire-codec", "blockwise8"])
    with swarm:
        yield swarm
    for node in [*swarm.servers, swarm.bootstrap]:
        assert not node.alive(), f"{node.name} (pid {node.pid}) survived stop"


@pytest.fixture(scope="module")
def b8_client(int8_swarm, store_home):
    client = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=int8_swarm.initial_peers, home=store_home, wire_codec="blockwise8"
    )
    try:
        wait_for_route(client, timeout=60)
        yield client
    finally:
        client.close()


def _corpus_ids(tokenizer, n: int) -> torch.Tensor:
    """The first ``n`` tokens of Python's own help topics (fixed and offline, as in bench/accuracy.py)."""
    from pydoc_data.topics import topics

    return torch.tensor([tokenizer("\n\n".join(topics.values())[: 40 * n])["input_ids"][:n]])


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def test_perplexity_through_int8_swarm_with_8bit_wire_is_within_1_percent(b8_client, smol_local):
    ids = _corpus_ids(b8_client.tokenizer, 2 * WINDOW)
    nll = {"swarm": 0.0, "local": 0.0}
    kls, agree, count = [], 0, 0
    sent_before = b8_client.node.bytes_sent
    for start in range(0, ids.shape[1], WINDOW):
        window = ids[:, start : start + WINDOW]
        swarm = _logprobs(b8_client.forward(window)[0])
        local = _logprobs(smol_local(window).logits[0])
        targets = window[0, 1:, None]
        nll["swarm"] -= float(swarm[:-1].gather(1, targets).sum())
        nll["local"] -= float(local[:-1].gather(1, targets).sum())
        kls.append((local.exp() * (local - swarm)).sum(-1))
        agree += int((local.argmax(-1) == swarm.argmax(-1)).sum())
        count += window.shape[1]
    ratio = math.exp((nll["swarm"] - nll["local"]) / (ids.shape[1] - ids.shape[1] // WINDOW))
    assert ratio <= 1.01, f"swarm perplexity is {100 * (ratio - 1):+.2f}% of local float32"
    assert float(torch.cat(kls).mean()) < 0.02, "per-token predictions drifted from float32"
    assert agree / count >= 0.9, f"top-1 agreement {agree / count:.3f}"
    # the requests really were 8-bit: 3 hops x 2 windows, at most 0.27x their float32 size (+ headers)
    float32_bytes = 3 * ids.shape[1] * 576 * 4
    assert b8_client.node.bytes_sent - sent_before <= 0.27 * float32_bytes + 6 * 1024


@torch.inference_mode()
def test_session_decoding_with_kv_cache_tracks_float32(b8_client, smol_local):
    """Prefill then token-by-token steps (the generate path) against int8 servers' KV caches."""
    ids = chat_input_ids(b8_client.tokenizer, "Name three colors of the rainbow.")
    continuation = smol_local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    local = _logprobs(smol_local(continuation).logits[0])
    client = b8_client.client
    with b8_client.inference_session(max_length=continuation.shape[1]) as session:
        prompt = ids.shape[1]
        steps = [session.step(client.embed(ids, torch.arange(prompt)[None]))[:, -1:]]
        for position in range(prompt, continuation.shape[1] - 1):  # teacher-forced: the local tokens
            steps.append(session.step(client.embed(continuation[:, position : position + 1],
                                                   torch.tensor([[position]]))))
        assert session.position == continuation.shape[1] - 1
    swarm = _logprobs(client.head(torch.cat(steps, dim=1))[0])
    expected = local[prompt - 1 : continuation.shape[1] - 1]
    kl = (expected.exp() * (expected - swarm)).sum(-1)
    decoded = continuation.shape[1] - prompt
    assert decoded >= 4 and swarm.shape[0] == decoded
    assert float(kl.mean()) < 0.05, f"mean KL per decoded token {float(kl.mean()):.4f}"
    assert int((expected.argmax(-1) == swarm.argmax(-1)).sum()) >= decoded - 1

    out = b8_client.generate(ids, max_new_tokens=6)
    assert out.shape[1] == ids.shape[1] + 6 and out[0, : ids.shape[1]].tolist() == ids[0].tolist()


def test_concurrent_sessions_group_their_compressed_steps(b8_client):
    """Sessions stepping together send one message per server (client/group.py) whose hidden
    states travel in blockwise8 both ways; every answer is checked for the codec asked for."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [chat_input_ids(b8_client.tokenizer, q) for q in ("Name a river.", "Name a bird.", "Name a tree.")]
    channels = b8_client.step_groups.channels
    before = sum(c.steps for c in channels.values())
    bytes_before = b8_client.node.bytes_sent
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        outs = list(pool.map(lambda ids: b8_client.generate(ids, max_new_tokens=6, eos_token_id=[]), prompts))
    for ids, out in zip(prompts, outs):
        assert out.shape[1] == ids.shape[1] + 6 and out[0, : ids.shape[1]].tolist() == ids[0].tolist()
    grouped = sum(c.steps for c in channels.values()) - before
    assert grouped >= len(prompts) * 5 * len(SPANS) // 2  # most decode steps went grouped
    sent = b8_client.node.bytes_sent - bytes_before
    float32 = sum(ids.shape[1] + 5 for ids in prompts) * len(SPANS) * 576 * 4  # every state sent, in float32
    assert sent < 0.4 * float32, (sent, float32)  # blockwise8 is ~0.27x, with message overhead


def test_status_table_shows_weights_and_wire(int8_swarm, store_home, b8_client):
    assert {(r.quant, r.wire_codec) for r in b8_client.servers()} == {("int8", "blockwise8")}
    cmd = [sys.executable, "-m", "swarmshard.cli", "status", "--home", store_home]
    for addr in int8_swarm.initial_peers:
        cmd += ["--initial-peers", addr]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "int8" in line and "blockwise8" in line]
    assert len(rows) == 3 and "weights" in result.stdout and "wire" in result.stdout


def test_a_client_sending_uncompressed_states_is_not_routed_there(int8_swarm, store_home):
    client = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=int8_swarm.initial_peers, home=store_home, timeout=10
    )
    try:
        with pytest.raises(CodecRefused, match="do not accept wire codec 'none' .their --wire-codec: blockwise8"):
            client.plan_route()
    finally:
        client.close()


@pytest.fixture(scope="module")
def raw(int8_swarm):
    with raw_peer(int8_swarm) as peer:
        yield peer


def test_refused_codecs_and_malformed_payloads_get_named_errors_and_the_server_stays_up(raw):
    open_ = {"kind": "open", "session_id": "codec-session-01", "model_id": "smollm2-135m", "start": 0, "end": 10,
             "max_length": 32}
    step = {"kind": "step", "step": 0, "position": 0}
    x = torch.randn(1, 3, 576, generator=torch.Generator().manual_seed(0)) * 0.1
    good = encode_tensor(x, "blockwise8")
    short = WireTensor(good.buffer[:-1], good.shape, good.dtype, good.codec, good.block_size)
    nan_scales = WireTensor(good.buffer[:-4] + torch.tensor([float("nan")]).numpy().tobytes(),
                            good.shape, good.dtype, good.codec, good.block_size)
    bad_block = WireTensor(good.buffer, good.shape, good.dtype, good.codec, 0)
    replies = raw.exchange([
        Message(meta={**open_, "reply_codec": "none"}),                         # more bytes than allowed
        Message(meta={**open_, "reply_codec": "fp16"}),
        Message(meta={**open_, "reply_codec": "brotli"}),                       # not a codec
        Message(meta=open_),                                                    # valid: replies in blockwise8
        Message(meta=step, tensors=[x]),                                        # plain float32: refused
        Message(meta=step, tensors=[encode_tensor(x, "fp16")]),
        Message(meta=step, tensors=[short]),
        Message(meta=step, tensors=[nan_scales]),
        Message(meta=step, tensors=[bad_block]),
        Message(meta=step, tensors=[encode_tensor(x, "blockwise4")]),           # valid: a smaller codec
    ])
    errors = [r.get("error", "") for r in replies]
    assert "reply codec 'none' not allowed by this server (--wire-codec blockwise8 allows blockwise8, blockwise4)" in errors[0]
    assert "reply codec 'fp16' not allowed" in errors[1]
    assert "malformed OpenSession: reply_codec: Input should be 'none', 'fp16'" in errors[2]
    assert replies[3]["ok"] is True
    assert "tensor codec 'none' not accepted here (accepted: blockwise8, blockwise4)" in errors[4]
    assert "tensor codec 'fp16' not accepted here" in errors[5]
    assert "needs 1836 buffer bytes, got 1835" in errors[6]  # 1728 codes + 27 float32 block scales
    assert "scales must be finite and non-negative" in errors[7]
    assert "needs a block size in 1..65536, got 0" in errors[8]
    assert replies[9]["ok"] is True and replies[9]["shapes"] == [(1, 3, 576)]
    assert replies[9]["codecs"] == ["blockwise8"]  # the server's default, as the open did not ask


def test_cli_refuses_unknown_quant_and_codec_by_name(store_home):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "swarmshard.cli", *args, "--home", store_home],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})

    serve = cli("serve", "--blocks", "0:10", "--new-swarm", "--quant", "nf4")
    assert serve.returncode == 2 and "unknown quantization 'nf4'; known: none, int8" in serve.stderr
    serve = cli("serve", "--blocks", "0:10", "--new-swarm", "--wire-codec", "int4")
    assert serve.returncode == 2 and "unknown wire codec 'int4'; known: none, fp16, blockwise8" in serve.stderr
    generate = cli("generate", "--prompt", "hi", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--wire-codec", "gzip")
    assert generate.returncode == 2 and "unknown wire codec 'gzip'" in generate.stderr
