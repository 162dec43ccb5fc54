"""Plan files: rebuilt from the factory they name, and any mismatch refused with a reason."""

from __future__ import annotations

import json

import pytest
import torch

from swarmshard.core.factory import FactoryError, make_example, parse_shape
from swarmshard.core.graph import trace_model
from swarmshard.core.graph_plan import GraphPlan, PlanFileError, PlanMismatch, make_graph_plan, rebuild
from swarmshard.core.slicing import NodeSpec, plan_graph
from swarmshard.core.stages import run_stages

NODES = [NodeSpec(speed=1e9, bandwidth=1e8)] * 3


def _plan(factory: str, k: int = 3, input_shape=None) -> GraphPlan:
    example = make_example(factory, input_shape)
    traced = trace_model(example.model, example.args, example.kwargs)
    return make_graph_plan(example, traced, plan_graph(traced.graph, NODES[:k]))[0]


@pytest.fixture(scope="module")
def unet_doc() -> GraphPlan:
    return _plan("tests.graph_factories:unet")


def test_plan_file_roundtrips_and_a_fresh_process_view_rebuilds_it(unet_doc):
    again = GraphPlan.from_json(unet_doc.to_json())
    assert again == unet_doc
    assert _plan("tests.graph_factories:unet").graph_id == unet_doc.graph_id  # deterministic
    example = make_example("tests.graph_factories:unet")
    rebuilt = rebuild(example, again)
    with torch.no_grad():
        expected = example.model(*example.args)
    assert torch.allclose(run_stages(rebuilt.staged, *example.args), expected, atol=1e-5)
    assert [[v.name for v in s.inputs] for s in again.stages][0] == [again.inputs[0].name]
    assert sum(len(s.ops) for s in again.stages) == again.n_ops


def test_another_graph_is_refused_naming_both_digests(unet_doc):
    other = make_example("tests.graph_factories:moe")
    with pytest.raises(PlanMismatch, match="does not match the graph") as info:
        rebuild(other, unet_doc)
    message = str(info.value)
    assert unet_doc.graph_digest[:12] in message and "tests.graph_factories:moe" in message
    assert "re-run `swarmshard plan" in message


def test_changed_weights_are_refused_only_for_the_stage_holding_them(unet_doc):
    example = make_example("tests.graph_factories:unet")
    holder = next(s.index for s in unet_doc.stages if "mid" in s.ops)
    with torch.no_grad():
        example.model.mid.weight.add_(0.01)
    with pytest.raises(PlanMismatch, match=f"stage {holder}'s weights differ"):
        rebuild(example, unet_doc, stages=[holder])
    others = [s.index for s in unet_doc.stages if s.index != holder]
    rebuild(example, unet_doc, stages=others)  # a server of another stage is unaffected


def test_an_unseeded_factory_cannot_serve_its_own_plan():
    doc = _plan("tests.graph_factories:unseeded", k=2)
    with pytest.raises(PlanMismatch, match="same weights in every process"):
        rebuild(make_example("tests.graph_factories:unseeded"), doc)


def test_edited_or_malformed_plan_files_are_refused(unet_doc, tmp_path):
    data = json.loads(unet_doc.to_json())
    data["stages"][0]["param_digest"] = "0" * 64
    with pytest.raises(PlanFileError, match="edited or corrupted"):
        GraphPlan.from_json(json.dumps(data))
    data = json.loads(unet_doc.to_json())
    data["stages"][0]["ops"] = data["stages"][0]["ops"][:-1]
    with pytest.raises(PlanFileError, match="do not match the plan's order and cuts"):
        GraphPlan.from_json(json.dumps(data))
    with pytest.raises(PlanFileError, match="not a swarmshard graph plan"):
        GraphPlan.from_json('{"format": "something else"}')
    with pytest.raises(PlanFileError, match="cannot read plan"):
        GraphPlan.load(tmp_path / "missing.json")


def test_input_shape_reaches_the_factory_or_replaces_a_single_float_input():
    resized = _plan("swarmshard.examples.graphs:unet", input_shape=(2, 3, 16, 16))
    assert resized.input_shape == [2, 3, 16, 16] and resized.inputs[0].shapes == [[2, 3, 16, 16]]
    plain = make_example("tests.graph_factories:mlp_plain", (5, 8))
    assert plain.args[0].shape == (5, 8) and plain.input_shape == (5, 8)
    with pytest.raises(FactoryError, match="not a single floating-point tensor"):
        make_example("tests.graph_factories:two_inputs", (4, 8))
    assert parse_shape("1,3,32,32") == (1, 3, 32, 32) == parse_shape("1x3x32x32")
    with pytest.raises(FactoryError, match="each >= 1"):
        parse_shape("1,0")


@pytest.mark.parametrize("spec, message", [
    ("no-colon", "MODULE:FUNCTION"),
    ("swarmshard.no_such_module:f", "cannot import"),
    ("swarmshard.examples.graphs:nothing", "no callable 'nothing'"),
    ("tests.graph_factories:not_a_model", "not an nn.Module"),
])
def test_bad_factories_are_named(spec, message):
    with pytest.raises(FactoryError, match=message):
        make_example(spec)
