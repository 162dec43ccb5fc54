"""A stage backend loads only its stage, checks the plan, and computes what the whole model would."""

from __future__ import annotations

import pytest
import torch

from swarmshard.core.factory import make_example
from swarmshard.core.graph import trace_model
from swarmshard.core.graph_plan import PlanMismatch, make_graph_plan
from swarmshard.core.slicing import NodeSpec, plan_graph
from swarmshard.server.stage import StageBackend
from swarmshard.transport.schemas import Message, StageForward

FACTORY = "tests.graph_factories:dict_io"


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    example = make_example(FACTORY)
    traced = trace_model(example.model, example.args, example.kwargs)
    doc, _ = make_graph_plan(example, traced, plan_graph(traced.graph, [NodeSpec(speed=1e6, bandwidth=1e9)] * 3))
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(doc.to_json())
    return path, doc


def test_stages_hold_only_their_parameters_and_chain_to_the_model_output(plan_path):
    path, doc = plan_path
    backends = [StageBackend.load(FACTORY, str(path), i) for i in range(doc.n_stages)]
    example = make_example(FACTORY)
    model_params = dict(example.model.named_parameters())
    for backend, entry in zip(backends, doc.stages):
        held = dict(backend.stage.module.named_parameters())
        assert backend.param_bytes == entry.param_bytes
        assert sum(p.numel() for p in held.values()) < sum(p.numel() for p in model_params.values())
        record = backend.record("peer", 1.0, [], "v")
        assert (record.kind, record.model_id, record.start, record.end, record.n_blocks) == (
            "stage", doc.graph_id, entry.index, entry.index + 1, doc.n_stages)
        assert record.block_digests == [entry.param_digest]
    # chain the backends by value name, through their wire encoding, like the client does
    batch = example.args[0]
    values: dict = {"arg_0_a": batch["a"], "arg_0_b": batch["b"]}
    for backend, entry in zip(backends, doc.stages):
        names = [v.name for v in entry.inputs]
        reply = backend.reply(backend.forward(backend.inputs(
            _request(doc.graph_id, entry.index, names), [values[n] for n in names])))
        values.update(zip((v.name for v in entry.outputs), reply.tensors))
    with torch.no_grad():
        expected = example.model(*example.args, **example.kwargs)
    sources = dict(zip(("logits", "hidden", "a_sum"), doc.outputs))
    for key, want in expected.items():
        assert torch.allclose(values[sources[key]], want, atol=1e-6), key


def _request(graph_id: str, index: int, names: list[str]) -> StageForward:
    return StageForward(model_id=graph_id, start=index, end=index + 1, values=[{"name": n} for n in names])


def test_a_stage_outside_the_plan_is_refused(plan_path):
    path, doc = plan_path
    with pytest.raises(PlanMismatch, match=f"has {doc.n_stages} stages .* there is no stage 7"):
        StageBackend.load(FACTORY, str(path), 7)


def test_throughput_is_measured_on_the_plans_example_inputs(plan_path):
    path, _ = plan_path
    backend = StageBackend.load(FACTORY, str(path), 0)
    assert backend.measure_throughput(runs=2) > 0
    assert isinstance(backend.reply(backend.forward(backend.example_inputs)), Message)
