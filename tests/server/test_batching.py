"""Continuous batching: stacked steps equal single steps (to float noise); grouping rules."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from swarmshard.server.batching import StepBatcher, prefill_groups, stacked_decode, stacked_prefill, supports_stacking
from swarmshard.server.shard import SpanBackend


@pytest.fixture(scope="module")
def backends(store, tiny_model_dirs):
    out = {}
    for name in ("tiny-llama", "tiny-gpt2", "tiny-mistral"):
        manifest = store.resolve(str(tiny_model_dirs[name]), progress=False)
        out[name] = SpanBackend(store, manifest, 1, 4)
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@torch.inference_mode()
def test_stacked_decode_equals_single_steps(backends, name):
    backend = backends[name]
    gen = torch.Generator().manual_seed(0)
    lengths = [2, 9, 5]
    stacked = [backend.new_cache() for _ in lengths]
    single = [backend.new_cache() for _ in lengths]
    for length, a, b in zip(lengths, stacked, single):
        prompt = torch.randn(1, length, 64, generator=gen)
        backend.forward(prompt, 0, a)
        backend.forward(prompt, 0, b)
    for _ in range(3):
        tokens = [torch.randn(1, 1, 64, generator=gen) for _ in lengths]
        outs = stacked_decode(backend, tokens, stacked)
        for token, out, cache in zip(tokens, outs, single):
            expected = backend.forward(token, cache.get_seq_length(), cache)
            assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert [c.get_seq_length() for c in stacked] == [c.get_seq_length() for c in single] == [5, 12, 8]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("lengths", [(6, 6, 6), (6, 3, 9)])
@torch.inference_mode()
def test_stacked_prefill_splits_caches(backends, name, lengths):
    """Same-length prompts, and prompts of different lengths padded at the end: each session gets
    exactly its own outputs and cache."""
    backend = backends[name]
    prompts = [torch.randn(1, n, 64, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    caches = [backend.new_cache() for _ in prompts]
    outs = stacked_prefill(backend, prompts, caches)
    for prompt, out, cache in zip(prompts, outs, caches):
        n = prompt.shape[1]
        fresh = backend.new_cache()
        assert out.shape == prompt.shape and cache.get_seq_length() == n
        assert torch.allclose(out, backend.forward(prompt, 0, fresh), atol=1e-5)
        nxt = torch.ones(1, 1, 64)
        assert torch.allclose(backend.forward(nxt, n, cache), backend.forward(nxt, n, fresh), atol=1e-5)


def test_prefill_groups_bound_the_padding():
    assert prefill_groups([9, 8, 10, 9]) == [[1, 0, 3, 2]]  # by length, one group
    assert prefill_groups([100, 5, 6]) == [[1, 2], [0]]  # the long prompt is not padded into
    assert prefill_groups([]) == []
    groups = prefill_groups([3, 4, 5, 6, 7, 8, 20, 21])
    for g in groups:
        lengths = [[3, 4, 5, 6, 7, 8, 20, 21][i] for i in g]
        assert max(lengths) * len(lengths) <= 1.5 * sum(lengths)
    assert sorted(i for g in groups for i in g) == list(range(8))


def test_sliding_window_models_are_not_stacked(backends):
    assert supports_stacking(backends["tiny-llama"].config)
    assert not supports_stacking(backends["tiny-mistral"].config)


def test_batcher_stacks_concurrent_decode_and_isolates_errors(backends):
    backend = backends["tiny-llama"]

    async def scenario():
        batcher = StepBatcher(backend, ThreadPoolExecutor(1))
        batcher.start()
        caches = [backend.new_cache() for _ in range(4)]
        await asyncio.gather(*(batcher.submit(torch.randn(1, 3, 64), 0, c) for c in caches))
        after_prefill = batcher.stacked_steps
        outs = await asyncio.gather(
            *(batcher.submit(torch.randn(1, 1, 64), 3, c) for c in caches),
            batcher.submit(torch.randn(1, 1, 64), 9, backend.new_cache()),  # a gap: refused alone
            return_exceptions=True,
        )
        await batcher.stop()
        return batcher, outs, caches, after_prefill

    batcher, outs, caches, after_prefill = asyncio.run(scenario())
    assert all(isinstance(o, torch.Tensor) and o.shape == (1, 1, 64) for o in outs[:4])
    assert "position 9" in str(outs[4])
    assert after_prefill == 4  # four same-length fresh prompts: one stacked prefill
    assert batcher.stacked_steps == 8  # then four decode steps stacked; the refused one ran alone
    assert all(c.get_seq_length() == 4 for c in caches)


def test_batcher_waits_briefly_for_sessions_due_and_never_for_a_lone_one(backends, monkeypatch):
    """Steps of sessions that stepped together last time join one round even when they trickle
    in a few ms apart; a session stepping alone is never held back."""
    backend = backends["tiny-llama"]
    # The tiny model's rounds take ~1 ms, so the share-of-a-round cap would be under the 2 ms
    # trickle; lift it and keep the absolute cap.
    monkeypatch.setattr("swarmshard.server.batching._CONVOY_WAIT_SHARE", 100.0)

    async def scenario():
        batcher = StepBatcher(backend, ThreadPoolExecutor(1))
        batcher.start()
        caches = [backend.new_cache() for _ in range(3)]
        await asyncio.gather(*(batcher.submit(torch.randn(1, 3, 64), 0, c) for c in caches))

        async def late(cache, position, delay):
            await asyncio.sleep(delay)
            return await batcher.submit(torch.randn(1, 1, 64), position, cache)

        rounds = []
        for position in (3, 4, 5, 6):  # in step, then trickling in 2 ms apart
            before = batcher.rounds
            spread = 0.0 if position == 3 else 0.002
            await asyncio.gather(*(late(c, position, i * spread) for i, c in enumerate(caches)))
            rounds.append(batcher.rounds - before)
        lone = backend.new_cache()
        await batcher.submit(torch.randn(1, 3, 64), 0, lone)
        waited = batcher.waited_s
        loop = asyncio.get_running_loop()
        began = loop.time()
        for position in range(3, 6):  # the three others have stopped stepping: nobody is due
            await asyncio.sleep(4 * batcher._step_gap_s + 0.01)
            await batcher.submit(torch.randn(1, 1, 64), position, lone)
        lone_waited = batcher.waited_s - waited
        await batcher.stop()
        return rounds, lone_waited, loop.time() - began

    rounds, lone_waited, _ = asyncio.run(scenario())
    assert rounds[0] == 1 and rounds[-1] == 1, rounds  # once in step, trickling steps share a round
    assert lone_waited == 0.0
