"""MTPP: slice an op graph into k pipeline stages on k heterogeneous nodes.

The design (SPEC section 2): fix a topological order, then choose k-1 cut points in it. Contiguous
slices of a topological order always give an acyclic quotient graph, so every plan here is
executable as a pipeline. The cost of stage i on node i is

    f(S_i) = work(S_i)/speed_i + io(S_i)/bandwidth_i + overflow_i(S_i)

where ``io`` counts each tensor once per stage (produced inside and consumed outside, or produced
outside and consumed inside) and ``overflow`` charges streaming the parameters plus peak
activations that exceed the node's memory. :class:`SegmentCost` answers f for any slice in
O(log n); :func:`slice_optimal` finds the exactly optimal cuts; :func:`brkga_search` searches over
topological orders, since the order itself decides which cuts exist.

Pure: no torch, no clocks, no global randomness (generators are passed in).
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, Union

import numpy as np

if TYPE_CHECKING:
    from swarmshard.core.graph import OpGraph

__all__ = [
    "InfeasiblePlanError",
    "NodeSpec",
    "StageCost",
    "Plan",
    "SegmentCost",
    "SearchResult",
    "topological_order",
    "slice_optimal",
    "slice_uniform",
    "slice_greedy",
    "plan_graph",
    "brkga_search",
    "quotient_is_acyclic",
]

Index = Union[int, np.ndarray]


class InfeasiblePlanError(ValueError):
    """No plan satisfies the constraints; the message names the reason."""


@dataclass(frozen=True)
class NodeSpec:
    """The machine that runs one stage.

    ``speed`` is work units (FLOPs, or seconds-of-reference-work when slicing measured times) per
    second; ``bandwidth`` is bytes/s for boundary tensors; ``memory`` is fast memory in bytes.
    Whatever exceeds ``memory`` is streamed at ``overflow_bandwidth`` (default: ``bandwidth``);
    with ``allow_overflow=False`` memory is a hard limit instead.
    """

    speed: float
    bandwidth: float
    memory: float = math.inf
    allow_overflow: bool = True
    overflow_bandwidth: float | None = None

    def __post_init__(self) -> None:
        if not (self.speed > 0 and self.bandwidth > 0 and self.memory >= 0):
            raise ValueError(f"speed and bandwidth must be > 0 and memory >= 0: {self}")
        if self.overflow_bandwidth is not None and not self.overflow_bandwidth > 0:
            raise ValueError(f"overflow_bandwidth must be > 0: {self}")

    @property
    def stream_bandwidth(self) -> float:
        return self.bandwidth if self.overflow_bandwidth is None else self.overflow_bandwidth

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["memory"] = None if math.isinf(self.memory) else self.memory
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> NodeSpec:
        memory = d.get("memory")
        return cls(
            speed=float(d["speed"]),  # type: ignore[arg-type]
            bandwidth=float(d["bandwidth"]),  # type: ignore[arg-type]
            memory=math.inf if memory is None else float(memory),  # type: ignore[arg-type]
            allow_overflow=bool(d.get("allow_overflow", True)),
            overflow_bandwidth=None if d.get("overflow_bandwidth") is None else float(d["overflow_bandwidth"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class StageCost:
    """Why a stage costs what it does; ``total`` is f(S) (``inf`` if it breaks a hard limit)."""

    work: float
    param_bytes: float
    io_bytes: float
    peak_bytes: float
    compute_time: float
    io_time: float
    overflow_time: float
    total: float


@dataclass(frozen=True)
class Plan:
    """Stage i runs ``order[cuts[i]:cuts[i+1]]`` on ``nodes[i]``."""

    order: tuple[str, ...]
    cuts: tuple[int, ...]
    nodes: tuple[NodeSpec, ...]
    costs: tuple[StageCost, ...]
    bottleneck: float

    @property
    def stages(self) -> tuple[tuple[str, ...], ...]:
        return tuple(self.order[a:b] for a, b in zip(self.cuts, self.cuts[1:]))

    def to_json(self) -> str:
        return json.dumps({
            "order": list(self.order),
            "cuts": list(self.cuts),
            "stages": [list(s) for s in self.stages],
            "nodes": [n.to_dict() for n in self.nodes],
            "costs": [{k: _enc(v) for k, v in asdict(c).items()} for c in self.costs],
            "bottleneck": _enc(self.bottleneck),
        })

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        plan = cls(
            order=tuple(d["order"]),
            cuts=tuple(int(c) for c in d["cuts"]),
            nodes=tuple(NodeSpec.from_dict(n) for n in d["nodes"]),
            costs=tuple(StageCost(**{k: _dec(v) for k, v in c.items()}) for c in d["costs"]),
            bottleneck=_dec(d["bottleneck"]),
        )
        if "stages" in d and [list(s) for s in plan.stages] != d["stages"]:
            raise ValueError("plan JSON is inconsistent: stages do not match order and cuts")
        return plan


def _enc(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def _dec(x: float | str) -> float:
    return math.inf if x == "inf" else float(x)


# --------------------------------------------------------------------------------------------
# orders


def topological_order(graph: OpGraph, priority: Mapping[str, float] | Callable[[str], float] | None = None) -> list[str]:
    """Kahn's algorithm; among ready ops the lowest ``priority`` goes first (then graph order).

    Without a priority this reproduces the graph's own order when that order is topological.
    """
    names = list(graph.nodes)
    index = {name: i for i, name in enumerate(names)}
    if priority is None:
        key: Callable[[str], float] = index.__getitem__
    elif callable(priority):
        key = priority
    else:
        key = priority.__getitem__
    indegree = {name: len(graph.predecessors(name)) for name in names}
    ready = [(key(name), index[name], name) for name in names if indegree[name] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, _, name = heapq.heappop(ready)
        order.append(name)
        for succ in graph.successors(name):
            indegree[succ] -= 1
            if indegree[succ] == 0:
                heapq.heappush(ready, (key(succ), index[succ], succ))
    if len(order) != len(names):
        stuck = sorted(n for n, d in indegree.items() if d > 0)[:5]
        raise ValueError(f"graph has a cycle through {stuck}")
    return order


def quotient_is_acyclic(graph: OpGraph, stages: Sequence[Sequence[str]]) -> bool:
    """Whether the graph of stages (an edge wherever an op feeds another stage) has no cycle.

    A cyclic quotient cannot run as a pipeline: some stage would wait on itself.
    """
    stage_of: dict[str, int] = {}
    for s, members in enumerate(stages):
        for name in members:
            if name in stage_of:
                raise ValueError(f"op {name!r} is in stages {stage_of[name]} and {s}")
            stage_of[name] = s
    missing = set(graph.nodes) - set(stage_of)
    if missing:
        raise ValueError(f"{len(missing)} ops are in no stage, e.g. {sorted(missing)[:3]}")
    succ: list[set[int]] = [set() for _ in stages]
    for name in graph.nodes:
        for src in graph.predecessors(name):
            if stage_of[src] != stage_of[name]:
                succ[stage_of[src]].add(stage_of[name])
    indegree = [0] * len(stages)
    for targets in succ:
        for t in targets:
            indegree[t] += 1
    ready = [s for s, d in enumerate(indegree) if d == 0]
    seen = 0
    while ready:
        s = ready.pop()
        seen += 1
        for t in succ[s]:
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    return seen == len(stages)


# --------------------------------------------------------------------------------------------
# segment costs


class _DominanceSums:
    """Weighted 2-D dominance counts: sum of w over points with x < X and y < Y, in O(log n).

    A wavelet matrix over the points sorted by x, with prefix sums of the weights at each level;
    ``channels`` weight vectors share one traversal.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray, y_max: int):
        order = np.lexsort((y, x))
        self.xs = x[order]
        vals = y[order].astype(np.int64)
        w = weights[:, order].astype(np.float64)
        self.channels = w.shape[0]
        self.bits = max(1, int(y_max + 1).bit_length())
        self.levels: list[tuple[int, np.ndarray, int, np.ndarray]] = []
        for level in range(self.bits - 1, -1, -1):
            bit = (vals >> level) & 1
            zeros = np.concatenate(([0], np.cumsum(1 - bit)))
            perm = np.argsort(bit, kind="stable")
            vals, w = vals[perm], w[:, perm]
            prefix = np.concatenate((np.zeros((self.channels, 1)), np.cumsum(w, axis=1)), axis=1)
            self.levels.append((level, zeros, int(zeros[-1]), prefix))

    def query(self, x_below: np.ndarray, y_below: np.ndarray) -> np.ndarray:
        """Shape (channels, len(queries))."""
        end = np.searchsorted(self.xs, x_below, side="left").astype(np.int64)
        start = np.zeros_like(end)
        acc = np.zeros((self.channels, end.shape[0]))
        yb = y_below.astype(np.int64)
        for level, zeros, n_zeros, prefix in self.levels:
            one = ((yb >> level) & 1).astype(bool)
            zs, ze = zeros[start], zeros[end]
            acc += np.where(one, prefix[:, ze] - prefix[:, zs], 0.0)
            start = np.where(one, n_zeros + start - zs, zs)
            end = np.where(one, n_zeros + end - ze, ze)
        return acc


class SegmentCost:
    """Cost of any contiguous slice ``[i, j)`` of a fixed topological order.

    Every tensor (an op's output or a graph input) is reduced to its sorted *event* positions: its
    producer (-1 for graph inputs), its consumers, and ``n`` if it is a graph output. A tensor is
    boundary I/O for a slice exactly when the slice holds some but not all of its events, i.e.
    ``io = hits - contained``. Both terms decompose into prefix sums plus 2-D dominance counts over
    (gap start, gap end) and (first event, last event) points, so a query costs O(log n) after
    O(n log n) preprocessing. Peak activations are the largest live set in the slice (sparse
    table) minus tensors whose lifetime merely passes over it -- an upper bound on the true peak.
    All queries accept ints or integer arrays.
    """

    def __init__(self, graph: OpGraph, order: Sequence[str], *, work: Literal["flops", "time"] = "flops"):
        n = len(order)
        if n == 0:
            raise ValueError("cannot slice an empty graph")
        pos = {name: i for i, name in enumerate(order)}
        if len(pos) != n or set(pos) != set(graph.nodes):
            raise ValueError("order must list every op of the graph exactly once")
        self.n = n
        self.order = tuple(order)
        self.position = pos

        consumers: dict[str, set[int]] = {name: set() for name in graph.nodes}
        consumers.update({name: set() for name in graph.inputs})
        for name in order:
            p = pos[name]
            for src in graph.nodes[name].inputs:
                if src in pos and pos[src] >= p:
                    raise ValueError(f"order is not topological: {src!r} must precede {name!r}")
                consumers[src].add(p)
        outputs = set(graph.outputs)

        work_arr = np.zeros(n)
        params = np.zeros(n)
        dead = np.zeros(n)
        in_first = np.zeros(n)  # bytes op i reads from before it: io of any slice starting at i
        out_last = np.zeros(n + 1)  # bytes op j-1 sends on: io of any slice ending at j
        firsts: list[int] = []
        lasts: list[int] = []
        weights: list[float] = []
        gap_a: list[int] = []
        gap_b: list[int] = []
        gap_w: list[float] = []

        def add_tensor(producer: int, size: float, cons: set[int], is_output: bool) -> None:
            events = [producer, *sorted(cons)] + ([n] if is_output else [])
            if size <= 0:
                return
            if len(events) < 2:
                if producer >= 0:
                    dead[producer] += size  # allocated, never read
                return
            if producer >= 0:
                out_last[producer + 1] += size
            for c in cons:
                in_first[c] += size
            firsts.append(events[0])
            lasts.append(events[-1])
            weights.append(size)
            for a, b in zip(events, events[1:]):
                gap_a.append(a)
                gap_b.append(b)
                gap_w.append(size)

        for name in order:
            node = graph.nodes[name]
            p = pos[name]
            if work == "time":
                if node.measured_time is None:
                    raise ValueError(f"op {name!r} has no measured_time; profile the graph first")
                work_arr[p] = node.measured_time
            else:
                work_arr[p] = node.flops
            params[p] = node.param_bytes
            add_tensor(p, float(node.output_bytes), consumers[name], name in outputs)
        for name, size in graph.inputs.items():
            add_tensor(-1, float(size), consumers[name], name in outputs)

        first = np.asarray(firsts, dtype=np.int64)
        last = np.asarray(lasts, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        ga = np.asarray(gap_a, dtype=np.int64)
        gb = np.asarray(gap_b, dtype=np.int64)
        gw = np.asarray(gap_w, dtype=np.float64)

        def below(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
            """below[i] = sum of weight where value < i, for i in 0..n (values lie in -1..n)."""
            counts = np.bincount(values + 1, weights=weight, minlength=n + 2)
            return np.cumsum(counts)[: n + 1]

        self._in_first = in_first
        self._out_last = out_last
        self._work = np.concatenate(([0.0], np.cumsum(work_arr)))
        self._params = np.concatenate(([0.0], np.cumsum(params)))
        self._first_below = below(first, w)
        self._last_below = below(last, w)
        self._gap_below = below(ga, gw)
        live = self._first_below[1:] - self._last_below[:-1] + dead
        self._live = live
        self._sparse = [live]
        span = 1
        while 2 * span <= n:
            prev = self._sparse[-1]
            self._sparse.append(np.maximum(prev[:-span], prev[span:]))
            span *= 2
        # points for dominance sums: channel 0 = gaps + spans (io), channel 1 = gaps only (pass-over)
        px = np.concatenate((ga, first))
        py = np.concatenate((gb, last))
        pw = np.stack((np.concatenate((gw, w)), np.concatenate((gw, np.zeros_like(w)))))
        self._points = (px, py, pw)
        self._dom = _DominanceSums(px, py, pw, y_max=n)
        self.max_live = float(live.max())
        self.total_params = float(self._params[-1])
        self.total_work = float(self._work[-1])

    # -- queries ------------------------------------------------------------------------------

    def _check(self, i: Index, j: Index) -> tuple[np.ndarray, np.ndarray, bool]:
        scalar = np.isscalar(i) and np.isscalar(j)
        ia = np.atleast_1d(np.asarray(i, dtype=np.int64))
        ja = np.atleast_1d(np.asarray(j, dtype=np.int64))
        ia, ja = np.broadcast_arrays(ia, ja)
        if ia.size and (ia.min() < 0 or ja.max() > self.n or np.any(ia >= ja)):
            raise IndexError(f"slices must satisfy 0 <= i < j <= {self.n}")
        return ia, ja, scalar

    @staticmethod
    def _out(values: np.ndarray, scalar: bool) -> float | np.ndarray:
        return float(values[0]) if scalar else values

    def work(self, i: Index, j: Index) -> float | np.ndarray:
        ia, ja, s = self._check(i, j)
        return self._out(self._work[ja] - self._work[ia], s)

    def param_bytes(self, i: Index, j: Index) -> float | np.ndarray:
        ia, ja, s = self._check(i, j)
        return self._out(self._params[ja] - self._params[ia], s)

    def _io_pass(self, ia: np.ndarray, ja: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dom = self._dom.query(ia, ja)
        io = self._first_below[ja] - self._last_below[ja] - self._last_below[ia] - self._gap_below[ia] + dom[0]
        passing = self._gap_below[ia] - dom[1]
        return io, passing

    def io_bytes(self, i: Index, j: Index) -> float | np.ndarray:
        """Bytes crossing the slice boundary, each tensor once."""
        ia, ja, s = self._check(i, j)
        return self._out(self._io_pass(ia, ja)[0], s)

    def _max_live(self, ia: np.ndarray, ja: np.ndarray) -> np.ndarray:
        length = ja - ia
        level = np.floor(np.log2(length)).astype(np.int64)
        out = np.empty(ia.shape[0])
        for lv in np.unique(level):
            m = level == lv
            table = self._sparse[lv]
            out[m] = np.maximum(table[ia[m]], table[ja[m] - (1 << int(lv))])
        return out

    def peak_bytes(self, i: Index, j: Index) -> float | np.ndarray:
        """Peak live activation bytes while running the slice (upper bound, see class doc)."""
        ia, ja, s = self._check(i, j)
        return self._out(self._max_live(ia, ja) - self._io_pass(ia, ja)[1], s)

    def stage_costs(self, i: Index, j: Index, node: NodeSpec) -> StageCost | list[StageCost]:
        """Full cost breakdown of slices on ``node``."""
        ia, ja, s = self._check(i, j)
        io, passing = self._io_pass(ia, ja)
        work = self._work[ja] - self._work[ia]
        params = self._params[ja] - self._params[ia]
        peak = self._max_live(ia, ja) - passing
        compute, io_t, over, total = _combine(work, io, params, peak, node)
        costs = [
            StageCost(float(a), float(b), float(c), float(d), float(e), float(f), float(g), float(h))
            for a, b, c, d, e, f, g, h in zip(work, params, io, peak, compute, io_t, over, total)
        ]
        return costs[0] if s else costs

    def cost(self, i: Index, j: Index, node: NodeSpec) -> float | np.ndarray:
        """f(S) of slices on ``node`` (``inf`` where a hard memory limit is broken)."""
        ia, ja, s = self._check(i, j)
        io, passing = self._io_pass(ia, ja)
        work = self._work[ja] - self._work[ia]
        params = self._params[ja] - self._params[ia]
        peak = self._max_live(ia, ja) - passing
        return self._out(_combine(work, io, params, peak, node)[3], s)


def _combine(work: np.ndarray, io: np.ndarray, params: np.ndarray, peak: np.ndarray,
             node: NodeSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(compute, io, overflow, total) times; the single definition of f shared by all solvers."""
    compute = work / node.speed
    io_t = io / node.bandwidth
    excess = params + peak - node.memory
    if node.allow_overflow:
        over = np.maximum(excess, 0.0) / node.stream_bandwidth
        total = compute + io_t + over
    else:
        over = np.zeros_like(compute)
        total = np.where(excess > 0, math.inf, compute + io_t)
    return compute, io_t, over, total


# --------------------------------------------------------------------------------------------
# plans


def _make_plan(cost: SegmentCost, nodes: Sequence[NodeSpec], cuts: Sequence[int]) -> Plan:
    costs = [cost.stage_costs(a, b, node) for a, b, node in zip(cuts, cuts[1:], nodes)]
    return Plan(order=cost.order, cuts=tuple(int(c) for c in cuts), nodes=tuple(nodes),
                costs=tuple(costs), bottleneck=max(c.total for c in costs))  # type: ignore[union-attr]


def _check_k(cost: SegmentCost, nodes: Sequence[NodeSpec]) -> int:
    k = len(nodes)
    if k < 1:
        raise InfeasiblePlanError("need at least one node")
    if k > cost.n:
        raise InfeasiblePlanError(f"{k} stages need at least {k} ops, the graph has {cost.n}")
    return k


def slice_uniform(cost: SegmentCost, nodes: Sequence[NodeSpec]) -> Plan:
    """Baseline: equal op counts per stage, ignoring costs."""
    k = _check_k(cost, nodes)
    cuts = [round(s * cost.n / k) for s in range(k + 1)]
    return _make_plan(cost, nodes, cuts)


def slice_greedy(cost: SegmentCost, nodes: Sequence[NodeSpec]) -> Plan:
    """Baseline: fill stage i until its work reaches its speed-proportional share of the total."""
    k = _check_k(cost, nodes)
    speeds = np.array([node.speed for node in nodes])
    targets = np.cumsum(speeds)[:-1] / speeds.sum() * cost.total_work
    inner = np.searchsorted(cost._work, targets, side="left")
    cuts = [0]
    for s, c in enumerate(inner, start=1):
        cuts.append(int(min(max(c, cuts[-1] + 1), cost.n - (k - s))))
    cuts.append(cost.n)
    return _make_plan(cost, nodes, cuts)


def _infeasible_reason(cost: SegmentCost, nodes: Sequence[NodeSpec]) -> str:
    hard = [s for s, node in enumerate(nodes) if not node.allow_overflow]
    if not hard:
        return f"no plan found for {cost.n} ops on {len(nodes)} nodes (costs overflow to infinity)"
    single = float(np.max(cost._params[1:] - cost._params[:-1] + cost._live))
    room = max(nodes[s].memory for s in hard)
    if single > room:
        return (f"an op needs {single:.0f} bytes of params + activations, more than the largest hard "
                f"memory limit ({room:.0f} bytes) with overflow disallowed")
    if all(not node.allow_overflow for node in nodes) and cost.total_params > sum(n.memory for n in nodes):
        return (f"params ({cost.total_params:.0f} bytes) exceed the nodes' total memory "
                f"({sum(n.memory for n in nodes):.0f} bytes) with overflow disallowed")
    return (f"no split of {cost.n} ops into {len(nodes)} contiguous stages keeps params + peak "
            f"activations within the hard memory limits of nodes {hard} (overflow disallowed)")


class _Windows:
    """Which (stage, start, end) triples can beat a bound ``limit`` -- from monotone lower bounds.

    f_s(i, j) >= work(i, j)/speed + (in_first(i) + out_last(j))/bandwidth: the ops at the two ends
    of a slice always read from before it and write past it. With in_first at its minimum the
    bound is monotone in i, so feasible starts form a suffix [lo, j) found by binary search.
    """

    def __init__(self, cost: SegmentCost, nodes: Sequence[NodeSpec], limit: float):
        self.cost, self.nodes, self.limit = cost, nodes, limit
        n, k = cost.n, len(nodes)
        W, P = cost._work, cost._params
        a_min = float(cost._in_first.min())
        b_min = float(cost._out_last[1:].min())
        self.start_lo = np.zeros((k + 1, n + 1), dtype=np.int64)
        budget = np.zeros(k + 1)  # most work stage s can take within the limit
        for s, node in enumerate(nodes, start=1):
            lo = np.zeros(n + 1, dtype=np.int64)
            if math.isfinite(limit):
                room = limit - (cost._out_last + a_min) / node.bandwidth
                lo = np.where(room >= 0, np.searchsorted(W, W - node.speed * room, side="left"), n + 1)
                budget[s] = node.speed * max(0.0, limit - (a_min + b_min) / node.bandwidth)
            else:
                budget[s] = math.inf
            if node.memory < math.inf:
                slack = limit * node.stream_bandwidth if node.allow_overflow else 0.0
                if math.isfinite(slack):
                    lo = np.maximum(lo, np.searchsorted(P, P - node.memory - slack, side="left"))
            self.start_lo[s] = np.maximum(lo, s - 1)
        ahead = np.concatenate(([0.0], np.cumsum(budget[1:])))
        total = ahead[-1]
        self.j_lo = np.zeros(k + 1, dtype=np.int64)
        self.j_hi = np.zeros(k + 1, dtype=np.int64)
        for s in range(1, k + 1):
            lo, hi = s, n - (k - s)
            if math.isfinite(ahead[s]):
                hi = min(hi, int(np.searchsorted(W, ahead[s] * (1 + 1e-12), side="right")) - 1)
            if math.isfinite(total):
                lo = max(lo, int(np.searchsorted(W, W[n] - (total - ahead[s]) * (1 + 1e-12), side="left")))
            self.j_lo[s], self.j_hi[s] = lo, hi
        self.j_lo[k] = self.j_hi[k] = n


def _greedy_under(cost: SegmentCost, nodes: Sequence[NodeSpec], bound: float, max_len: int) -> list[int] | None:
    """Cuts with every stage cost <= ``bound``, each stage taking the furthest end that fits.

    Not exact (io is not monotone, so a shorter stage can help later ones), but a cheap way to
    find plans close to the optimum, which tightens the DP's pruning bound.
    """
    n, k = cost.n, len(nodes)
    b_min = float(cost._out_last[1:].min())
    cuts = [0]
    for s, node in enumerate(nodes, start=1):
        i = cuts[-1]
        if s == k:
            return cuts + [n] if cost.cost(i, n, node) <= bound else None
        room = node.speed * (bound - (cost._in_first[i] + b_min) / node.bandwidth)
        hi = int(np.searchsorted(cost._work, cost._work[i] + room, side="right")) - 1
        hi = min(hi, n - (k - s), i + max_len)
        if hi <= i:
            return None
        ends = np.arange(i + 1, hi + 1)
        fits = np.nonzero(cost.cost(i, ends, node) <= bound)[0]  # type: ignore[operator]
        if fits.size == 0:
            return None
        cuts.append(int(ends[fits[-1]]))
    return None


def _tighten(cost: SegmentCost, nodes: Sequence[NodeSpec], upper: float, steps: int = 16) -> float:
    """A better upper bound on the optimum: bisect the bottleneck with :func:`_greedy_under`."""
    lo = cost.total_work / sum(node.speed for node in nodes)  # perfectly balanced compute
    hi = upper
    max_len = max(64, 4 * cost.n // len(nodes))
    if not math.isfinite(hi):  # no baseline fits (hard memory limits): search upwards first
        probe = max(lo, 1e-12)
        for _ in range(64):
            cuts = _greedy_under(cost, nodes, probe, cost.n)
            if cuts is not None:
                hi = _make_plan(cost, nodes, cuts).bottleneck
                break
            lo, probe = probe, probe * 4
        else:
            return upper
    for _ in range(steps):
        if hi - lo <= 1e-3 * hi:
            break
        mid = (lo + hi) / 2
        cuts = _greedy_under(cost, nodes, mid, max_len)
        if cuts is None:
            lo = mid
        else:
            hi = min(mid, _make_plan(cost, nodes, cuts).bottleneck)
    return hi


def slice_optimal(cost: SegmentCost, nodes: Sequence[NodeSpec]) -> Plan:
    """Exactly optimal cuts (up to float rounding): minimise max_i f(S_i), stage i on ``nodes[i]``.

    ``io`` is not monotone in the slice (absorbing a consumer removes boundary traffic), so neither
    greedy feasibility checks nor monotone split points are exact. Instead a DP
    ``best[s][j] = min_i max(best[s-1][i], f_s(i, j))`` sweeps j once for all stages, keeping the
    dominance sums of the io formula incrementally (one update per tensor event) and evaluating
    each (s, j) over a window of starts i, vectorised. Pruning keeps exactness: with U the cost of
    a heuristic plan (so U >= OPT), windows hold only slices whose lower bound is <= U. Cost is
    O(k * n * window); windows are ~n/k when compute or end-point I/O dominates, and grow to n
    when I/O of long skip connections dominates.
    """
    k = _check_k(cost, nodes)
    n = cost.n
    upper = min(slice_greedy(cost, nodes).bottleneck, slice_uniform(cost, nodes).bottleneck)
    upper = _tighten(cost, nodes, upper)
    limit = upper * (1 + 1e-9) + 1e-300 if math.isfinite(upper) else math.inf
    win = _Windows(cost, nodes, limit)

    W, P = cost._work, cost._params
    first_below, last_below, gap_below, live = cost._first_below, cost._last_below, cost._gap_below, cost._live
    drop = last_below + gap_below
    mem_active = [cost.total_params + cost.max_live > node.memory for node in nodes]

    best = np.full((k + 1, n + 1), math.inf)
    arg = np.full((k + 1, n + 1), -1, dtype=np.int64)
    best[0, 0] = 0.0
    first_finite = [n + 1] * (k + 1)
    first_finite[0] = 0

    # f_s(i, j) = u_s(i) + v_s(j) + dom(i, j)/bandwidth_s when no memory term applies, where dom is
    # the dominance sum below; u and v are precomputed so each (s, j) costs a few vector ops.
    c_end = first_below - last_below
    u = [-W / node.speed - drop / node.bandwidth for node in nodes]
    v = [W / node.speed + c_end / node.bandwidth for node in nodes]

    # Dominance sums restricted to points with y < j, as difference arrays over x' = x + 1, plus
    # the running sum of diff[:, :base] for the window start of the current j (base = start + 1).
    px, py, pw = cost._points
    by_y = np.argsort(py, kind="stable")
    px_s, pw_s = px[by_y] + 1, pw[:, by_y]
    batch = np.searchsorted(py[by_y], np.arange(n + 1), side="left")  # points with y < j: [:batch[j]]
    diff = np.zeros((2, n + 2))
    base = 0
    running = np.zeros(2)
    active: list[tuple[int, int]] = []

    for j in range(1, n + 1):
        a, b = batch[j - 1], batch[j]
        if b > a:
            np.add.at(diff.T, px_s[a:b], pw_s[:, a:b].T)
            running += pw_s[:, a:b][:, px_s[a:b] < base].sum(axis=1)
        active.clear()
        for s in range(1, k + 1):
            if win.j_lo[s] <= j <= win.j_hi[s] and first_finite[s - 1] < j:
                lo = max(int(win.start_lo[s, j]), first_finite[s - 1])
                if lo < j:
                    active.append((s, lo))
        if not active:
            continue
        start = min(lo for _, lo in active)
        if start + 1 > base:
            running += diff[:, base: start + 1].sum(axis=1)
        elif start + 1 < base:
            running -= diff[:, start + 1: base].sum(axis=1)
        base = start + 1
        # dom[c][i - start] = sum of channel-c weights of points with x < i (x' <= i) and y < j
        channels = 2 if any(mem_active[s - 1] for s, _ in active) else 1
        dom = np.empty((channels, j - start))
        dom[:, 0] = running[:channels]
        np.cumsum(diff[:channels, start + 1: j], axis=1, out=dom[:, 1:])
        dom[:, 1:] += running[:channels, None]
        for s, lo in active:
            node = nodes[s - 1]
            seg = dom[:, lo - start:]
            if mem_active[s - 1]:
                io = c_end[j] + seg[0] - drop[lo:j]
                params = P[j] - P[lo:j]
                peak = np.maximum.accumulate(live[lo:j][::-1])[::-1] - (gap_below[lo:j] - seg[1])
                total = _combine(W[j] - W[lo:j], io, params, peak, node)[3]
            else:
                total = seg[0] / node.bandwidth
                total += u[s - 1][lo:j]
                total += v[s - 1][j]
            cand = np.maximum(best[s - 1, lo:j], total)
            idx = int(np.argmin(cand))
            if cand[idx] <= limit and math.isfinite(cand[idx]):
                best[s, j] = cand[idx]
                arg[s, j] = lo + idx
                if first_finite[s] > n:
                    first_finite[s] = j

    if not math.isfinite(best[k, n]):
        raise InfeasiblePlanError(_infeasible_reason(cost, nodes))
    cuts = [n]
    for s in range(k, 0, -1):
        cuts.append(int(arg[s, cuts[-1]]))
    return _make_plan(cost, nodes, cuts[::-1])


def plan_graph(graph: OpGraph, nodes: Sequence[NodeSpec], order: Sequence[str] | None = None,
               *, work: Literal["flops", "time"] = "flops") -> Plan:
    """Optimal cuts of ``order`` (Kahn's order by default) for ``nodes``."""
    cost = SegmentCost(graph, order if order is not None else topological_order(graph), work=work)
    return slice_optimal(cost, nodes)


# --------------------------------------------------------------------------------------------
# order search


@dataclass(frozen=True)
class SearchResult:
    """The best plan found, Kahn's-order plan it started from, and how many orders were scored."""

    plan: Plan
    baseline: Plan
    evaluations: int
    generations: int

    @property
    def gain(self) -> float:
        """Relative bottleneck reduction over Kahn's order (0 = no better)."""
        return 1.0 - self.plan.bottleneck / self.baseline.bottleneck if self.baseline.bottleneck > 0 else 0.0


def _numpy_rng(rng: random.Random | np.random.Generator) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng.getrandbits(128))


def brkga_search(graph: OpGraph, nodes: Sequence[NodeSpec], rng: random.Random | np.random.Generator, *,
                 population: int = 24, generations: int = 30, elite_fraction: float = 0.2,
                 mutant_fraction: float = 0.15, inherit_prob: float = 0.7, patience: int | None = 10,
                 work: Literal["flops", "time"] = "flops") -> SearchResult:
    """Biased random-key GA over topological orders; fitness = optimal bottleneck of the order.

    Each chromosome holds one key per op; decoding runs Kahn's algorithm with the keys breaking
    ties, so every chromosome is a valid topological order. The chromosome ``i/n`` decodes to Kahn's
    default order and is always in the first population; with elitism the result is never worse.
    Offspring take each key from their elite parent with probability ``inherit_prob``.
    """
    if population < 2 or not 0 < elite_fraction < 1 or not 0 <= mutant_fraction < 1:
        raise ValueError("need population >= 2, 0 < elite_fraction < 1, 0 <= mutant_fraction < 1")
    gen = _numpy_rng(rng)
    names = list(graph.nodes)
    n = len(names)
    n_elite = max(1, int(round(elite_fraction * population)))
    n_mutant = min(population - n_elite, int(round(mutant_fraction * population)))
    cache: dict[tuple[str, ...], Plan | None] = {}

    def evaluate(keys: np.ndarray) -> tuple[float, Plan | None]:
        order = tuple(topological_order(graph, dict(zip(names, keys.tolist()))))
        if order not in cache:
            try:
                cache[order] = slice_optimal(SegmentCost(graph, order, work=work), nodes)
            except InfeasiblePlanError:
                cache[order] = None
        plan = cache[order]
        return (plan.bottleneck if plan is not None else math.inf), plan

    default_keys = np.arange(n, dtype=np.float64) / n
    baseline_value, baseline = evaluate(default_keys)
    if baseline is None:
        slice_optimal(SegmentCost(graph, topological_order(graph), work=work), nodes)  # raises with reason
    pop = np.vstack([default_keys[None, :], gen.random((population - 1, n))])
    fitness = np.array([evaluate(c)[0] for c in pop])
    best_value, stale, done = float(fitness.min()), 0, 0
    for _ in range(generations):
        ranked = np.argsort(fitness, kind="stable")
        elite, rest = pop[ranked[:n_elite]], pop[ranked[n_elite:]]
        n_children = population - n_elite - n_mutant
        mothers = elite[gen.integers(0, n_elite, n_children)]
        fathers = rest[gen.integers(0, len(rest), n_children)] if len(rest) else elite[gen.integers(0, n_elite, n_children)]
        children = np.where(gen.random((n_children, n)) < inherit_prob, mothers, fathers)
        new = np.vstack([children, gen.random((n_mutant, n))])
        pop = np.vstack([elite, new])
        fitness = np.concatenate([fitness[ranked[:n_elite]], [evaluate(c)[0] for c in new]])
        done += 1
        current = float(fitness.min())
        stale = 0 if current < best_value else stale + 1
        best_value = min(best_value, current)
        if patience is not None and stale >= patience:
            break
    winner = evaluate(pop[int(np.argmin(fitness))])[1]
    assert baseline is not None
    if winner is None or winner.bottleneck > baseline_value:  # unreachable with elitism; cheap insurance
        winner = baseline
    return SearchResult(plan=winner, baseline=baseline, evaluations=len(cache), generations=done)
