"""Each architecture, served by two real server processes, equals the full model in one process."""

from __future__ import annotations

import time

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


def test_client_refuses_servers_with_other_weights(arch_swarm, store, store_home, tmp_path_factory, tiny_model_dirs):
    """A server announcing the same model id with different weights is never routed to."""
    from swarmshard.client.model import DigestRefused
    from tests.tiny_models import save_tiny_models

    impostor_root = tmp_path_factory.mktemp("impostor")
    impostor_home = str(tmp_path_factory.mktemp("impostor-home"))
    impostor = save_tiny_models(impostor_root, seed_offset=100, names=["tiny-llama"])["tiny-llama"]
    genuine = str(tiny_model_dirs["tiny-llama"])
    # Same model id ("tiny-llama"), other weights, a faster one-hop span: tempting, but refused.
    arch_swarm.start_server(0, 6, model=str(impostor), extra=["--home", impostor_home])
    local = store.load_full_model(store.resolve(genuine, progress=False))
    client = DistributedModelForCausalLM.from_pretrained(genuine, initial_peers=arch_swarm.initial_peers,
                                                         home=store_home)
    try:
        end = time.monotonic() + 60
        while len(client.servers()) < 3:
            assert time.monotonic() < end, "impostor never announced"
            time.sleep(0.5)
        ids = torch.tensor([[3, 14, 15, 92, 65]])
        out = client.generate(ids, max_new_tokens=6)
        expected = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)
        assert out.tolist() == expected.tolist()
        assert [(h.start, h.end) for h in client.last_route] == [(0, 2), (2, 6)]
        client.banned.update(r.peer_id for r in client.servers() if (r.start, r.end) == (0, 2))
        with pytest.raises(DigestRefused, match="differ from tiny-llama's digests"):
            client.plan_route()
    finally:
        client.close()
