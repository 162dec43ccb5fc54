"""Client part + server span backends (in process) reproduce the full model, per architecture."""

from __future__ import annotations

import pytest
import torch

from swarmshard.core.layout import ClientPart
from swarmshard.server.shard import BadRequest, SpanBackend
from tests.tiny_models import CONFIGS


@pytest.fixture(scope="module")
def stored(store, tiny_model_dirs):
    return {name: store.resolve(str(path), progress=False) for name, path in tiny_model_dirs.items()}


def _chain(store, manifest, cuts):
    bounds = [0, *cuts, manifest.n_blocks]
    return [SpanBackend(store, manifest, a, b) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.inference_mode()
def test_forward_logits_match_full_model(store, stored, name):
    manifest = stored[name]
    client: ClientPart = store.load_client(manifest)
    full = store.load_full_model(manifest)
    ids = torch.randint(0, full.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(11).unsqueeze(0).expand(2, -1)
    hidden = client.embed(ids, positions)
    for backend in _chain(store, manifest, [2, 5]):
        hidden = backend.forward(hidden, 0, None)
    error = (client.head(hidden) - full(input_ids=ids, use_cache=False).logits).abs().max().item()
    assert error <= 1e-4, f"{name}: max abs logits error {error}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.inference_mode()
def test_greedy_generation_with_kv_cache_is_token_identical(store, stored, name):
    manifest = stored[name]
    client = store.load_client(manifest)
    full = store.load_full_model(manifest)
    prompt = torch.randint(0, full.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = full.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    chain = _chain(store, manifest, [3])
    caches = [b.new_cache() for b in chain]
    feed, position, tokens = prompt, 0, []
    for _ in range(12):
        positions = torch.arange(position, position + feed.shape[1]).unsqueeze(0)
        hidden = client.embed(feed, positions)
        for backend, cache in zip(chain, caches):
            hidden = backend.forward(hidden, position, cache)
        position += feed.shape[1]
        token = client.head(hidden[:, -1:])[:, -1].argmax(-1)
        tokens.append(int(token))
        feed = token.unsqueeze(0)
    assert tokens == expected


def test_span_refuses_bad_input(store, stored):
    manifest = stored["tiny-llama"]
    backend = SpanBackend(store, manifest, 0, 3)
    with pytest.raises(BadRequest, match="shape"):
        backend.check_hidden(torch.zeros(1, 2, 63))
    with pytest.raises(BadRequest, match="batch"):
        backend.check_hidden(torch.zeros(2, 2, 64), batch_size=1)
    with pytest.raises(BadRequest, match="NaN"):
        backend.check_hidden(torch.full((1, 2, 64), float("nan")))
    cache = backend.new_cache()
    backend.forward(torch.zeros(1, 4, 64), 0, cache)
    with pytest.raises(BadRequest, match="position 7"):
        backend.forward(torch.zeros(1, 1, 64), 7, cache)
    with pytest.raises(BadRequest, match="stateless"):
        backend.forward(torch.zeros(1, 1, 64), 3, None)


@torch.inference_mode()
def test_replayed_suffix_replaces_cached_tokens(store, stored):
    """Re-sending positions already cached (a replay) gives the same result as the first time."""
    manifest = stored["tiny-qwen2"]
    backend = SpanBackend(store, manifest, 0, 6)
    cache = backend.new_cache()
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(3))
    first = backend.forward(x, 0, cache)
    again = backend.forward(x[:, 4:], 4, cache)
    assert torch.allclose(first[:, 4:], again, atol=1e-5)
    assert cache.get_seq_length() == 6
