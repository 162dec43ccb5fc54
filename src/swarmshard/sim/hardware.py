"""A realistic mix of volunteer hardware and WAN regions for simulated swarms.

Numbers are for the reference model below (a 70B-class decoder, 8-bit weights): per-block decode
latency ~ block bytes / memory bandwidth, saturated per-block throughput ~ a batch of 8-16
sequences, bandwidths typical of datacentres, home fibre and laptops on Wi-Fi. They only need to be
plausible *relative* to each other: placement quality depends on the spread, not the absolutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from swarmshard.core.placement import ModelSpec, NodeProfile

__all__ = [
    "REFERENCE_MODEL",
    "HardwareClass",
    "HARDWARE_MIX",
    "REGIONS",
    "REGION_RTT_S",
    "NodeTraits",
    "sample_traits",
    "profile_of",
    "sample_profiles",
]

# hidden 8192, 80 layers, 8 KV heads x 128 dims; int8 weights, fp16 KV cache and activations
REFERENCE_MODEL = ModelSpec(
    num_blocks=80,
    block_bytes=875_000_000,
    kv_bytes_per_token=2 * 8 * 128 * 2,
    activation_bytes=8192 * 2,
    cache_tokens=8192,
)


@dataclass(frozen=True)
class HardwareClass:
    """One kind of machine; speeds are medians, jittered per node."""

    name: str
    share: float
    memory_gb: float  # usable for weights + KV cache
    block_speed: float  # decode tokens/s through one block at saturation
    prefill_speed: float  # prompt tokens/s through one block
    block_latency_s: float  # one token through one block at batch 1
    bandwidth_mbit: float  # min(up, down)
    load_bytes_per_s: float  # reading weights from local disk into memory


HARDWARE_MIX: tuple[HardwareClass, ...] = (
    HardwareClass("h100-80g", 0.02, 76, 30000, 200000, 0.0003, 10000, 2.0e9),
    HardwareClass("a100-80g", 0.03, 76, 18000, 120000, 0.00045, 5000, 2.0e9),
    HardwareClass("a100-40g", 0.05, 38, 18000, 120000, 0.00045, 1000, 2.0e9),
    HardwareClass("rtx4090", 0.15, 22, 9000, 60000, 0.0009, 300, 1.0e9),
    HardwareClass("rtx3090", 0.15, 22, 7000, 40000, 0.001, 200, 1.0e9),
    HardwareClass("rtx3060", 0.15, 11, 3000, 15000, 0.0024, 100, 5.0e8),
    HardwareClass("mac-m2-max-64g", 0.08, 48, 2500, 8000, 0.0022, 200, 2.0e9),
    HardwareClass("laptop-16g", 0.17, 10, 1200, 4000, 0.0044, 50, 5.0e8),
    HardwareClass("cpu-server-128g", 0.10, 110, 300, 1000, 0.015, 1000, 5.0e8),
)

REGIONS: tuple[str, ...] = ("us-west", "us-east", "europe", "asia-east", "south-america", "oceania")
_REGION_SHARE = np.array([0.2, 0.25, 0.3, 0.15, 0.05, 0.05])
# round-trip seconds between regions (diagonal: same metro/continent)
REGION_RTT_S = np.array(
    [
        [0.015, 0.070, 0.140, 0.120, 0.180, 0.150],
        [0.070, 0.015, 0.085, 0.190, 0.120, 0.210],
        [0.140, 0.085, 0.020, 0.220, 0.200, 0.280],
        [0.120, 0.190, 0.220, 0.030, 0.300, 0.120],
        [0.180, 0.120, 0.200, 0.300, 0.030, 0.300],
        [0.150, 0.210, 0.280, 0.120, 0.300, 0.020],
    ]
)


@dataclass(frozen=True)
class NodeTraits:
    """Per-node arrays for a population (index = node), as the simulator stores them."""

    hardware: np.ndarray  # index into HARDWARE_MIX
    region: np.ndarray  # index into REGIONS
    block_speed: np.ndarray
    prefill_speed: np.ndarray
    block_latency_s: np.ndarray
    memory_bytes: np.ndarray
    bandwidth: np.ndarray  # bytes/s
    load_bytes_per_s: np.ndarray


def sample_traits(n: int, rng: np.random.Generator, mix: tuple[HardwareClass, ...] = HARDWARE_MIX) -> NodeTraits:
    """Draw ``n`` machines: a class by share, then lognormal jitter (20% speed, 50% bandwidth)."""
    share = np.array([h.share for h in mix], dtype=np.float64)
    hw = rng.choice(len(mix), size=n, p=share / share.sum())
    region = rng.choice(len(REGIONS), size=n, p=_REGION_SHARE)
    speed_jitter = rng.lognormal(0.0, 0.2, size=n)
    bw_jitter = rng.lognormal(0.0, 0.5, size=n)

    def col(attr: str) -> np.ndarray:
        return np.array([getattr(h, attr) for h in mix], dtype=np.float64)[hw]

    return NodeTraits(
        hardware=hw,
        region=region,
        block_speed=col("block_speed") * speed_jitter,
        prefill_speed=col("prefill_speed") * speed_jitter,
        block_latency_s=col("block_latency_s") / speed_jitter,
        memory_bytes=(col("memory_gb") * 1e9).astype(np.int64),
        bandwidth=col("bandwidth_mbit") * 1e6 / 8 * bw_jitter,
        load_bytes_per_s=col("load_bytes_per_s"),
    )


def profile_of(traits: NodeTraits, i: int, node_id: str | None = None) -> NodeProfile:
    """The NodeProfile node ``i`` would announce (RTTs are left to the region matrix)."""
    return NodeProfile(
        node_id=node_id if node_id is not None else f"node-{i}",
        block_speed=float(traits.block_speed[i]),
        prefill_speed=float(traits.prefill_speed[i]),
        memory_bytes=int(traits.memory_bytes[i]),
        bandwidth=float(traits.bandwidth[i]),
    )


def sample_profiles(n: int, seed: int = 0, mix: tuple[HardwareClass, ...] = HARDWARE_MIX) -> list[NodeProfile]:
    """``n`` heterogeneous node profiles drawn from ``mix`` (deterministic for a seed)."""
    traits = sample_traits(n, np.random.default_rng(seed), mix)
    return [profile_of(traits, i) for i in range(n)]
