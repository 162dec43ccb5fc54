"""`serve --blocks auto`: turn a server's measured profile and the swarm's DHT announcements into
``core.placement`` inputs, and explain the join and rebalancing decisions it takes (SPEC §1).

Everything here is pure (no network, no clocks): `server/node.py` fetches the records, measures
the speed and memory, and calls these functions.

Units follow ``core.placement``: a record's ``throughput`` is the decode tokens/s of its whole span,
which is exactly the tokens/s it adds to each block of that span (an `Assignment`'s throughput).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from swarmshard.core.routing import block_ranges
from swarmshard.core.placement import (
    Assignment,
    ModelSpec,
    MoveDecision,
    NodeProfile,
    Span,
    choose_span,
    max_span_length,
    should_move,
    span_rates,
    swarm_throughput_per_block,
)
from swarmshard.core.store import Manifest
from swarmshard.transport.schemas import ServerRecord

# Bytes per activation value on the wire, relative to float32 (transport/codecs.py; the blockwise
# codecs carry block scales, and blockwise4 a bitmap and 8-bit codes for its widest features).
WIRE_RATIO = {"none": 1.0, "fp16": 0.5, "blockwise8": 0.27, "blockwise4": 0.15}
# int8 weights (server/quant.py) take ~0.25x of float32 plus outlier columns and scales; 0.3 keeps
# the span's memory estimate on the safe side.
INT8_WEIGHT_RATIO = 0.3
# Bandwidth is not measured: assume 1 Gbit/s, which caps no span of the models we serve (it is
# min(span speed, bandwidth / activation bytes) that counts, see core.placement).
DEFAULT_BANDWIDTH = 125e6


class CannotServe(ValueError):
    """The node's memory cannot hold a single block with its KV-cache reserve; the text says why."""


def model_spec(manifest: Manifest, cache_tokens: int, wire_codec: str = "none") -> ModelSpec:
    """What placement needs to know about a stored model, for a server reserving ``cache_tokens``."""
    if wire_codec not in WIRE_RATIO:
        raise ValueError(f"unknown wire codec {wire_codec!r} (one of {', '.join(WIRE_RATIO)})")
    activation = math.ceil(manifest.hidden_size * 4 * WIRE_RATIO[wire_codec])
    return ModelSpec(
        num_blocks=manifest.n_blocks,
        block_bytes=max(manifest.block_bytes),
        kv_bytes_per_token=manifest.kv_bytes_per_token_per_block,
        activation_bytes=activation,
        cache_tokens=cache_tokens,
    )


def node_profile(
    peer_id: str,
    block_speed: float,
    memory_bytes: int,
    manifest: Manifest,
    quant: str = "none",
    bandwidth: float = DEFAULT_BANDWIDTH,
    rtt: dict[str, float] | None = None,
) -> NodeProfile:
    """This server as ``core.placement`` sees it; int8 weights shrink what one block costs."""
    block_bytes = max(manifest.block_bytes)
    if quant == "int8":
        block_bytes = math.ceil(block_bytes * INT8_WEIGHT_RATIO)
    return NodeProfile(peer_id, block_speed, block_speed, memory_bytes, bandwidth, dict(rtt or {}),
                       block_bytes=block_bytes)


def max_blocks(profile: NodeProfile, spec: ModelSpec) -> int:
    """Blocks that fit, or CannotServe naming the memory, the block size and the KV reserve."""
    n = max_span_length(profile, spec)
    if n < 1:
        block = profile.block_bytes or spec.block_bytes
        per_block = block + spec.kv_bytes_per_token * spec.cache_tokens
        raise CannotServe(
            f"{profile.memory_bytes / 1e9:.3g} GB of memory cannot hold one block: each needs "
            f"{per_block / 1e9:.3g} GB ({block / 1e9:.3g} GB of weights + a KV reserve of {spec.cache_tokens} "
            f"tokens); give more --memory-gb or fewer --cache-tokens"
        )
    return n


def trusted_assignments(records: Sequence[ServerRecord], manifest: Manifest) -> list[Assignment]:
    """Announced spans of exactly this model (same block digests), as placement assignments.

    Records of other models, graph stages, or weights other than ours are left out: a server
    must not move to cover blocks on the strength of servers a client would refuse.
    """
    out = []
    for r in records:
        if r.kind != "span" or r.model_id != manifest.model_id or r.n_blocks != manifest.n_blocks:
            continue
        if not r.start < r.end <= manifest.n_blocks:
            continue
        if r.block_digests != manifest.block_digests[r.start : r.end]:
            continue
        out.append(Assignment(r.peer_id, Span(r.start, r.end), float(r.throughput)))
    return out


def _weakest(per_block: np.ndarray) -> str:
    low = float(per_block.min())
    return block_ranges([int(j) for j in np.flatnonzero(per_block <= low + 1e-9 * max(1.0, abs(low)))])


@dataclass(frozen=True)
class Placement:
    """A join decision and why: the bottleneck before and after, the blocks that were weakest."""

    assignment: Assignment
    max_blocks: int
    bottleneck_before: float
    bottleneck_after: float
    servers_seen: int
    reason: str

    def as_dict(self) -> dict:
        span = self.assignment.span
        return {"start": span.start, "end": span.end, "throughput": round(self.assignment.throughput, 3),
                "max_blocks": self.max_blocks, "bottleneck_before": round(self.bottleneck_before, 3),
                "bottleneck_after": round(self.bottleneck_after, 3), "servers_seen": self.servers_seen,
                "reason": self.reason}


def choose_initial(profile: NodeProfile, records: Sequence[ServerRecord], manifest: Manifest,
                   spec: ModelSpec) -> Placement:
    """Where a joining server goes: ``choose_span`` over the trusted announcements (its own, if any,
    ignored), i.e. the span that most raises the swarm's weakest blocks."""
    fit = max_blocks(profile, spec)
    others = [a for a in trusted_assignments(records, manifest) if a.node_id != profile.node_id]
    before = swarm_throughput_per_block(others, spec.num_blocks)
    chosen = choose_span(profile, others, spec)
    after = swarm_throughput_per_block([*others, chosen], spec.num_blocks)
    span = chosen.span
    reason = (
        f"blocks {span.start}:{span.end} ({span.length} of the {fit} that fit in "
        f"{profile.memory_bytes / 1e9:.3g} GB with a {spec.cache_tokens}-token KV reserve) at "
        f"{chosen.throughput:.1f} tok/s; {len(others)} other server(s) seen, weakest blocks were "
        f"{_weakest(before)} at {float(before.min()):.1f} tok/s; swarm bottleneck "
        f"{float(before.min()):.1f} -> {float(after.min()):.1f} tok/s"
    )
    return Placement(chosen, fit, float(before.min()), float(after.min()), len(others), reason)


def current_assignments(profile: NodeProfile, current: Span, records: Sequence[ServerRecord],
                        manifest: Manifest, spec: ModelSpec) -> list[Assignment]:
    """The swarm with this server at ``current``, at the rate its profile gives for that length
    (so the move check removes exactly what it added, whatever its last announcement said)."""
    rates = span_rates(profile, spec)
    if current.length > rates.size:
        raise CannotServe(f"span {current.start}:{current.end} no longer fits: {rates.size} block(s) do")
    mine = Assignment(profile.node_id, current, float(rates[current.length - 1]))
    others = [a for a in trusted_assignments(records, manifest) if a.node_id != profile.node_id]
    return [*others, mine]


def check_move(profile: NodeProfile, current: Span, records: Sequence[ServerRecord], manifest: Manifest,
               spec: ModelSpec, threshold: float) -> MoveDecision:
    """``should_move`` against the live swarm: move only if no block would lose its last server
    and the bottleneck would grow by more than ``threshold`` x (hysteresis pays the reload)."""
    return should_move(profile, current_assignments(profile, current, records, manifest, spec), spec, threshold)


def describe_move(current: Span, decision: MoveDecision, threshold: float) -> str:
    """One line for the log: what the check found and whether it moves."""
    if not decision.move:
        return (f"stay on {current.start}:{current.end}: swarm bottleneck {decision.current_bottleneck:.1f} tok/s, "
                f"{decision.new_bottleneck:.1f} at the best other span (a move needs > {threshold:g}x and "
                f"another server on each of our blocks)")
    return (f"move {current.start}:{current.end} -> {decision.span.start}:{decision.span.end}: swarm bottleneck "
            f"{decision.current_bottleneck:.1f} -> {decision.new_bottleneck:.1f} tok/s (> {threshold:g}x), "
            f"every block stays served")
