"""`swarmshard demo --graph`: plan a model, serve its stages on local processes, compare with local.

Everything the demo starts is stopped by PID before it returns; the report says how far the swarm's
output is from the model run in this process (``max_abs_error``), which servers ran which stage,
and how long things took.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from swarmshard.client.graph import RemoteStagedModel
from swarmshard.core.graph_plan import rebuild
from swarmshard.launch import LocalSwarm
from swarmshard.planning import bottleneck_stage, make_plan, nodes_for


def max_abs_error(got: Any, expected: Any) -> float:
    """Largest absolute difference over the tensor leaves of two outputs of the same structure."""
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(expected)
    if got_spec != want_spec:
        raise ValueError(f"output structures differ: {got_spec} vs {want_spec}")
    worst = 0.0
    for a, b in zip(got_leaves, want_leaves):
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape:
                raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
            if a.numel():
                worst = max(worst, float((a.double() - b.double()).abs().max()))
        elif a != b:
            raise ValueError(f"non-tensor outputs differ: {a!r} vs {b!r}")
    return worst


def describe_output(value: Any) -> Any:
    """A JSON-friendly sketch of an output's structure: shapes in place of tensors."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): describe_output(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [describe_output(v) for v in value]
    return repr(value)


def _median_ms(call: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return round(statistics.median(times) * 1e3, 3)


def run_graph_demo(factory: str, stages: int = 3, input_shape: Sequence[int] | None = None,
                   repeats: int = 3, log_dir: str | None = None,
                   on_event: Callable[[str, dict], None] | None = None) -> dict:
    """Plan ``factory`` into ``stages`` stages, serve them, run the example inputs through the swarm."""
    emit = on_event or (lambda kind, payload: None)
    began = time.perf_counter()
    nodes, names = nodes_for(stages, None)
    result = make_plan(factory, nodes, names, input_shape=input_shape)
    doc, example = result.doc, result.example
    workdir = Path(tempfile.mkdtemp(prefix="swarmshard-graph-demo-"))
    plan_path = workdir / "plan.json"
    plan_path.write_text(doc.to_json())
    emit("plan", {"graph_id": doc.graph_id, "stages": [len(s.ops) for s in doc.stages], "plan": str(plan_path)})

    with torch.no_grad():
        reference = example.model(*example.args, **example.kwargs)
        local_ms = _median_ms(lambda: example.model(*example.args, **example.kwargs), repeats)
    rebuilt = rebuild(example, doc, stages=())

    logs = Path(log_dir) if log_dir else workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with LocalSwarm(factory, [], log_dir=str(logs)) as swarm:
        servers = swarm.start_stage_servers([(factory, str(plan_path), i) for i in range(doc.n_stages)])
        emit("swarm", {"servers": [s.peer_id for s in servers]})
        startup_s = time.perf_counter() - began
        with RemoteStagedModel(rebuilt, swarm.initial_peers) as client:
            client.wait_for_route(timeout=60)
            first_begin = time.perf_counter()
            output = client(*example.args, **example.kwargs)
            first_ms = round((time.perf_counter() - first_begin) * 1e3, 3)
            swarm_ms = _median_ms(lambda: client(*example.args, **example.kwargs), repeats)
            route, hop_seconds = client.last_route, client.last_hop_seconds
    plan = result.plan
    error = max_abs_error(output, reference)
    return {
        "graph": factory,
        "graph_id": doc.graph_id,
        "method": doc.method,
        "n_ops": doc.n_ops,
        "input_shape": doc.input_shape,
        "stages": [
            {"stage": i, "ops": len(entry.ops), "params_mb": round(entry.param_bytes / 1e6, 6),
             "inputs": [v.name for v in entry.inputs], "outputs": [v.name for v in entry.outputs],
             "estimated_ms": round(cost.total * 1e3, 6)}
            for i, (entry, cost) in enumerate(zip(doc.stages, plan.costs))
        ],
        "bottleneck_stage": bottleneck_stage(plan),
        "route": [{"stage": hop.start, "peer": hop.peer_id, "ms": round(s * 1e3, 3)}
                  for hop, s in zip(route, hop_seconds)],
        "output": describe_output(output),
        "max_abs_error": error,
        "within_1e-4": error <= 1e-4,
        "timings": {"startup_s": round(startup_s, 2), "first_forward_ms": first_ms,
                    "swarm_forward_ms": swarm_ms, "local_forward_ms": local_ms, "repeats": repeats},
    }
