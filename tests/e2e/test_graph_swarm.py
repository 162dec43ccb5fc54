"""Graph stages served by real server processes: zoo models through the swarm equal the local model.

One swarm serves two plans at once (the U-Net with long skips on 3 stage servers, the dict-in /
dict-out model on 2); every process is stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarmshard.aio import LoopThread
from swarmshard.client.graph import RemoteStagedModel
from swarmshard.core.factory import make_example
from swarmshard.core.slicing import NodeSpec
from swarmshard.graph_demo import max_abs_error
from swarmshard.launch import LocalSwarm
from swarmshard.planning import make_plan
from swarmshard.transport.p2p import SwarmNode
from swarmshard.transport.schemas import FORWARD_RPC, INFERENCE_RPC, Message
from swarmshard.transport.stage_wire import STAGE_LIMITS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLANS = {"unet": 3, "dict_io": 2}  # zoo model -> stages
NODES = NodeSpec(speed=1e6, bandwidth=1e9)  # compute-bound: cuts spread the ops over the stages


@pytest.fixture(scope="module")
def graph_swarm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("graph-swarm")
    plans = {}
    for name, k in PLANS.items():
        factory = f"tests.graph_factories:{name}"
        doc = make_plan(factory, [NODES] * k).doc
        path = workdir / f"{name}.json"
        path.write_text(doc.to_json())
        plans[name] = (factory, path, doc)
    # servers import tests.graph_factories, so they need the repository root on their path
    swarm = LocalSwarm("graphs", [], log_dir=str(workdir), env={"PYTHONPATH": str(ROOT)})
    with swarm:
        specs = [(factory, str(path), i) for factory, path, doc in plans.values() for i in range(doc.n_stages)]
        started = iter(swarm.start_stage_servers(specs))  # all at once: startup overlaps
        servers = {name: [next(started) for _ in range(doc.n_stages)] for name, (_, _, doc) in plans.items()}
        yield swarm, plans, servers
    for node in [*swarm.servers, swarm.bootstrap]:
        assert not node.alive(), f"{node.name} (pid {node.pid}) survived stop"


@pytest.fixture(scope="module")
def clients(graph_swarm):
    swarm, plans, _ = graph_swarm
    made = {name: RemoteStagedModel.from_plan(factory, path, swarm.initial_peers) for name, (factory, path, _) in plans.items()}
    try:
        for client in made.values():
            client.wait_for_route(timeout=60)
        yield made
    finally:
        for client in made.values():
            client.close()


def _local(name: str):
    example = make_example(f"tests.graph_factories:{name}")
    with torch.no_grad():
        return example, example.model(*example.args, **example.kwargs)


def test_unet_with_long_skips_matches_the_local_model(graph_swarm, clients):
    _, _, servers = graph_swarm
    example, expected = _local("unet")
    got = clients["unet"](*example.args)
    assert got.shape == expected.shape and max_abs_error(got, expected) <= 1e-4
    route = clients["unet"].last_route
    assert [(hop.start, hop.end) for hop in route] == [(0, 1), (1, 2), (2, 3)]
    assert [hop.peer_id for hop in route] == [s.peer_id for s in servers["unet"]]


def test_dict_in_dict_out_model_keeps_its_structure(clients):
    example, expected = _local("dict_io")
    got = clients["dict_io"](*example.args, **example.kwargs)
    assert isinstance(got, dict) and list(got) == list(expected)
    assert max_abs_error(got, expected) <= 1e-4
    with pytest.raises(ValueError, match="as in the plan"):
        clients["dict_io"]({"a": torch.randn(7, 6), "b": torch.randn(7, 5)}, scale=0.5)


def test_servers_announce_stage_spans_and_weight_digests(graph_swarm, clients):
    _, plans, servers = graph_swarm
    for name, (_, _, doc) in plans.items():
        records = {r.peer_id: r for r in clients[name].servers()}
        assert set(records) == {s.peer_id for s in servers[name]}  # each plan under its own graph id
        for i, server in enumerate(servers[name]):
            r = records[server.peer_id]
            assert (r.kind, r.model_id, r.start, r.end, r.n_blocks) == ("stage", doc.graph_id, i, i + 1, doc.n_stages)
            assert r.block_digests == [doc.stages[i].param_digest] and r.throughput > 0
        assert all(s.info["model_id"] == doc.graph_id for s in servers[name])


def test_malformed_stage_requests_get_named_errors_and_the_server_stays_up(graph_swarm, clients):
    swarm, plans, servers = graph_swarm
    _, _, doc = plans["unet"]
    last = doc.stages[-1]  # reads several values (skips from earlier stages and the input)
    server = servers["unet"][-1]
    k = doc.n_stages
    good = [torch.zeros(v.shapes[0], dtype=getattr(torch, v.dtypes[0])) for v in last.inputs]
    names = [v.name for v in last.inputs]

    def meta(values, **over):
        return {"kind": "stage_forward", "model_id": doc.graph_id, "start": k - 1, "end": k, "values": values, **over}

    named = [{"name": n} for n in names]
    requests = [
        (Message(meta=meta([{"name": "../x"}])), "values.0.name"),
        (Message(meta=meta(named, model_id="other"), tensors=good), "not 'other'"),
        (Message(meta=meta(named, start=0, end=1), tensors=good), "not 0:1"),
        (Message(meta=meta(named[1:]), tensors=good[1:]), f"missing ['{names[0]}']"),
        (Message(meta=meta([*named, {"name": "extra"}]), tensors=[*good, torch.zeros(1)]), "unexpected ['extra']"),
        (Message(meta=meta(named), tensors=[torch.zeros(1, 2), *good[1:]]), f"'{names[0]}' must be float32 of shape"),
        (Message(meta=meta(named), tensors=[good[0].double(), *good[1:]]), "got float64"),
        (Message(meta=meta(named), tensors=good[:-1]), f"declare {len(good)} tensors"),
        (Message(meta={"kind": "forward", "model_id": doc.graph_id, "start": k - 1, "end": k}, tensors=good[:1]),
         "values: Field required"),
        (Message(meta=meta(named), tensors=good), None),  # valid
    ]
    loop = LoopThread()
    node = loop.run(SwarmNode.create(initial_peers=swarm.initial_peers, client_mode=True, limits=STAGE_LIMITS), 60)
    try:
        async def exchange(rpc: str, messages: list[Message]) -> list[Message]:
            stream = await node.open_stream(server.peer_id, rpc)
            try:
                return [await stream.send(m) for m in messages]
            finally:
                await stream.close()

        replies = loop.run(exchange(FORWARD_RPC, [m for m, _ in requests]), timeout=60)
        session = loop.run(exchange(INFERENCE_RPC, [Message(meta={"kind": "open"})]), timeout=60)
    finally:
        loop.run(node.shutdown(), timeout=20)
        loop.stop()
    for reply, (_, expected) in zip(replies, requests):
        if expected is None:
            assert reply.meta["ok"] is True and [v["name"] for v in reply.meta["values"]] == [v.name for v in last.outputs]
        else:
            assert reply.meta["ok"] is False and expected in reply.meta["error"], (expected, reply.meta)
    assert "stateless graph stage" in session[0].meta["error"]
    assert server.alive()
    example, expected = _local("unet")
    assert max_abs_error(clients["unet"](*example.args), expected) <= 1e-4


def test_a_plan_for_another_graph_is_refused(graph_swarm):
    _, plans, _ = graph_swarm
    _, unet_plan, doc = plans["unet"]
    result = subprocess.run(
        [sys.executable, "-m", "swarmshard.cli", "serve", "--graph", "tests.graph_factories:moe",
         "--plan", str(unet_plan), "--stage", "0", "--new-swarm", "--json-events"],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    error = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "the plan does not match the graph" in error and doc.graph_digest[:12] in error
    assert '"event": "ready"' not in result.stdout


def test_graph_demo_reports_the_error_route_and_timings():
    result = subprocess.run(
        [sys.executable, "-m", "swarmshard.cli", "demo", "--graph", "swarmshard.examples.graphs:moe",
         "--stages", "3", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["max_abs_error"] <= 1e-4 and report["within_1e-4"] is True
    assert [hop["stage"] for hop in report["route"]] == [0, 1, 2]
    assert len({hop["peer"] for hop in report["route"]}) == 3
    assert report["output"] == [2, 8, 16] and len(report["stages"]) == 3
    assert {"startup_s", "swarm_forward_ms", "local_forward_ms"} <= set(report["timings"])
