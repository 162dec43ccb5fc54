"""Continuous batching: stacked steps equal single steps (to float noise); grouping rules."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from swarmshard.server.batching import StepBatcher, stacked_decode, stacked_prefill, supports_stacking
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


@torch.inference_mode()
def test_stacked_prefill_splits_caches(backends):
    backend = backends["tiny-llama"]
    prompts = [torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    caches = [backend.new_cache() for _ in prompts]
    outs = stacked_prefill(backend, prompts, caches)
    for prompt, out, cache in zip(prompts, outs, caches):
        fresh = backend.new_cache()
        assert torch.allclose(out, backend.forward(prompt, 0, fresh), atol=1e-5)
        nxt = torch.ones(1, 1, 64)
        assert torch.allclose(backend.forward(nxt, 6, cache), backend.forward(nxt, 6, fresh), atol=1e-5)


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
