"""`swarmshard plan --swarm` (span placement with a certified bound) and `swarmshard simulate`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from swarmshard.cli import app

runner = CliRunner()

SWARM = """\
model: {blocks: 12, block_bytes: 100 MB, kv_bytes_per_token: 4 KiB, activation_bytes: 4 KiB}
cache_tokens: 1024
nodes:
  - {name: big, block_speed: 600, memory: 2 GB}
  - {name: small, block_speed: 300, memory: 500 MB, count: 3}
  - {name: crumb, block_speed: 900, memory: 10 MB}
  - {hardware: laptop-16g}
"""


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def swarm_file(tmp_path):
    path = tmp_path / "swarm.yaml"
    path.write_text(SWARM)
    return path


def test_plan_swarm_json_is_a_valid_certified_placement(swarm_file, tmp_path):
    out = tmp_path / "plan.json"
    result = run("plan", "--swarm", str(swarm_file), "--json", "--out", str(out), "--exact")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert json.loads(out.read_text()) == doc
    assert doc["model"]["blocks"] == 12 and doc["model"]["block_bytes"] == 100_000_000 and doc["nodes"] == 6
    assert doc["unused"] == ["crumb"]  # 10 MB holds no 100 MB block
    per_block = [0.0] * 12
    for a in doc["assignments"]:
        for j in range(a["start"], a["end"]):
            per_block[j] += a["throughput"]
    assert per_block == pytest.approx(doc["per_block"])
    assert doc["bottleneck"] == pytest.approx(min(per_block)) and doc["bottleneck"] > 0
    assert doc["bottleneck"] <= doc["optimum"] + 1e-9 <= doc["upper_bound"] + 1e-9
    assert doc["certified_ratio"] == pytest.approx(doc["bottleneck"] / doc["upper_bound"])
    small = [a for a in doc["assignments"] if a["node"].startswith("small-")]
    assert len(small) == 3 and all(a["end"] - a["start"] <= 4 for a in small)  # 500 MB hold 4 blocks + KV


def test_plan_swarm_table_names_nodes_spans_and_the_bound(swarm_file):
    result = run("plan", "--swarm", str(swarm_file))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for column in ("node", "blocks", "fits", "block tok/s", "tok/s per block", "memory GB"):
        assert column in text
    assert "laptop-16g" in text and "small-2" in text
    assert "no placement of these nodes can exceed" in text and "% of the optimum" in text
    assert "not placed (cannot hold one block): crumb" in text


def test_plan_swarm_reports_uncoverable_models(tmp_path):
    path = tmp_path / "swarm.yaml"
    path.write_text("model: {blocks: 10, block_bytes: 1 GB, activation_bytes: 1 KiB}\n"
                    "nodes: [{block_speed: 100, memory: 3 GB}]\n")
    result = run("plan", "--swarm", str(path), "--json")
    doc = json.loads(result.output)
    assert result.exit_code == 0 and doc["bottleneck"] == 0.0 and doc["upper_bound"] == 0.0
    table = run("plan", "--swarm", str(path))
    assert "blocks 3-9 cannot be served" in " ".join(table.output.split())


@pytest.mark.parametrize("text, message", [
    ("nodes: [{block_speed: 1, memory: 1 GB}]\n", "model: Field required"),
    ("model: reference-70b\nnodes: [{block_speed: -1, memory: 1 GB}]\n", "nodes.0.block_speed"),
    ("model: reference-70b\nnodes: [{block_speed: 10, memory: 1 GHz}]\n", "unknown unit 'GHz'"),
    ("model: reference-70b\nnodes: [{memory: 1 GB}]\n", "give block_speed and memory (or a hardware class)"),
    ("model: reference-70b\nnodes: [{hardware: abacus}]\n", "unknown hardware 'abacus'"),
    ("model: reference-70b\nnodes: [{hardware: rtx3060, colour: red}]\n", "nodes.0.colour"),
    ("model: reference-70b\nnodes: [{name: x, hardware: rtx3060}, {name: x, hardware: rtx3090}]\n",
     "node names repeat: x"),
    ("model: no-such-model\nnodes: [{hardware: rtx3060}]\n", "model 'no-such-model'"),
    ("model: [\n", "not valid YAML"),
])
def test_invalid_swarm_files_are_named(tmp_path, text, message):
    path = tmp_path / "swarm.yaml"
    path.write_text(text)
    result = run("plan", "--swarm", str(path))
    assert result.exit_code == 2 and message in " ".join(result.stderr.split())


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --graph"),
    (["--graph", "swarmshard.examples.graphs:unet", "--swarm", "s.yaml"], "give exactly one of --graph"),
    (["--swarm", "s.yaml", "--stages", "3"], "--stages only apply to --graph"),
    (["--graph", "swarmshard.examples.graphs:unet", "--stages", "2", "--exact"], "only apply to --swarm"),
    (["--swarm", "/nonexistent/s.yaml"], "cannot read swarm file"),
])
def test_plan_modes_are_exclusive(args, message):
    result = run("plan", *args)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split())


def test_simulate_prints_a_report_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sim.png"
    result = run("simulate", "--nodes", "12", "--duration", "900", "--seed", "3", "--mean-lifetime", "600",
                 "--plot", str(png))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for metric in ("throughput served", "availability", "latency p50 / p90 / p99", "moves", "joins / leaves / crashes"):
        assert metric in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_json_is_deterministic_and_policies_differ_only_in_placement():
    args = ["simulate", "--nodes", "12", "--duration", "900", "--seed", "3", "--mean-lifetime", "600", "--json"]
    first, again = json.loads(run(*args).output), json.loads(run(*args).output)
    petals = json.loads(run(*args, "--policy", "petals").output)
    drop = {"wall_s"}
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in again.items() if k not in drop}
    assert 0.0 <= first["availability"] <= 1.0 and first["latency_p50_s"] <= first["latency_p99_s"]
    assert first["joins"] + first["leaves"] + first["crashes"] > 0  # churn happened
    assert (petals["joins"], petals["leaves"], petals["crashes"]) == (first["joins"], first["leaves"], first["crashes"])
    assert petals["policy"] == "petals"


@pytest.mark.parametrize("args, message", [
    (["--policy", "random"], "unknown policy 'random'"),
    (["--plot", "out.gif"], "must end in .png"),
    (["--crash-fraction", "2"], "crash-fraction"),
])
def test_simulate_bad_options_are_named(args, message):
    result = run("simulate", "--nodes", "5", "--duration", "60", *args)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split())


@pytest.mark.parametrize("args, message", [
    (["--blocks", "auto", "--memory-gb", "0.0001"], "GB of memory cannot hold one block"),
    (["--blocks", "auto", "--memory-gb", "-1"], "--memory-gb must be positive"),
    (["--blocks", "auto", "--move-threshold", "0.9"], "--move-threshold must be >= 1"),
    (["--blocks", "auto", "--block-speed", "0"], "--block-speed must be positive"),
    (["--blocks", "0:3", "--rebalance-period", "5"], "only a --blocks auto server rebalances"),
    (["--blocks", "autom"], "must look like START:END"),
    (["--blocks", "0:3", "--threads", "0"], "must be at least 1, got 0"),
])
def test_serve_auto_refuses_bad_options_before_joining(store, store_home, tiny_model_dirs, args, message):
    path = str(tiny_model_dirs["tiny-llama"])
    store.resolve(path, progress=False)
    result = run("serve", "--model", path, "--home", store_home, "--new-swarm", "--cache-tokens", "1024", *args)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split())
