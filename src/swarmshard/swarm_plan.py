"""`swarmshard plan --swarm swarm.yaml`: centralised span placement for a described swarm (SPEC §1).

The file names the model and the machines; the planner (``core.placement.plan_swarm``) returns
near-optimal spans together with a certified upper bound on what ANY placement of these machines
could reach, so the printed ratio is a guarantee, not an estimate::

    model: smollm2-135m        # a model name or path (read from the model store), "reference-70b",
                               # or numbers: {blocks: 80, block_bytes: 875 MB, kv_bytes_per_token: 4 KiB,
                               #              activation_bytes: 16 KiB}
    cache_tokens: 8192         # KV tokens reserved for every block a node serves
    nodes:
      - {name: desktop, block_speed: 900, memory: 8 GiB, bandwidth: 1 Gbit/s}
      - {hardware: rtx3060, count: 4}   # a class of sim/hardware.py (its median numbers)

``block_speed`` is decode tokens/s through ONE block (what servers announce); a node serving n
blocks adds min(block_speed / n, bandwidth / activation_bytes) tokens/s to each of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rich.table import Table

from swarmshard.core.routing import block_ranges
from swarmshard.core.placement import (
    ModelSpec,
    NodeProfile,
    Plan,
    exact_plan,
    max_span_length,
    plan_swarm,
    swarm_throughput_per_block,
)
from swarmshard.planning import _quantity
from swarmshard.sim.hardware import HARDWARE_MIX, REFERENCE_MODEL

__all__ = ["SwarmFileError", "SwarmFile", "load_swarm", "SwarmPlan", "make_swarm_plan", "swarm_table"]

DEFAULT_BANDWIDTH = 125e6  # 1 Gbit/s when a node does not say
PRESETS = {"reference-70b": REFERENCE_MODEL}
HARDWARE = {h.name: h for h in HARDWARE_MIX}


class SwarmFileError(ValueError):
    """A swarm file that cannot be read, does not validate or names an unknown model; the text says
    which entry and field."""


class ModelNumbers(BaseModel):
    """A model given by its sizes (units allowed: ``875 MB``, ``4 KiB``)."""

    model_config = ConfigDict(extra="forbid")

    blocks: int = Field(ge=1)
    block_bytes: float = Field(gt=0)
    kv_bytes_per_token: float = Field(0, ge=0)
    activation_bytes: float = Field(gt=0)

    @field_validator("block_bytes", "kv_bytes_per_token", "activation_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        return _quantity(v, "memory")


class SwarmNode(BaseModel):
    """One machine, or ``count`` identical ones; ``hardware`` fills in a known class's numbers."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    hardware: str | None = None
    count: int = Field(1, ge=1, le=100_000)
    block_speed: float | None = Field(None, gt=0)
    memory: float | None = Field(None, ge=0)
    bandwidth: float | None = Field(None, gt=0)
    block_bytes: float | None = Field(None, gt=0)  # this node's bytes per block (quantised weights)

    @field_validator("memory", "block_bytes", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return _quantity(v, "memory")

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _bandwidth(cls, v: Any) -> Any:
        return _quantity(v, "bandwidth")

    @field_validator("hardware")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in HARDWARE:
            raise ValueError(f"unknown hardware {v!r} (known: {', '.join(HARDWARE)})")
        return v

    @model_validator(mode="after")
    def _complete(self) -> "SwarmNode":
        if self.hardware is None and (self.block_speed is None or self.memory is None):
            raise ValueError("give block_speed and memory (or a hardware class)")
        return self

    def profiles(self, index: int) -> list[NodeProfile]:
        hw = HARDWARE.get(self.hardware or "")
        speed = self.block_speed if self.block_speed is not None else hw.block_speed  # type: ignore[union-attr]
        memory = self.memory if self.memory is not None else hw.memory_gb * 1e9  # type: ignore[union-attr]
        bandwidth = self.bandwidth or (hw.bandwidth_mbit * 1e6 / 8 if hw else DEFAULT_BANDWIDTH)
        base = self.name or self.hardware or f"node{index}"
        names = [base] if self.count == 1 else [f"{base}-{k}" for k in range(self.count)]
        block = None if self.block_bytes is None else int(self.block_bytes)
        return [NodeProfile(n, float(speed), float(speed), int(memory), float(bandwidth), block_bytes=block)
                for n in names]


class SwarmFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | ModelNumbers
    cache_tokens: int = Field(8192, ge=0)
    nodes: list[SwarmNode] = Field(min_length=1)

    def profiles(self) -> list[NodeProfile]:
        out = [p for i, node in enumerate(self.nodes) for p in node.profiles(i)]
        names = [p.node_id for p in out]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SwarmFileError(f"node names repeat: {', '.join(repeated)} (names must be unique)")
        return out


def load_swarm(path: str | Path) -> SwarmFile:
    """Read and validate a swarm file; errors name the entry and field (``nodes.1.memory``)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SwarmFileError(f"cannot read swarm file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SwarmFileError(f"swarm file {path} is not valid YAML: {exc}") from None
    try:
        return SwarmFile.model_validate(data)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        raise SwarmFileError(f"swarm file {path} is invalid: " + "; ".join(parts)) from None


def resolve_model(swarm: SwarmFile, home: str | None = None) -> tuple[str, ModelSpec]:
    """(model name, ModelSpec): numbers as given, a preset, or a model of the store (converted on
    first use, like ``serve`` does)."""
    m = swarm.model
    if isinstance(m, ModelNumbers):
        spec = ModelSpec(m.blocks, int(m.block_bytes), int(m.kv_bytes_per_token), int(m.activation_bytes),
                         swarm.cache_tokens)
        return f"{m.blocks} blocks of {m.block_bytes / 1e6:.4g} MB", spec
    if m in PRESETS:
        p = PRESETS[m]
        return m, ModelSpec(p.num_blocks, p.block_bytes, p.kv_bytes_per_token, p.activation_bytes, swarm.cache_tokens)
    from swarmshard.core.store import ModelStore
    from swarmshard.server.autoplace import model_spec

    try:
        manifest = ModelStore(home).resolve(m, progress=False)
    except (FileNotFoundError, ValueError) as exc:
        raise SwarmFileError(f"model {m!r}: {exc} (or give a preset: {', '.join(PRESETS)}, or "
                             "{blocks, block_bytes, kv_bytes_per_token, activation_bytes})") from None
    return manifest.model_id, model_spec(manifest, swarm.cache_tokens)


@dataclass
class SwarmPlan:
    model_name: str
    model: ModelSpec
    profiles: list[NodeProfile]
    plan: Plan
    per_block: np.ndarray
    optimum: float | None = None  # from the exact MILP, when asked for

    @property
    def unused(self) -> list[str]:
        placed = {a.node_id for a in self.plan.assignments}
        return [p.node_id for p in self.profiles if p.node_id not in placed]

    @property
    def certified(self) -> float:
        """bottleneck / upper bound: the plan is at least this share of the best possible."""
        return self.plan.bottleneck / self.plan.upper_bound if self.plan.upper_bound > 0 else 1.0

    def to_dict(self) -> dict:
        m = self.model
        out = {
            "model": {"name": self.model_name, "blocks": m.num_blocks, "block_bytes": m.block_bytes,
                      "kv_bytes_per_token": m.kv_bytes_per_token, "activation_bytes": m.activation_bytes,
                      "cache_tokens": m.cache_tokens},
            "nodes": len(self.profiles),
            "bottleneck": self.plan.bottleneck,
            "upper_bound": self.plan.upper_bound,
            "certified_ratio": self.certified,
            "assignments": [{"node": a.node_id, "start": a.span.start, "end": a.span.end,
                             "throughput": a.throughput} for a in self.plan.assignments],
            "per_block": [float(x) for x in self.per_block],
            "unused": self.unused,
        }
        if self.optimum is not None:
            out["optimum"] = self.optimum
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def make_swarm_plan(swarm: SwarmFile, home: str | None = None, seed: int = 0, exact: bool = False,
                    time_limit: float = 60.0) -> SwarmPlan:
    """Plan the swarm; with ``exact``, also solve the MILP (small swarms) to report the optimum."""
    name, spec = resolve_model(swarm, home)
    profiles = swarm.profiles()
    plan = plan_swarm(profiles, spec, seed=seed)
    per_block = swarm_throughput_per_block(plan.assignments, spec.num_blocks)
    optimum = None
    if exact:
        try:
            optimum = exact_plan(profiles, spec, time_limit=time_limit).bottleneck
        except RuntimeError as exc:
            raise SwarmFileError(f"--exact: {exc} (the swarm is too large for the exact solver)") from None
    return SwarmPlan(name, spec, profiles, plan, per_block, optimum)


def swarm_table(result: SwarmPlan) -> tuple[Table, list[str]]:
    """The per-node table and the summary lines under it."""
    m = result.model
    by_id = {p.node_id: p for p in result.profiles}
    table = Table(title=f"{result.model_name}: {m.num_blocks} blocks on {len(result.profiles)} node(s)")
    for column in ("node", "blocks", "n", "fits", "block tok/s", "tok/s per block", "memory GB"):
        table.add_column(column, justify="left" if column in ("node", "blocks") else "right")
    for a in sorted(result.plan.assignments, key=lambda a: (a.span.start, a.span.end, a.node_id)):
        p = by_id[a.node_id]
        table.add_row(a.node_id, f"{a.span.start}:{a.span.end}", str(a.span.length),
                      str(max_span_length(p, m)), f"{p.block_speed:.1f}", f"{a.throughput:.2f}",
                      f"{p.memory_bytes / 1e9:.3g}")
    T = result.per_block
    low = float(T.min())
    weakest = [int(j) for j in np.flatnonzero(T <= low + 1e-9 * max(1.0, abs(low)))]
    lines = [
        f"bottleneck {result.plan.bottleneck:.2f} tok/s (weakest blocks {block_ranges(weakest)}); no placement of these "
        f"nodes can exceed {result.plan.upper_bound:.2f} tok/s, so this plan is >= {100 * result.certified:.1f}% "
        "of the optimum",
    ]
    if result.optimum is not None:
        share = result.plan.bottleneck / result.optimum if result.optimum > 0 else 1.0
        lines.append(f"exact optimum (MILP) {result.optimum:.2f} tok/s: this plan reaches {100 * share:.1f}%")
    if result.unused:
        lines.append(f"not placed (cannot hold one block): {', '.join(result.unused)}")
    uncovered = [j for j in range(m.num_blocks) if T[j] <= 0]
    if uncovered:
        lines.append(f"blocks {block_ranges(uncovered)} cannot be served: the nodes' memory does not cover the model")
    return table, lines
