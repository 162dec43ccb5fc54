"""`swarmshard plan`: the table, the plan file, the picture, nodes files and input shapes."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from swarmshard.cli import app
from swarmshard.core.graph_plan import GraphPlan

UNET = "swarmshard.examples.graphs:unet"
runner = CliRunner()


def _plan(*args: str):
    return runner.invoke(app, ["plan", *args], catch_exceptions=False)


def test_table_plan_file_and_svg_picture(tmp_path):
    out, picture = tmp_path / "plan.json", tmp_path / "plan.svg"
    result = _plan("--graph", UNET, "--stages", "3", "--out", str(out), "--picture", str(picture))
    assert result.exit_code == 0, result.output
    for column in ("stage", "ops", "params MB", "GFLOPs", "inputs", "outputs", "boundary MB", "est. ms"):
        assert column in result.output
    assert result.output.count("◀ bottleneck") == 1 and "bottleneck: stage" in result.output
    doc = GraphPlan.load(out)
    assert doc.n_stages == 3 and doc.factory == UNET and doc.graph_id in result.output
    svg = ET.parse(picture).getroot()
    ops = {g.get("data-name"): int(g.get("data-stage")) for g in svg.iter("{http://www.w3.org/2000/svg}g")
           if g.get("class") == "op"}
    assert ops == {op: entry.index for entry in doc.stages for op in entry.ops}
    cuts = [p for p in svg.iter("{http://www.w3.org/2000/svg}path") if p.get("class") == "cut"]
    assert len(cuts) >= doc.n_stages - 1  # at least one value crosses each cut


def test_json_output_is_the_plan_file(tmp_path):
    out = tmp_path / "plan.json"
    result = _plan("--graph", UNET, "--stages", "2", "--json", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert GraphPlan.from_json(result.output) == GraphPlan.load(out)


def test_png_picture(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "plan.png"
    assert _plan("--graph", "swarmshard.examples.graphs:moe", "--stages", "3", "--picture", str(picture)).exit_code == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heterogeneous_nodes_file_gives_the_fast_node_more_work(tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(
        "nodes:\n"
        "  - {name: slow, speed: 1 GFLOPS, bandwidth: 100 GB/s}\n"
        "  - {name: fast, speed: 10 GFLOPS, bandwidth: 800 Gbit/s, memory: 4 GiB}\n"
    )
    result = _plan("--graph", UNET, "--nodes", str(nodes), "--json")
    assert result.exit_code == 0, result.output
    plan = GraphPlan.from_json(result.output).plan
    assert [n["speed"] for n in plan["nodes"]] == [1e9, 1e10]
    assert [n["bandwidth"] for n in plan["nodes"]] == [1e11, 1e11] and plan["nodes"][1]["memory"] == 4 * 2**30
    slow, fast = (c["work"] for c in plan["costs"])
    assert fast > slow


@pytest.mark.parametrize("text, message", [
    ("nodes:\n  - {speed: -1, bandwidth: 1}\n", "nodes.0.speed"),
    ("nodes:\n  - {speed: 1 GHz, bandwidth: 1}\n", "unknown unit 'GHz'"),
    ("nodes:\n  - {speed: 1, bandwidth: 1, colour: red}\n", "nodes.0.colour"),
    ("nodes: [\n", "not valid YAML"),
])
def test_invalid_nodes_files_are_named(tmp_path, text, message):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(text)
    result = _plan("--graph", UNET, "--nodes", str(nodes), "--stages", "2")
    assert result.exit_code == 2 and message in " ".join(result.stderr.split())


def test_nodes_and_stages_must_agree(tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("- {speed: 1e9, bandwidth: 1e8}\n- {speed: 2e9, bandwidth: 1e8}\n")
    result = _plan("--graph", UNET, "--nodes", str(nodes), "--stages", "3")
    assert result.exit_code == 2 and "lists 2 nodes but 3 stages" in result.stderr


def test_input_shape_override_is_recorded(tmp_path):
    result = _plan("--graph", UNET, "--stages", "2", "--input-shape", "2,3,16,16", "--json")
    assert result.exit_code == 0, result.output
    doc = GraphPlan.from_json(result.output)
    assert doc.input_shape == [2, 3, 16, 16] and doc.inputs[0].shapes == [[2, 3, 16, 16]]


@pytest.mark.parametrize("args, message", [
    (["--graph", "not a factory", "--stages", "2"], "MODULE:FUNCTION"),
    (["--graph", UNET, "--stages", "2", "--input-shape", "1,3,30,30"], "divisible by 4"),
    (["--graph", UNET, "--stages", "2", "--picture", "plan.gif"], "must end in .svg or .png"),
    (["--graph", UNET], "give --stages K"),
])
def test_bad_arguments_are_named(args, message):
    result = _plan(*args)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split())
