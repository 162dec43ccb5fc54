"""Heterogeneity-aware placement of contiguous block spans (SPEC §1).

Throughput model (shared by every function here, the simulator and the benchmarks)
--------------------------------------------------------------------------------
A node with per-block decode speed ``s`` (tokens/s it pushes through ONE block at saturation) that
serves a span of ``n`` blocks runs every token through all ``n`` of them, so its span throughput is
``s / n`` tokens/s. Each token also enters and leaves the node as one hidden state, so the network
caps it at ``bandwidth / activation_bytes`` tokens/s. The node therefore adds

    rate(n) = min(s / n, bandwidth / activation_bytes)

tokens/s to *each* block of its span. ``T[j]`` is the sum of the rates of the nodes covering block
``j``; the swarm pipelines tokens no faster than ``min_j T[j]`` (the bottleneck), which is what every
placement here maximises. Memory: a node serving ``n`` blocks holds ``n`` blocks of weights plus a
KV-cache reserve of ``cache_tokens`` tokens for each of them, which bounds ``n`` (``max_span_length``).

Unlike Petals, a node may serve *fewer* blocks than fit: concentrating its speed on a short stretch
of weak blocks can raise the bottleneck more than spreading it thin. Everything here is pure (no
I/O, no clocks); the array-level functions (``best_span``, ``decide_move``) are what the simulator
drives with its incrementally maintained ``T``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "ModelSpec",
    "NodeProfile",
    "Span",
    "Assignment",
    "MoveDecision",
    "Plan",
    "max_span_length",
    "span_rates",
    "span_throughput",
    "swarm_throughput_per_block",
    "bottleneck",
    "best_span",
    "choose_span",
    "decide_move",
    "should_move",
    "upper_bound",
    "plan_swarm",
    "exact_plan",
    "uniform_split",
    "memory_proportional_split",
    "petals_rates",
    "petals_best_start",
    "petals_greedy",
    "petals_should_move",
    "sequential_join",
]

_REL_TOL = 1e-9


@dataclass(frozen=True)
class ModelSpec:
    """What placement needs to know about a model: its depth and the bytes each block costs."""

    num_blocks: int
    block_bytes: int  # weights of one block
    kv_bytes_per_token: int  # KV cache of one token in one block (2 * head_dim * n_kv_heads * dtype)
    activation_bytes: int  # one token's hidden state on the wire (hidden_size * dtype)
    cache_tokens: int = 8192  # KV tokens a server reserves for every block it serves

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError("a model has at least one block")
        if self.block_bytes <= 0 or self.kv_bytes_per_token < 0 or self.activation_bytes <= 0:
            raise ValueError("byte sizes must be positive")
        if self.cache_tokens < 0:
            raise ValueError("cache_tokens must be >= 0")


@dataclass(frozen=True)
class NodeProfile:
    """A server's measured capabilities, as it would announce them.

    ``block_speed`` is decode tokens/s through one block (serving n blocks gives block_speed / n);
    ``prefill_speed`` is prompt tokens/s through one block; ``bandwidth`` is bytes/s (min of up and
    down); ``rtt`` maps other node ids to round-trip seconds. ``block_bytes`` / ``kv_bytes_per_token``
    override the model's sizes for a node that quantises its weights or cache.
    """

    node_id: str
    block_speed: float
    prefill_speed: float
    memory_bytes: int
    bandwidth: float
    rtt: Mapping[str, float] = field(default_factory=dict, compare=False)
    block_bytes: int | None = None
    kv_bytes_per_token: int | None = None

    def __post_init__(self) -> None:
        if self.block_speed <= 0 or self.prefill_speed <= 0 or self.bandwidth <= 0:
            raise ValueError(f"{self.node_id}: speeds and bandwidth must be positive")
        if self.memory_bytes < 0:
            raise ValueError(f"{self.node_id}: memory must be >= 0")


@dataclass(frozen=True, order=True)
class Span:
    """Blocks ``[start, end)`` of a model: the unit of placement (exo's Shard, without the model)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid span [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, (int, np.integer)) and self.start <= block < self.end


@dataclass(frozen=True)
class Assignment:
    """Node ``node_id`` serves ``span`` and adds ``throughput`` tokens/s to each of its blocks."""

    node_id: str
    span: Span
    throughput: float


@dataclass(frozen=True)
class MoveDecision:
    """Outcome of a rebalancing check: where the server should be and what the swarm gains."""

    move: bool
    span: Span  # the span to serve next (the current one when move is False)
    current_bottleneck: float
    new_bottleneck: float  # bottleneck if the server were at the best other span


@dataclass(frozen=True)
class Plan:
    """A placement with its bottleneck and a certified upper bound on any placement's bottleneck."""

    assignments: tuple[Assignment, ...]
    bottleneck: float
    upper_bound: float


# --------------------------------------------------------------------------------------------
# Node model
# --------------------------------------------------------------------------------------------


def max_span_length(profile: NodeProfile, model: ModelSpec) -> int:
    """Most blocks whose weights and KV reserve fit in the node's memory (0: cannot serve)."""
    block = model.block_bytes if profile.block_bytes is None else profile.block_bytes
    kv = model.kv_bytes_per_token if profile.kv_bytes_per_token is None else profile.kv_bytes_per_token
    per_block = block + kv * model.cache_tokens
    return int(min(model.num_blocks, profile.memory_bytes // per_block))


def span_rates(profile: NodeProfile, model: ModelSpec) -> np.ndarray:
    """``rates[n-1]`` = tokens/s the node adds to each block when serving n blocks, n = 1..max."""
    m = max_span_length(profile, model)
    n = np.arange(1, m + 1, dtype=np.float64)
    return np.minimum(profile.block_speed / n, profile.bandwidth / model.activation_bytes)


def span_throughput(profile: NodeProfile, model: ModelSpec, length: int) -> float:
    """Per-block contribution of the node serving ``length`` blocks (0 if it cannot hold them)."""
    rates = span_rates(profile, model)
    if not 1 <= length <= rates.size:
        return 0.0
    return float(rates[length - 1])


def swarm_throughput_per_block(assignments: Sequence[Assignment], num_blocks: int) -> np.ndarray:
    """``T[j]`` for every block, in O(#assignments + L) through a difference array."""
    diff = np.zeros(num_blocks + 1)
    for a in assignments:
        if a.span.end > num_blocks:
            raise ValueError(f"{a.node_id}: span {a.span} exceeds {num_blocks} blocks")
        diff[a.span.start] += a.throughput
        diff[a.span.end] -= a.throughput
    per_block = np.cumsum(diff[:-1])
    # Cancellation can leave -1e-13 where nothing is served; a block served by nobody is exactly 0.
    per_block[_coverage(assignments, num_blocks) == 0] = 0.0
    return per_block


def _coverage(assignments: Sequence[Assignment], num_blocks: int) -> np.ndarray:
    """Servers per block."""
    diff = np.zeros(num_blocks + 1, dtype=np.int64)
    for a in assignments:
        diff[a.span.start] += 1
        diff[a.span.end] -= 1
    return np.cumsum(diff[:-1])


def bottleneck(assignments: Sequence[Assignment], num_blocks: int) -> float:
    """The swarm's throughput: its weakest block's summed throughput."""
    return float(swarm_throughput_per_block(assignments, num_blocks).min())


# --------------------------------------------------------------------------------------------
# Span scoring: every (start, length) candidate in O(L) per length, vectorised
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _windows(num_blocks: int, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All windows as flat arrays (lengths, starts, ends, RMQ level, RMQ right index)."""
    lengths = np.concatenate([np.full(num_blocks - n + 1, n, dtype=np.int64) for n in range(1, max_len + 1)])
    starts = np.concatenate([np.arange(num_blocks - n + 1, dtype=np.int64) for n in range(1, max_len + 1)])
    ends = starts + lengths
    level = np.floor(np.log2(lengths)).astype(np.int64)
    right = ends - (np.int64(1) << level)
    for arr in (lengths, starts, ends, level, right):
        arr.setflags(write=False)
    return lengths, starts, ends, level, right


def _window_index(num_blocks: int, start: int, length: int) -> int:
    """Position of window (start, length) in the flat arrays of ``_windows``."""
    before = (length - 1) * (num_blocks + 1) - (length - 1) * length // 2
    return before + start


def _range_min_table(values: np.ndarray, levels: int) -> np.ndarray:
    """Sparse table: row k holds min(values[i : i + 2**k]) (inf where the range runs off the end)."""
    n = values.size
    table = np.full((levels, n), np.inf)
    table[0] = values
    for k in range(1, levels):
        half, width = 1 << (k - 1), n - (1 << k) + 1
        table[k, :width] = np.minimum(table[k - 1, :width], table[k - 1, half : half + width])
    return table


@dataclass(frozen=True)
class _Scores:
    lengths: np.ndarray
    starts: np.ndarray
    bottleneck: np.ndarray  # min_j T'[j] for each candidate
    at_level: np.ndarray  # blocks of T' at the best candidates' bottleneck level
    potential: np.ndarray  # sum_j f(T'[j]) - f(T[j]), f steep and decreasing
    best: int  # index of the chosen candidate
    tol: float


def _score(per_block: np.ndarray, rates: np.ndarray) -> _Scores:
    """Rank every candidate span by the sorted T' it would produce, lexicographically (max-min).

    Level 1 is the exact new bottleneck, level 2 the exact number of blocks left at that level; the
    rest of the sorted vector is compared through the potential sum_j (mu / T'[j])**4, which is
    Schur-convex and dominated by the smallest entries, i.e. a smooth stand-in for the lexicographic
    order. Remaining ties prefer the longer span (fewer hops), then the leftmost.
    """
    T = np.asarray(per_block, dtype=np.float64)
    L = T.size
    m = min(int(rates.size), L)
    if m == 0:
        raise ValueError("the node cannot hold a single block")
    lengths, starts, ends, level, right = _windows(L, m)
    table = _range_min_table(T, int(level[-1]) + 1)
    inside = np.minimum(table[level, starts], table[level, right])
    prefix = np.concatenate(([np.inf], np.minimum.accumulate(T)))
    suffix = np.concatenate((np.minimum.accumulate(T[::-1])[::-1], [np.inf]))
    r = rates[:m]
    cand_rate = r[lengths - 1]
    new_min = np.minimum(np.minimum(prefix[starts], suffix[ends]), inside + cand_rate)

    scale = max(float(T.max()), float(r.max()))
    tol = _REL_TOL * scale
    best_min = float(new_min.max())
    level_value = best_min + tol

    low = np.concatenate(([0], np.cumsum(T <= level_value)))
    low_in = np.zeros((m, L + 1), dtype=np.int64)
    np.cumsum(T[None, :] + r[:, None] <= level_value, axis=1, out=low_in[:, 1:])
    row = lengths - 1
    at_level = low[starts] + (low[L] - low[ends]) + (low_in[row, ends] - low_in[row, starts])

    mu = best_min if best_min > tol else float(r.max())
    covered = T > tol
    safe = np.where(covered, T, 1.0)
    before = np.where(covered, (mu / safe) ** 4, 0.0)  # uncovered blocks: a constant shift, see below
    delta = (mu / (T[None, :] + r[:, None])) ** 4 - before[None, :]
    pot_cum = np.zeros((m, L + 1))
    np.cumsum(delta, axis=1, out=pot_cum[:, 1:])
    potential = pot_cum[row, ends] - pot_cum[row, starts]
    # Tied candidates cover the same number of uncovered blocks (their level-2 counts agree), so
    # dropping f(0) = inf for those blocks shifts all tied potentials equally and keeps the order.

    tie = new_min >= best_min - tol
    tie &= at_level == at_level[tie].min()
    pmin = float(potential[tie].min())
    tie &= potential <= pmin + _REL_TOL * max(abs(pmin), 1e-300) + 1e-12
    longest = int(lengths[tie].max())
    tie &= lengths == longest
    best = int(np.flatnonzero(tie)[0])  # flat order is by start within a length: leftmost
    return _Scores(lengths, starts, new_min, at_level, potential, best, tol)


def _strictly_better(s: _Scores, i: int, j: int) -> bool:
    """Does candidate i beat candidate j on (bottleneck, blocks at level, potential)?"""
    if s.bottleneck[i] > s.bottleneck[j] + s.tol:
        return True
    if s.bottleneck[i] < s.bottleneck[j] - s.tol:
        return False
    if s.at_level[i] != s.at_level[j]:
        return bool(s.at_level[i] < s.at_level[j])
    gap = s.potential[j] - s.potential[i]
    return bool(gap > 1e-7 * max(abs(s.potential[i]), abs(s.potential[j]), 1e-12))


def best_span(per_block: np.ndarray, rates: np.ndarray) -> Span:
    """The span that most raises the swarm's weakest blocks, given T without this node.

    ``rates[n-1]`` is the node's per-block contribution for a span of n blocks, so the length is
    chosen together with the start. Cost: O(L) per candidate length, i.e. O(L * max_len), in numpy.
    """
    s = _score(per_block, rates)
    start, length = int(s.starts[s.best]), int(s.lengths[s.best])
    return Span(start, start + length)


def choose_span(profile: NodeProfile, assignments: Sequence[Assignment], model: ModelSpec) -> Assignment:
    """Where a server started with ``--blocks auto`` should go, seeing the swarm's announcements.

    An existing announcement by the same node is ignored, so this also answers "where would I go
    if I re-chose now". Raises ValueError if the node cannot hold a single block.
    """
    others = [a for a in assignments if a.node_id != profile.node_id]
    rates = span_rates(profile, model)
    span = best_span(swarm_throughput_per_block(others, model.num_blocks), rates)
    return Assignment(profile.node_id, span, float(rates[span.length - 1]))


# --------------------------------------------------------------------------------------------
# Rebalancing with hysteresis
# --------------------------------------------------------------------------------------------


def decide_move(
    per_block: np.ndarray,
    current: Span,
    rates: np.ndarray,
    threshold: float = 1.15,
    counts: np.ndarray | None = None,
) -> MoveDecision:
    """Should a server now on ``current`` move? ``per_block`` is T *including* this server;
    ``counts`` (servers per block, including this one) makes the coverage test exact.

    It moves only if (a) every block it serves is also served by another server, so the swarm never
    loses a block, not even while the server reloads weights, and (b) the bottleneck at its best
    other span beats the current one by more than ``threshold`` x -- or, while some block is
    unserved, the move serves strictly more blocks. The hysteresis pays for the reload.
    """
    if threshold < 1.0:
        raise ValueError("threshold must be >= 1")
    T = np.asarray(per_block, dtype=np.float64)
    tol = _REL_TOL * max(float(T.max()), float(rates.max()))
    if counts is None:
        counts = (T > tol).astype(np.int64)
        counts[current.start : current.end] = np.where(
            T[current.start : current.end] - rates[current.length - 1] > tol, 2, 1
        )
    counts = np.asarray(counts)
    covered = counts > 0
    current_min = float(T.min()) if covered.all() else 0.0
    if np.any(counts[current.start : current.end] <= 1):
        return MoveDecision(False, current, current_min, current_min)  # sole server of some block
    without = T.copy()
    without[current.start : current.end] -= rates[current.length - 1]
    others = counts.copy()
    others[current.start : current.end] -= 1
    without[others == 0] = 0.0
    target = best_span(without, rates)
    after = without.copy()
    after[target.start : target.end] += rates[target.length - 1]
    served_after = others > 0
    served_after[target.start : target.end] = True
    new_min = float(after.min()) if served_after.all() else 0.0
    if target == current:
        move = False
    elif current_min > 0.0:
        move = new_min > threshold * current_min
    else:
        move = int(served_after.sum()) > int(covered.sum())
    return MoveDecision(move, target if move else current, current_min, new_min)


def should_move(
    profile: NodeProfile, assignments: Sequence[Assignment], model: ModelSpec, threshold: float = 1.15
) -> MoveDecision:
    """Rebalancing check for the server ``profile`` whose current span is among ``assignments``."""
    mine = [a for a in assignments if a.node_id == profile.node_id]
    if len(mine) != 1:
        raise ValueError(f"{profile.node_id} must have exactly one assignment, found {len(mine)}")
    per_block = swarm_throughput_per_block(assignments, model.num_blocks)
    counts = _coverage(assignments, model.num_blocks)
    return decide_move(per_block, mine[0].span, span_rates(profile, model), threshold, counts)


# --------------------------------------------------------------------------------------------
# Centralised planning
# --------------------------------------------------------------------------------------------


def upper_bound(profiles: Sequence[NodeProfile], model: ModelSpec) -> float:
    """A bottleneck no placement of these nodes can exceed.

    Proof. Let node i serve n_i blocks at rate r_i(n_i) (non-increasing in n). Then
    (1) min_j T[j] <= (1/L) sum_j T[j] = (1/L) sum_i n_i r_i(n_i) <= (1/L) sum_i A_i, with
        A_i = max_{n <= m_i} n r_i(n) the most "block-throughput" node i can supply;
    (2) T[j] <= sum_i r_i(n_i) <= sum_i r_i(1) for every j;
    (3) if sum_i m_i < L, some block is served by nobody, so the bottleneck is 0.
    This is also the optimum of the LP relaxation that lets node i spread any y_ij >= 0 over blocks
    with sum_j y_ij <= A_i and y_ij <= r_i(1): that LP is symmetric in the blocks, so averaging an
    optimum over block permutations gives a uniform one, whose value is exactly min of (1) and (2).
    """
    L = model.num_blocks
    area, peak, reach = 0.0, 0.0, 0
    for p in profiles:
        rates = span_rates(p, model)
        if rates.size == 0:
            continue
        area += float((rates * np.arange(1, rates.size + 1)).max())
        peak += float(rates[0])
        reach += rates.size
    if reach < L:
        return 0.0
    return min(area / L, peak)


def _sorted_key(per_block: np.ndarray) -> tuple[float, ...]:
    return tuple(np.sort(per_block).tolist())


def _local_search(
    per_block: np.ndarray,
    spans: list[Span],
    rates: list[np.ndarray],
    rng: np.random.Generator,
    max_passes: int,
    min_pass_gain: float,
) -> bool:
    """Best-response moves, one node at a time, until none strictly improves (in place).

    Every accepted move strictly improves the swarm-wide (bottleneck, blocks at it, potential)
    triple, so the search cannot cycle. It stops after ``max_passes`` passes, or once a pass raises
    the bottleneck by less than ``min_pass_gain`` (relative; 0 = run to a local optimum), which on
    large swarms cuts a long tail of potential-only moves. Returns whether anything moved.
    """
    L = per_block.size
    order = np.arange(len(spans))
    any_move = False
    for _ in range(max_passes):
        moved = False
        before = float(per_block.min())
        rng.shuffle(order)
        for i in order:
            span, r = spans[i], rates[i]
            per_block[span.start : span.end] -= r[span.length - 1]
            s = _score(per_block, r)
            cur = _window_index(L, span.start, span.length)
            if s.best != cur and _strictly_better(s, s.best, cur):
                start, length = int(s.starts[s.best]), int(s.lengths[s.best])
                span = spans[i] = Span(start, start + length)
                moved = True
            per_block[span.start : span.end] += r[span.length - 1]
        any_move |= moved
        if not moved or (min_pass_gain > 0 and float(per_block.min()) <= before * (1 + min_pass_gain)):
            break
    return any_move


def _candidates(num_blocks: int, rates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, per-block contribution matrix K x L) of every span a node may take."""
    lengths, starts, ends, _, _ = _windows(num_blocks, min(rates.size, num_blocks))
    blocks = np.arange(num_blocks)
    inside = (blocks[None, :] >= starts[:, None]) & (blocks[None, :] < ends[:, None])
    return starts, lengths, inside * rates[lengths - 1][:, None]


def _batched_new_min(rows: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """For each row of T (B x L) and each span of a node with ``rates``: the new bottleneck (B x K)."""
    B, L = rows.shape
    lengths, starts, ends, level, right = _windows(L, min(rates.size, L))
    levels = int(level[-1]) + 1
    table = np.full((levels, B, L), np.inf)
    table[0] = rows
    for k in range(1, levels):
        half, width = 1 << (k - 1), L - (1 << k) + 1
        table[k, :, :width] = np.minimum(table[k - 1, :, :width], table[k - 1, :, half : half + width])
    inside = np.minimum(table[level, :, starts], table[level, :, right]).T
    prefix = np.concatenate((np.full((B, 1), np.inf), np.minimum.accumulate(rows, axis=1)), axis=1)
    suffix = np.concatenate((np.minimum.accumulate(rows[:, ::-1], axis=1)[:, ::-1], np.full((B, 1), np.inf)), axis=1)
    outside = np.minimum(prefix[:, starts], suffix[:, ends])
    return np.minimum(outside, inside + rates[lengths - 1][None, :])


def _accept_batch(
    per_block: np.ndarray,
    rows: np.ndarray,
    new_min: np.ndarray,
    last: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[int, int, np.ndarray] | None:
    """Pick the best (row, span of the last node) of a batched joint move if it beats the current
    placement: a strictly higher bottleneck, or the same one with fewer blocks at it."""
    starts, lengths, rates = last
    tol = _REL_TOL * max(float(per_block.max()), 1e-300)
    cur_min = float(per_block.min())
    best = float(new_min.max())
    if best < cur_min - tol:
        return None
    tied = np.argwhere(new_min >= best - tol)[:256]
    trial = rows[tied[:, 0]].copy()
    for row, (_, c) in enumerate(tied):
        trial[row, starts[c] : starts[c] + lengths[c]] += rates[lengths[c] - 1]
    counts = (trial <= best + tol).sum(axis=1)
    pick = int(np.argmin(counts))
    if best <= cur_min + tol and counts[pick] >= int((per_block <= best + tol).sum()):
        return None
    return int(tied[pick][0]), int(tied[pick][1]), trial[pick]


def _joint_search(
    per_block: np.ndarray,
    spans: list[Span],
    rates: list[np.ndarray],
    rng: np.random.Generator,
    group: int,
    budget: int,
) -> bool:
    """Jointly re-place ``group`` (2 or 3) nodes: every combination of spans of all but one of
    them, the last one's best response batched (``_batched_new_min``).

    Single-node moves stall when improving needs nodes to shift together: a fast node shrinking its
    span while a slow one takes the freed tail (pairs), or two nodes swapping places while a third
    shrinks (triples), where each step alone leaves the bottleneck unchanged. ``budget`` caps the
    elements one group may materialise; bigger groups are skipped. Returns whether anything moved.
    """
    L = per_block.size
    cands = [_candidates(L, r) for r in rates]
    groups = list(itertools.combinations(range(len(spans)), group))
    moved = False
    for p in rng.permutation(len(groups)):
        members = sorted(groups[p], key=lambda x: cands[x][0].size)  # batch the smallest, respond with the largest
        *fixed, last = members
        batch = math.prod(cands[i][0].size for i in fixed)
        if batch * (cands[last][0].size + 4 * L) > budget:
            continue
        base = per_block.copy()
        for idx in members:
            sp = spans[idx]
            base[sp.start : sp.end] -= rates[idx][sp.length - 1]
        rows = base[None, :]
        for i in fixed:
            rows = (rows[:, None, :] + cands[i][2][None, :, :]).reshape(-1, L)
        sl, ll, _ = cands[last]
        picked = _accept_batch(per_block, rows, _batched_new_min(rows, rates[last]), (sl, ll, rates[last]))
        if picked is None:
            continue
        row, c, after = picked
        for i in reversed(fixed):  # rows were built with the last fixed node varying fastest
            row, k = divmod(row, cands[i][0].size)
            spans[i] = Span(int(cands[i][0][k]), int(cands[i][0][k] + cands[i][1][k]))
        spans[last] = Span(int(sl[c]), int(sl[c] + ll[c]))
        per_block[:] = after
        moved = True
    return moved


def _tile_layer(rates: list[np.ndarray], num_blocks: int) -> tuple[float, list[int]]:
    """Best single layer: nodes laid end to end over all blocks, maximising the slowest segment.

    Node i can carry ``reach_i(tau) = #{n : rate_i(n) >= tau}`` blocks at rate >= tau, and since
    shortening a span only raises its rate, a layer at level tau exists iff sum_i reach_i >= L. The
    optimal tau is one of the rate values, found by bisection. Lengths are then trimmed to sum to L,
    always shortening the currently slowest segment. Returns (tau, lengths) with 0 for unused nodes.
    """
    values = np.unique(np.concatenate([r[:num_blocks] for r in rates]))
    caps = [r[:num_blocks] for r in rates]

    def reach(tau: float) -> list[int]:
        # rates are non-increasing in n, so the count of entries >= tau is the longest such span
        return [int(np.count_nonzero(c >= tau)) for c in caps]

    if sum(reach(float(values[0]))) < num_blocks:
        return 0.0, [0] * len(rates)
    lo, hi = 0, values.size - 1  # reach(values[lo]) is feasible
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(reach(float(values[mid]))) >= num_blocks:
            lo = mid
        else:
            hi = mid - 1
    lengths = reach(float(values[lo]))
    excess = sum(lengths) - num_blocks
    while excess > 0:
        slowest = min((float(caps[i][n - 1]), i) for i, n in enumerate(lengths) if n > 0)[1]
        lengths[slowest] -= 1
        excess -= 1
    return float(values[lo]), lengths


def _layered(
    rates: list[np.ndarray], num_blocks: int, layers: int, members: Sequence[int] | None = None
) -> list[Span | None]:
    """Split ``members`` (default: all nodes) into ``layers`` groups of similar capacity (largest
    first) and tile each group over the blocks; nodes left unplaced are None (the caller adds them
    on top, where they stack on the weakest blocks)."""
    members = list(range(len(rates))) if members is None else list(members)
    area = {i: float((rates[i] * np.arange(1, rates[i].size + 1)).max()) for i in members}
    groups: list[list[int]] = [[] for _ in range(layers)]
    load = np.zeros(layers)
    for i in sorted(members, key=lambda i: (-area[i], i)):
        k = int(np.argmin(load))
        groups[k].append(i)
        load[k] += area[i]
    spans: list[Span | None] = [None] * len(rates)
    for group in groups:
        if not group:
            continue
        tau, lengths = _tile_layer([rates[i] for i in group], num_blocks)
        if tau <= 0.0:
            continue
        cursor = 0
        for i, n in zip(group, lengths):
            if n > 0:
                spans[i] = Span(cursor, cursor + n)
                cursor += n
    return spans


def _recompute(spans: list[Span], rates: list[np.ndarray], num_blocks: int) -> np.ndarray:
    diff = np.zeros(num_blocks + 1)
    for s, r in zip(spans, rates):
        diff[s.start] += r[s.length - 1]
        diff[s.end] -= r[s.length - 1]
    return np.cumsum(diff[:-1])


def _complete(
    spans: list[Span | None], rates: list[np.ndarray], order: Sequence[int], num_blocks: int
) -> tuple[list[Span], np.ndarray]:
    """Add the unplaced nodes one by one (in ``order``) at their ``best_span``."""
    spans = list(spans)
    fixed = [i for i, sp in enumerate(spans) if sp is not None]
    per_block = _recompute([spans[i] for i in fixed], [rates[i] for i in fixed], num_blocks)  # type: ignore[misc]
    for i in order:
        if spans[i] is None:
            span = spans[i] = best_span(per_block, rates[i])
            per_block[span.start : span.end] += rates[i][span.length - 1]
    return [sp for sp in spans if sp is not None], per_block


def plan_swarm(
    profiles: Sequence[NodeProfile],
    model: ModelSpec,
    *,
    seed: int = 0,
    small_swarm: int = 12,
    multi_start: int = 200,
    restarts: int = 4,
    polish: int = 6,
    max_passes: int = 25,
    min_pass_gain: float = 1e-5,
    joint_budget: int = 1_000_000,
    triple_nodes: int = 8,
) -> Plan:
    """Centralised near-optimal placement: cheap starting placements, the best few polished by
    local search; the lexicographically best sorted T wins.

    Every swarm starts from greedy joins through ``best_span`` (largest capacity first; a random
    order) polished by single-node best-response moves. Up to ``multi_start`` nodes, it also starts
    from joins by memory, by ascending capacity and in ``restarts`` random orders, and from tilings
    (a subset of the nodes laid end to end over all blocks by ``_tile_layer``, the rest stacked on
    the weakest blocks, or the nodes split into a few such layers), and polishes the ``polish``
    best. Up to ``small_swarm`` nodes, where granularity is coarse and single moves stall, the
    polish alternates with joint moves of pairs (and of triples up to ``triple_nodes`` nodes) to a
    local optimum. Nodes that cannot hold a block are left out. Checked against ``exact_plan`` in
    the tests (>= 0.95 x optimum on small instances).
    """
    L = model.num_blocks
    usable = [(p, span_rates(p, model)) for p in profiles]
    usable = [(p, r) for p, r in usable if r.size > 0]
    bound = upper_bound(profiles, model)
    if not usable:
        return Plan((), 0.0, bound)
    rates = [r for _, r in usable]
    rng = np.random.default_rng(seed)
    n = len(rates)
    small = n <= small_swarm
    several = n <= multi_start
    area = np.array([float((r * np.arange(1, r.size + 1)).max()) for r in rates])
    reach = np.array([r.size for r in rates])
    by_capacity = np.lexsort((np.arange(n), -area))
    starts: list[tuple[Sequence[int], list[Span | None]]] = [
        (by_capacity, [None] * n),
        (rng.permutation(n), [None] * n),
    ]
    if several:
        for order in [np.lexsort((-area, -reach)), np.lexsort((np.arange(n), area))]:
            starts.append((order, [None] * n))
        starts += [(rng.permutation(n), [None] * n) for _ in range(restarts)]
        for layers in range(1, min(8, int(reach.sum()) // L) + 1):
            starts.append((by_capacity, _layered(rates, L, layers)))
        for members in _tiling_subsets(reach, L, rng):
            starts.append((by_capacity, _layered(rates, L, 1, members)))
    completed = [_complete(spans, rates, order, L) for order, spans in starts]
    keys = [_sorted_key(per_block) for _, per_block in completed]
    ranked = sorted(range(len(completed)), key=lambda k: keys[k], reverse=True)
    best_spans: list[Span] | None = None
    best_key: tuple[float, ...] | None = None
    for k in ranked[: polish if several else len(ranked)]:
        placed, per_block = completed[k]
        for _ in range(max_passes):
            _local_search(per_block, placed, rates, rng, max_passes, 0.0 if small else min_pass_gain)
            if not small:
                break
            if _joint_search(per_block, placed, rates, rng, 2, joint_budget):
                continue
            if n > triple_nodes or not _joint_search(per_block, placed, rates, rng, 3, joint_budget):
                break
        key = _sorted_key(_recompute(placed, rates, L))
        if best_key is None or key > best_key:
            best_key, best_spans = key, placed
    assert best_spans is not None
    assignments = tuple(Assignment(p.node_id, sp, float(r[sp.length - 1])) for (p, r), sp in zip(usable, best_spans))
    return Plan(assignments, bottleneck(assignments, L), bound)


def _tiling_subsets(reach: np.ndarray, num_blocks: int, rng: np.random.Generator, limit: int = 64) -> list[list[int]]:
    """Subsets of nodes that can tile the model on their own: all of them for up to 6 nodes,
    otherwise ``limit`` random ones (each node kept with probability 1/2)."""
    n = reach.size
    if n <= 6:
        masks = range(1, 1 << n)
    else:
        masks = (int(x) for x in rng.integers(1, 1 << min(n, 62), size=limit))
    out = []
    for mask in masks:
        members = [i for i in range(n) if mask >> (i % 62) & 1]
        if members and int(reach[members].sum()) >= num_blocks:
            out.append(members)
    return out


def exact_plan(profiles: Sequence[NodeProfile], model: ModelSpec, *, time_limit: float = 60.0) -> Plan:
    """The optimal placement, by a MILP over every (node, span) choice; for small instances only.

    Variables z_{i,s} in {0,1} (node i serves span s) and tau; maximise tau subject to
    sum_s z_{i,s} <= 1 and tau <= sum_{(i,s) covering j} rate_i(|s|) z_{i,s} for every block j.
    Raises RuntimeError if HiGHS does not prove optimality within ``time_limit`` seconds.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    L = model.num_blocks
    options: list[tuple[int, int, int, float]] = []  # (profile index, start, length, rate)
    usable = []
    for i, p in enumerate(profiles):
        rates = span_rates(p, model)
        if rates.size:
            usable.append(i)
        for n in range(1, rates.size + 1):
            options.extend((i, a, n, float(rates[n - 1])) for a in range(L - n + 1))
    bound = upper_bound(profiles, model)
    if not options or bound <= 0.0:
        return Plan((), 0.0, 0.0) if not options else _exact_cover_only(profiles, model, bound)
    k = len(options)
    rows, cols, vals = [], [], []
    node_row = {i: r for r, i in enumerate(usable)}
    for col, (i, a, n, rate) in enumerate(options):
        rows.append(node_row[i])
        cols.append(col)
        vals.append(1.0)
        for j in range(a, a + n):
            rows.append(len(usable) + j)
            cols.append(col)
            vals.append(-rate)
    for j in range(L):
        rows.append(len(usable) + j)
        cols.append(k)
        vals.append(1.0)
    a_mat = coo_matrix((vals, (rows, cols)), shape=(len(usable) + L, k + 1)).tocsr()
    lower = np.concatenate((np.zeros(len(usable)), np.full(L, -np.inf)))
    upper = np.concatenate((np.ones(len(usable)), np.zeros(L)))
    cost = np.zeros(k + 1)
    cost[k] = -1.0
    integrality = np.ones(k + 1)
    integrality[k] = 0
    res = milp(
        cost,
        constraints=LinearConstraint(a_mat, lower, upper),
        integrality=integrality,
        bounds=Bounds(np.zeros(k + 1), np.concatenate((np.ones(k), [bound]))),
        options={"time_limit": time_limit, "mip_rel_gap": 1e-7},
    )
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"MILP not solved to optimality: {res.message}")
    chosen = [options[c] for c in np.flatnonzero(res.x[:k] > 0.5)]
    assignments = tuple(
        Assignment(profiles[i].node_id, Span(a, a + n), rate) for i, a, n, rate in chosen
    )
    value = bottleneck(assignments, L)
    return Plan(assignments, value, value)


def _exact_cover_only(profiles: Sequence[NodeProfile], model: ModelSpec, bound: float) -> Plan:
    """When the nodes cannot cover the model the optimum is 0; any placement attains it."""
    return Plan(tuple(uniform_split(profiles, model)), 0.0, bound)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def uniform_split(profiles: Sequence[NodeProfile], model: ModelSpec) -> list[Assignment]:
    """Heterogeneity-blind: nodes are dealt round-robin into ceil(N / L) pipelines, each pipeline
    cuts the L blocks into equal contiguous chunks (one per node), and a node whose chunk does not
    fit in its memory serves only the chunk's first blocks."""
    L = model.num_blocks
    usable = [(p, span_rates(p, model)) for p in profiles]
    usable = [(p, r) for p, r in usable if r.size > 0]
    pipelines = math.ceil(len(usable) / L)
    out = []
    for k in range(pipelines):
        group = usable[k::pipelines]
        cuts = [round(i * L / len(group)) for i in range(len(group) + 1)]
        for (p, r), a, b in zip(group, cuts, cuts[1:]):
            n = min(b - a, r.size)
            out.append(Assignment(p.node_id, Span(a, a + n), float(r[n - 1])))
    return out


def memory_proportional_split(profiles: Sequence[NodeProfile], model: ModelSpec) -> list[Assignment]:
    """exo-style: nodes form rings (pipelines) of similar total memory; inside a ring each node gets
    a contiguous share of the L blocks proportional to its memory (capped by what fits).

    The number of rings is how many full copies of the model the swarm's memory holds; nodes are
    dealt largest-memory first to the ring with the least memory so far. A ring that cannot hold the
    model leaves its tail blocks to other rings.
    """
    L = model.num_blocks
    usable = [(p, span_rates(p, model)) for p in profiles]
    usable = [(p, r) for p, r in usable if r.size > 0]
    if not usable:
        return []
    rings_n = max(1, sum(r.size for _, r in usable) // L)
    rings: list[list[tuple[NodeProfile, np.ndarray]]] = [[] for _ in range(rings_n)]
    load = np.zeros(rings_n)
    for p, r in sorted(usable, key=lambda pr: (-pr[0].memory_bytes, pr[0].node_id)):
        k = int(np.argmin(load))
        rings[k].append((p, r))
        load[k] += p.memory_bytes
    out: list[Assignment] = []
    for ring in rings:
        if not ring:
            continue
        mem = np.array([float(p.memory_bytes) for p, _ in ring])
        caps = np.array([r.size for _, r in ring])
        share = np.minimum(np.floor(L * mem / mem.sum()).astype(np.int64), caps)
        # Largest remainder, respecting caps, until the ring covers L blocks or nobody has room.
        remainder = L * mem / mem.sum() - share
        while share.sum() < L and np.any(share < caps):
            room = np.where(share < caps, remainder, -np.inf)
            k = int(np.argmax(room))
            share[k] += 1
            remainder[k] -= 1.0
        cursor = 0
        for (p, r), n in zip(ring, share):
            n = int(min(n, L - cursor))
            if n <= 0:
                continue
            out.append(Assignment(p.node_id, Span(cursor, cursor + n), float(r[n - 1])))
            cursor += n
    return out


def petals_rates(profile: NodeProfile, model: ModelSpec) -> np.ndarray:
    """The per-block throughput Petals *announces* for n blocks: it divides compute by the mean
    blocks a request uses, (n + 1) / 2, not by n (petals/server/throughput.py)."""
    m = max_span_length(profile, model)
    n = np.arange(1, m + 1, dtype=np.float64)
    return np.minimum(2.0 * profile.block_speed / (n + 1.0), profile.bandwidth / model.activation_bytes)


def petals_best_start(per_block: np.ndarray, length: int) -> int:
    """Petals' rule: the window of ``length`` whose sorted throughputs are lexicographically smallest
    (it covers the weakest blocks); ties go to the leftmost."""
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(per_block, dtype=np.float64), length)
    keys = np.sort(windows, axis=1)
    order = np.lexsort(keys.T[::-1])
    return int(order[0])


def petals_greedy(profiles: Sequence[NodeProfile], model: ModelSpec) -> list[Assignment]:
    """Petals' join: in the given order each node takes as many blocks as fit, at the weakest window
    of the throughputs announced so far (Petals' own estimates). Assignments carry the *true* rate."""
    L = model.num_blocks
    announced = np.zeros(L)
    out = []
    for p in profiles:
        m = max_span_length(p, model)
        if m == 0:
            continue
        start = petals_best_start(announced, m)
        announced[start : start + m] += petals_rates(p, model)[m - 1]
        out.append(Assignment(p.node_id, Span(start, start + m), span_throughput(p, model, m)))
    return out


def petals_should_move(
    starts: np.ndarray,
    lengths: np.ndarray,
    announced: np.ndarray,
    me: int,
    num_blocks: int,
    rng: np.random.Generator,
    balance_quality: float = 0.75,
    max_rounds: int = 20,
) -> int | None:
    """Petals' rebalancing check (``should_choose_other_blocks``) for server ``me``; returns the
    new start if it should move, else None.

    Petals moves ``me`` to its best window, lets every server greedily re-choose (random order)
    until nobody moves, and moves for real only if the swarm's min throughput would grow by more
    than 1 / balance_quality. Spans keep their lengths; throughputs are the announced ones. Costs
    O(rounds * N * L * length) per check, hence ``max_rounds``.
    """
    eps = 1e-3
    starts = np.array(starts, dtype=np.int64)
    per_block = np.zeros(num_blocks)
    diff = np.zeros(num_blocks + 1)
    np.add.at(diff, starts, announced)
    np.add.at(diff, starts + lengths, -announced)
    per_block = np.cumsum(diff[:-1])
    initial = float(per_block.min())
    a, n, tp = int(starts[me]), int(lengths[me]), float(announced[me])
    per_block[a : a + n] -= tp * (1 + eps)
    if initial > eps and per_block.min() <= 0:
        return None  # leaving would disconnect the swarm
    new_start = petals_best_start(per_block, n)
    if new_start == a:
        return None
    per_block[a : a + n] += tp * eps
    starts[me] = new_start
    per_block[new_start : new_start + n] += tp
    for _ in range(max_rounds):
        moved = False
        for k in rng.permutation(starts.size):
            b, m, t = int(starts[k]), int(lengths[k]), float(announced[k])
            per_block[b : b + m] -= t * (1 + eps)
            best = petals_best_start(per_block, m)
            per_block[b : b + m] += t * eps
            if best != b:
                starts[k], moved = best, True
            per_block[int(starts[k]) : int(starts[k]) + m] += t
        if not moved:
            break
    final = float(per_block.min())
    if final < initial or final < eps:
        return None
    return new_start if initial / final < balance_quality - eps else None


def sequential_join(profiles: Sequence[NodeProfile], model: ModelSpec) -> list[Assignment]:
    """Decentralised placement: nodes join in the given order, each calling ``choose_span``."""
    L = model.num_blocks
    per_block = np.zeros(L)
    out = []
    for p in profiles:
        rates = span_rates(p, model)
        if rates.size == 0:
            continue
        span = best_span(per_block, rates)
        per_block[span.start : span.end] += rates[span.length - 1]
        out.append(Assignment(p.node_id, span, float(rates[span.length - 1])))
    return out
