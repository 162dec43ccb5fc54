"""Each architecture, served by two real server processes, equals the full model in one process."""

from __future__ import annotations

import pytest
import torch

from swarmshard.client.model import DistributedModelForCausalLM
from swarmshard.demo import wait_for_route
from swarmshard.launch import LocalSwarm
from tests.tiny_models import CONFIGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arch_swarm(store, store_home, tiny_model_dirs):
    for path in tiny_model_dirs.values():
        store.resolve(str(path), progress=False)
    swarm = LocalSwarm(str(tiny_model_dirs["tiny-llama"]), [], home=store_home, cache_tokens=1024)
    with swarm:
        swarm.start_servers([(str(path), a, b) for path in tiny_model_dirs.values() for a, b in [(0, 2), (2, 6)]])
        yield swarm


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.inference_mode()
def test_swarm_equals_local(arch_swarm, store, store_home, tiny_model_dirs, name):
    path = str(tiny_model_dirs[name])
    local = store.load_full_model(store.resolve(path, progress=False))
    client = DistributedModelForCausalLM.from_pretrained(path, initial_peers=arch_swarm.initial_peers, home=store_home)
    try:
        wait_for_route(client, timeout=60)
        ids = torch.randint(0, local.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
        error = (client.forward(ids) - local(ids).logits).abs().max().item()
        assert error <= 1e-4, f"{name}: logits differ by {error}"
        out = client.generate(ids, max_new_tokens=12, do_sample=False)
        expected = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  pad_token_id=0)
        assert out.tolist() == expected.tolist()
        assert [(h.start, h.end) for h in client.last_route] == [(0, 2), (2, 6)]
    finally:
        client.close()
