"""Real swarms: a bootstrap peer and server processes on 127.0.0.1, stopped by PID afterwards."""

from __future__ import annotations

import pytest

from swarmshard.launch import LocalSwarm


@pytest.fixture(scope="session")
def smol_swarm(smollm2, store_home):
    swarm = LocalSwarm("smollm2-135m", [(0, 10), (10, 20), (20, 30)], home=store_home, cache_tokens=4096)
    with swarm:
        yield swarm
    for node in [*swarm.servers, swarm.bootstrap]:
        assert not node.alive(), f"{node.name} (pid {node.pid}) survived stop"


@pytest.fixture(scope="session")
def smol_client(smol_swarm, store_home):
    from swarmshard.client.model import DistributedModelForCausalLM
    from swarmshard.demo import wait_for_route

    client = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=smol_swarm.initial_peers, home=store_home
    )
    try:
        wait_for_route(client, timeout=60)
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def smol_local(store, smollm2):
    return store.load_full_model(smollm2)
