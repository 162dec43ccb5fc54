"""Discrete-event simulation of a swarm serving one model under churn (SPEC §1, §6).

What is simulated, and how cheaply:
- Nodes (a realistic hardware and region mix, ``sim.hardware``) join, leave gracefully or crash
  (exponential lifetimes, Poisson arrivals). A joining server picks its span with the SAME
  ``core.placement.best_span`` a real server runs, loads the weights (disk speed) and only then
  serves; every server re-checks its place with ``core.placement.decide_move`` at exponential
  intervals and moves (reloading) when the hysteresis rule says so.
- The swarm's view (announced spans, including loading servers and crashed ones whose records have
  not expired yet) and the truth (servers actually serving) are two per-block arrays updated
  incrementally in O(span) per event, so a 10,000-node hour costs O(events * L), not O(N * L).
- Load is a fluid: offered decode tokens/s against the true bottleneck, with a backlog when the
  swarm is slower than the load; throughput is what the fluid serves. Latency is measured on a
  Poisson-thinned sample of requests routed through a min-latency chain (``_route``) recomputed
  every few seconds per client region.
Everything random comes from one seeded generator, consumed in event order: same seed, same run.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swarmshard.core.placement import ModelSpec, Span, best_span, decide_move, petals_best_start, petals_should_move
from swarmshard.sim.hardware import HARDWARE_MIX, REFERENCE_MODEL, REGION_RTT_S, REGIONS, HardwareClass, sample_traits

__all__ = ["SimConfig", "SimReport", "simulate", "plot_report"]

_ABSENT, _LOADING, _ONLINE, _CRASHED = 0, 1, 2, 3
_JOIN, _READY, _DEPART, _EXPIRE, _CHECK, _REQUEST, _SAMPLE, _URGENT = range(8)


@dataclass(frozen=True)
class SimConfig:
    """One scenario. Defaults: a 4 h mean node session, 30% of departures are crashes."""

    num_nodes: int = 100  # initial population, also the steady-state mean under churn
    duration_s: float = 3600.0
    seed: int = 0
    model: ModelSpec = REFERENCE_MODEL
    hardware: tuple[HardwareClass, ...] = HARDWARE_MIX
    policy: str = "ours"  # "ours": best_span + decide_move; "petals": Petals' join and rebalancing rules
    mean_lifetime_s: float = 4 * 3600.0
    crash_fraction: float = 0.3
    detect_s: float = 30.0  # a crashed server's announcement expires after this long
    check_period_s: float = 600.0  # mean time between one server's rebalancing checks
    move_threshold: float = 1.15
    hole_checks: int = 16  # servers that re-check at once when a block loses its last server
    hole_delay_s: float = 5.0  # mean delay before they notice (DHT polling)
    load: float = 0.5  # offered decode tokens/s as a share of the initial bottleneck...
    offered_tokens_per_s: float | None = None  # ...unless given outright (to compare policies)
    prompt_tokens: int = 256
    new_tokens: int = 128
    latency_samples_per_s: float = 5.0  # Poisson rate of requests traced for latency
    route_refresh_s: float = 30.0
    route_candidates: int = 256
    retry_timeout_s: float = 5.0  # what a client loses on a crashed server before re-routing
    sample_every_s: float = 60.0

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.duration_s <= 0:
            raise ValueError("need at least one node and a positive duration")
        if self.policy not in ("ours", "petals"):
            raise ValueError(f"unknown policy {self.policy!r}")
        if not 0.0 <= self.crash_fraction <= 1.0:
            raise ValueError("crash_fraction must be in [0, 1]")


@dataclass
class SimReport:
    """What a run measured; ``timeline`` holds one row per ``sample_every_s``."""

    config: SimConfig
    wall_s: float
    events: int
    offered_tokens_per_s: float
    throughput_tokens_per_s: float  # decode tokens/s actually served (time average)
    mean_bottleneck: float  # time-averaged true swarm capacity, tokens/s
    availability: float  # share of time every block was served
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    requests_traced: int
    request_failure_rate: float  # traced requests that found no chain
    moves: int
    joins: int
    leaves: int
    crashes: int
    timeline: dict[str, np.ndarray] = field(repr=False)


class _Swarm:
    """Growable per-node arrays plus the two per-block views."""

    def __init__(self, cfg: SimConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.rng = rng
        self.L = cfg.model.num_blocks
        self.n = 0
        self.cap = 0
        self.speed = self.prefill = self.latency = self.bandwidth = self.load_bps = np.zeros(0)
        self.memory = np.zeros(0, dtype=np.int64)
        self.region = np.zeros(0, dtype=np.int64)
        self.state = np.zeros(0, dtype=np.int8)
        self.start = np.zeros(0, dtype=np.int64)
        self.end = np.zeros(0, dtype=np.int64)
        self.rate = np.zeros(0)  # true per-block contribution
        self.announced = np.zeros(0)  # what placement sees (Petals over-reports)
        self.epoch = np.zeros(0, dtype=np.int64)
        self.banned_until = np.zeros(0)
        self.rates: list[np.ndarray] = []
        self.view = np.zeros(self.L)
        self.view_count = np.zeros(self.L, dtype=np.int64)
        self.true = np.zeros(self.L)
        self.true_count = np.zeros(self.L, dtype=np.int64)

    def _grow(self, need: int) -> None:
        new_cap = max(need, 2 * self.cap, 64)

        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros(new_cap, dtype=a.dtype)
            out[: self.n] = a[: self.n]
            return out

        for name in ("speed", "prefill", "latency", "bandwidth", "load_bps", "memory", "region", "state",
                     "start", "end", "rate", "announced", "epoch", "banned_until"):
            setattr(self, name, grown(getattr(self, name)))
        self.cap = new_cap

    def add_nodes(self, count: int) -> range:
        """Draw ``count`` new machines; they start ABSENT."""
        if self.n + count > self.cap:
            self._grow(self.n + count)
        t = sample_traits(count, self.rng, self.cfg.hardware)
        sl = slice(self.n, self.n + count)
        self.speed[sl], self.prefill[sl], self.latency[sl] = t.block_speed, t.prefill_speed, t.block_latency_s
        self.bandwidth[sl], self.load_bps[sl], self.memory[sl] = t.bandwidth, t.load_bytes_per_s, t.memory_bytes
        self.region[sl] = t.region
        m = self.cfg.model
        per_block = m.block_bytes + m.kv_bytes_per_token * m.cache_tokens
        for i in range(self.n, self.n + count):
            span_max = int(min(self.L, self.memory[i] // per_block))
            n = np.arange(1, span_max + 1, dtype=np.float64)
            self.rates.append(np.minimum(self.speed[i] / n, self.bandwidth[i] / m.activation_bytes))
        ids = range(self.n, self.n + count)
        self.n += count
        return ids

    def announced_rate(self, i: int, length: int) -> float:
        if self.cfg.policy == "petals":
            net = self.bandwidth[i] / self.cfg.model.activation_bytes
            return float(min(2.0 * self.speed[i] / (length + 1.0), net))
        return float(self.rates[i][length - 1])

    def choose(self, i: int) -> Span:
        """The policy's span for node i given the current view (without node i)."""
        rates = self.rates[i]
        if self.cfg.policy == "petals":
            length = rates.size
            start = petals_best_start(self.view, length)
            return Span(start, start + length)
        return best_span(self.view, rates)

    def set_view(self, i: int, sign: int) -> None:
        s, e = self.start[i], self.end[i]
        self.view[s:e] += sign * self.announced[i]
        self.view_count[s:e] += sign
        zero = self.view_count[s:e] == 0
        self.view[s:e][zero] = 0.0  # no float residue where nobody is announced

    def set_true(self, i: int, sign: int) -> None:
        s, e = self.start[i], self.end[i]
        self.true[s:e] += sign * self.rate[i]
        self.true_count[s:e] += sign
        zero = self.true_count[s:e] == 0
        self.true[s:e][zero] = 0.0

    def place(self, i: int, span: Span) -> None:
        self.start[i], self.end[i] = span.start, span.end
        self.rate[i] = self.rates[i][span.length - 1]
        self.announced[i] = self.announced_rate(i, span.length)

    def load_time(self, i: int, new: Span, old: Span | None) -> float:
        """Seconds to load the blocks of ``new`` not already held from ``old``."""
        keep = 0 if old is None else max(0, min(new.end, old.end) - max(new.start, old.start))
        return (new.length - keep) * self.cfg.model.block_bytes / float(self.load_bps[i])


def _route(
    starts: np.ndarray,
    ends: np.ndarray,
    regions: np.ndarray,
    block_s: np.ndarray,
    hop_s: np.ndarray,
    one_way: np.ndarray,
    num_blocks: int,
) -> list[list[tuple[int, int, int]] | None]:
    """Min-latency chains over candidate servers, for a client in each region at once.

    D[c, j, r] = fastest way for a client in region c to have run blocks [0, j) with the last hop
    in region r; a server entered at block j runs j..its end at ``block_s`` per block, after the
    one-way latency from the previous hop and its activation transfer ``hop_s``. This is SPEC §1's
    network-aware recursion with servers of a region sharing latencies. Returns, per client region,
    [(candidate index, first block, end block), ...] or None if the candidates miss a block.
    """
    R = one_way.shape[0]
    D = np.full((R, num_blocks + 1, R), np.inf)
    D[np.arange(R), 0, np.arange(R)] = 0.0
    par_server = np.full((R, num_blocks + 1, R), -1, dtype=np.int64)
    par_pos = np.zeros((R, num_blocks + 1, R), dtype=np.int64)
    par_reg = np.zeros((R, num_blocks + 1, R), dtype=np.int64)
    for j in range(num_blocks):
        row = D[:, j, :]
        if not np.isfinite(row).any():
            continue
        idx = np.flatnonzero((starts <= j) & (ends > j))
        if idx.size == 0:
            continue
        via = row[:, :, None] + one_way[None, :, :]
        enter = via.min(axis=1)  # (client, region entered)
        enter_from = via.argmin(axis=1)
        keys = ends[idx] * R + regions[idx]
        order = np.argsort(keys, kind="stable")
        idx, keys = idx[order], keys[order]
        group = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        cost = enter[:, regions[idx]] + (hop_s[idx] + (ends[idx] - j) * block_s[idx])[None, :]
        best = np.minimum.reduceat(cost, group, axis=1)
        sizes = np.diff(np.append(group, idx.size))
        where = np.where(cost == np.repeat(best, sizes, axis=1), np.arange(idx.size)[None, :], idx.size)
        first = np.minimum.reduceat(where, group, axis=1)
        pos, reg = keys[group] // R, keys[group] % R
        c, g = np.nonzero(best < D[:, pos, reg])
        D[c, pos[g], reg[g]] = best[c, g]
        par_server[c, pos[g], reg[g]] = idx[first[c, g]]
        par_pos[c, pos[g], reg[g]] = j
        par_reg[c, pos[g], reg[g]] = enter_from[c, reg[g]]
    chains: list[list[tuple[int, int, int]] | None] = []
    for c in range(R):
        total = D[c, num_blocks] + one_way[:, c]
        if not np.isfinite(total).any():
            chains.append(None)
            continue
        chain = []
        pos, r = num_blocks, int(np.argmin(total))
        while pos > 0:
            j = int(par_pos[c, pos, r])
            chain.append((int(par_server[c, pos, r]), j, pos))
            pos, r = j, int(par_reg[c, pos, r])
        chains.append(chain[::-1])
    return chains


@dataclass
class _Route:
    nodes: np.ndarray
    blocks: np.ndarray  # blocks each hop runs
    step_s: float  # one decode step through the chain, unloaded
    prefill_s_per_token: float
    fixed_s: float  # one-way latencies of a pass


class _Sim:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        # separate streams: the same seed gives the same machines, churn and requests whatever the
        # policy does, so policies are compared on identical swarms
        nodes, requests, misc = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(3))
        self.rng_nodes, self.rng_requests, self.rng = nodes, requests, misc
        self.sw = _Swarm(cfg, self.rng_nodes)
        self.queue: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.one_way = REGION_RTT_S / 2.0
        self.routes: dict[int, _Route | None] = {}
        self.routes_at = -math.inf
        self.latencies: list[float] = []
        self.failed = 0
        self.moves = self.joins = self.leaves = self.crashes = 0
        self.move_times: list[float] = []
        # time integrals
        self.last_t = 0.0
        self.covered_time = 0.0
        self.capacity_integral = 0.0
        self.served = 0.0
        self.backlog = 0.0
        self.offered = 0.0
        self.rows: list[tuple[float, ...]] = []

    # ---------------------------------------------------------------- event plumbing
    def push(self, t: float, kind: int, node: int = -1, epoch: int = 0) -> None:
        if t <= self.cfg.duration_s:
            self.seq += 1
            heapq.heappush(self.queue, (t, self.seq, kind, node, epoch))

    def advance(self, t: float) -> None:
        """Integrate availability, capacity and the fluid load from last_t to t (state constant)."""
        dt = t - self.last_t
        if dt <= 0:
            return
        cap = float(self.sw.true.min()) if self.sw.true_count.min() > 0 else 0.0
        self.capacity_integral += cap * dt
        if cap > 0:
            self.covered_time += dt
            # fluid queue: serve the backlog and new load at up to cap tokens/s
            work = self.backlog + self.offered * dt
            done = min(work, cap * dt)
            self.served += done
            self.backlog = work - done
        # while some block is unserved, arriving load fails and the backlog is dropped
        else:
            self.backlog = 0.0
        self.last_t = t

    # ---------------------------------------------------------------- node lifecycle
    def start_serving(self, i: int, span: Span, old: Span | None) -> None:
        sw = self.sw
        sw.place(i, span)
        sw.state[i] = _LOADING
        sw.set_view(i, +1)
        sw.epoch[i] += 1
        self.push(self.now + sw.load_time(i, span, old), _READY, i, int(sw.epoch[i]))

    def join(self, i: int, instant: bool = False) -> None:
        sw = self.sw
        if sw.rates[i].size == 0:
            return  # cannot hold a block: never serves
        span = sw.choose(i)
        self.joins += not instant
        if instant:
            sw.place(i, span)
            sw.state[i] = _ONLINE
            sw.set_view(i, +1)
            sw.set_true(i, +1)
            self.push(self.rng.exponential(self.cfg.check_period_s), _CHECK, i, int(sw.epoch[i]))
        else:
            self.start_serving(i, span, None)
        self.push(self.now + self.rng_nodes.exponential(self.cfg.mean_lifetime_s), _DEPART, i, 0)

    def depart(self, i: int) -> None:
        sw = self.sw
        if sw.state[i] not in (_LOADING, _ONLINE):
            return
        if sw.state[i] == _ONLINE:
            sw.set_true(i, -1)
        sw.epoch[i] += 1
        if self.rng_nodes.random() < self.cfg.crash_fraction:
            self.crashes += 1
            sw.state[i] = _CRASHED  # still announced until its record expires
            self.push(self.now + self.cfg.detect_s, _EXPIRE, i, int(sw.epoch[i]))
            return
        self.leaves += 1
        sw.state[i] = _ABSENT
        self.unannounce(i)

    def check(self, i: int, periodic: bool) -> None:
        """A server's rebalancing check (periodic, or urgent after a block lost its last server)."""
        sw = self.sw
        if sw.state[i] != _ONLINE:
            return
        current = Span(int(sw.start[i]), int(sw.end[i]))
        target: Span | None = None
        if self.cfg.policy == "ours":
            decision = decide_move(sw.view, current, sw.rates[i], self.cfg.move_threshold, sw.view_count)
            target = decision.span if decision.move else None
        elif periodic:
            shown = np.flatnonzero(sw.state[: sw.n] != _ABSENT)
            start = petals_should_move(sw.start[shown], sw.end[shown] - sw.start[shown], sw.announced[shown],
                                       int(np.searchsorted(shown, i)), sw.L, self.rng)
            target = None if start is None else Span(start, start + current.length)
        if target is not None:
            self.moves += 1
            self.move_times.append(self.now)
            sw.set_true(i, -1)
            self.unannounce(i)
            self.start_serving(i, target, current)
        elif periodic:
            self.push(self.now + self.rng.exponential(self.cfg.check_period_s), _CHECK, i, int(sw.epoch[i]))

    def unannounce(self, i: int) -> None:
        """Drop node i from the view; if that leaves a block unannounced, wake some servers."""
        sw = self.sw
        sw.set_view(i, -1)
        s, e = int(sw.start[i]), int(sw.end[i])
        if self.cfg.hole_checks > 0 and np.any(sw.view_count[s:e] == 0):
            online = np.flatnonzero(sw.state[: sw.n] == _ONLINE)
            if online.size > self.cfg.hole_checks:
                online = self.rng.choice(online, size=self.cfg.hole_checks, replace=False)
            for k in online:
                self.push(self.now + self.rng.exponential(self.cfg.hole_delay_s), _URGENT, int(k), int(sw.epoch[k]))

    # ---------------------------------------------------------------- requests
    def route_for(self, region: int) -> _Route | None:
        """The cached chain for clients of ``region``; all regions are recomputed together when it
        is older than ``route_refresh_s`` or runs through a server that stopped serving."""
        sw = self.sw
        cached = self.routes.get(region)
        fresh = self.now - self.routes_at < self.cfg.route_refresh_s
        if fresh and cached is not None:
            st = sw.state[cached.nodes]
            if np.all((st == _ONLINE) | (st == _CRASHED)) and np.all(sw.banned_until[cached.nodes] <= self.now):
                return cached
        elif fresh and region in self.routes:
            return None  # no chain at the last refresh
        self.compute_routes()
        return self.routes[region]

    def compute_routes(self) -> None:
        sw = self.sw
        n = sw.n
        self.routes_at = self.now
        self.routes = {r: None for r in range(len(REGIONS))}
        shown = (sw.state[:n] == _ONLINE) | (sw.state[:n] == _CRASHED)  # clients cannot tell crashed ones
        usable = np.flatnonzero(shown & (sw.banned_until[:n] <= self.now))
        if usable.size == 0:
            return
        k = self.cfg.route_candidates
        cand = usable if usable.size <= k else self.rng.choice(usable, size=k, replace=False)
        covered = np.zeros(sw.L + 1, dtype=np.int64)
        np.add.at(covered, sw.start[cand], 1)
        np.add.at(covered, sw.end[cand], -1)
        extra = []
        for j in np.flatnonzero(np.cumsum(covered[:-1]) == 0):  # the sample must cover what the swarm covers
            hold = usable[(sw.start[usable] <= j) & (sw.end[usable] > j)]
            if hold.size:
                extra.append(int(hold[np.argmax(sw.end[hold])]))
        if extra:
            cand = np.unique(np.concatenate((cand, np.array(extra, dtype=np.int64))))
        hop_all = self.cfg.model.activation_bytes / sw.bandwidth[cand]
        chains = _route(sw.start[cand], sw.end[cand], sw.region[cand], sw.latency[cand], hop_all, self.one_way, sw.L)
        for region, chain in enumerate(chains):
            if chain is None:
                continue
            nodes = np.array([cand[c] for c, _, _ in chain], dtype=np.int64)
            blocks = np.array([e - s for _, s, e in chain], dtype=np.float64)
            regs = np.concatenate(([region], sw.region[nodes], [region]))
            fixed = float(self.one_way[regs[:-1], regs[1:]].sum())
            hop = self.cfg.model.activation_bytes / sw.bandwidth[nodes]
            step = fixed + float((blocks * sw.latency[nodes]).sum() + hop.sum())
            prefill = float((blocks / sw.prefill[nodes]).sum() + hop.sum())
            self.routes[region] = _Route(nodes, blocks, step, prefill, fixed)

    def request(self) -> None:
        cfg, sw = self.cfg, self.sw
        region = int(self.rng_requests.choice(len(REGIONS), p=_CLIENT_SHARE))
        penalty = 0.0
        for _ in range(4):
            route = self.route_for(region)
            if route is None:
                break
            dead = route.nodes[sw.state[route.nodes] == _CRASHED]
            if dead.size == 0:
                break
            penalty += cfg.retry_timeout_s
            sw.banned_until[dead] = self.now + cfg.detect_s  # clients avoid it until it expires
        else:
            route = None
        if route is None or sw.true_count.min() == 0:
            self.failed += 1
            return
        cap = float(sw.true.min())
        rho = min(self.offered / cap, 0.95) if cap > 0 else 0.95
        wait = self.backlog / cap
        latency = penalty + wait + route.fixed_s + cfg.prompt_tokens * route.prefill_s_per_token
        latency += cfg.new_tokens * route.step_s / (1.0 - rho)
        self.latencies.append(latency)

    # ---------------------------------------------------------------- main loop
    def sample(self) -> None:
        sw = self.sw
        n = sw.n
        self.rows.append((
            self.now,
            float(np.count_nonzero(sw.state[:n] == _ONLINE)),
            float(np.count_nonzero(sw.state[:n] == _LOADING)),
            float(sw.true.min()) if sw.true_count.min() > 0 else 0.0,
            float(sw.true_count.min() > 0),
            float(self.moves),
            self.served,
        ))

    def run(self) -> SimReport:
        cfg = self.cfg
        t0 = time.perf_counter()
        for i in self.sw.add_nodes(cfg.num_nodes):
            self.join(i, instant=True)
        initial = float(self.sw.true.min()) if self.sw.true_count.min() > 0 else 0.0
        self.offered = cfg.load * initial if cfg.offered_tokens_per_s is None else cfg.offered_tokens_per_s
        join_rate = cfg.num_nodes / cfg.mean_lifetime_s
        if join_rate > 0:
            self.push(self.rng_nodes.exponential(1.0 / join_rate), _JOIN)
        if cfg.latency_samples_per_s > 0:
            self.push(self.rng_requests.exponential(1.0 / cfg.latency_samples_per_s), _REQUEST)
        self.sample()
        self.push(cfg.sample_every_s, _SAMPLE)
        events = 0
        while self.queue:
            t, _, kind, node, epoch = heapq.heappop(self.queue)
            self.advance(t)
            self.now = t
            events += 1
            if kind == _REQUEST:
                self.request()
                self.push(t + self.rng_requests.exponential(1.0 / cfg.latency_samples_per_s), _REQUEST)
            elif kind == _JOIN:
                (i,) = self.sw.add_nodes(1)
                self.join(i)
                self.push(t + self.rng_nodes.exponential(1.0 / join_rate), _JOIN)
            elif kind == _READY:
                if self.sw.epoch[node] == epoch and self.sw.state[node] == _LOADING:
                    self.sw.state[node] = _ONLINE
                    self.sw.set_true(node, +1)
                    self.push(t + self.rng.exponential(cfg.check_period_s), _CHECK, node, epoch)
            elif kind == _DEPART:
                self.depart(node)
            elif kind == _EXPIRE:
                if self.sw.epoch[node] == epoch and self.sw.state[node] == _CRASHED:
                    self.sw.state[node] = _ABSENT
                    self.unannounce(node)
            elif kind == _CHECK or kind == _URGENT:
                if self.sw.epoch[node] == epoch:
                    self.check(node, periodic=kind == _CHECK)
            elif kind == _SAMPLE:
                self.sample()
                self.push(t + cfg.sample_every_s, _SAMPLE)
        self.advance(cfg.duration_s)
        self.now = cfg.duration_s
        if not self.rows or self.rows[-1][0] < cfg.duration_s:
            self.sample()
        lat = np.array(self.latencies) if self.latencies else np.array([math.nan])
        traced = len(self.latencies) + self.failed
        table = np.array(self.rows)
        timeline = {
            name: table[:, k]
            for k, name in enumerate(("t", "online", "loading", "bottleneck", "covered", "moves", "served_tokens"))
        }
        return SimReport(
            config=cfg,
            wall_s=time.perf_counter() - t0,
            events=events,
            offered_tokens_per_s=self.offered,
            throughput_tokens_per_s=self.served / cfg.duration_s,
            mean_bottleneck=self.capacity_integral / cfg.duration_s,
            availability=self.covered_time / cfg.duration_s,
            latency_p50_s=float(np.percentile(lat, 50)),
            latency_p90_s=float(np.percentile(lat, 90)),
            latency_p99_s=float(np.percentile(lat, 99)),
            requests_traced=traced,
            request_failure_rate=self.failed / traced if traced else 0.0,
            moves=self.moves,
            joins=self.joins,
            leaves=self.leaves,
            crashes=self.crashes,
            timeline=timeline,
        )


_CLIENT_SHARE = np.array([0.25, 0.25, 0.3, 0.12, 0.04, 0.04])


def simulate(config: SimConfig) -> SimReport:
    """Run one scenario to completion (deterministic for ``config.seed``)."""
    return _Sim(config).run()


def plot_report(report: SimReport, path: str | Path) -> Path:
    """Write a PNG of capacity, coverage, online servers and cumulative moves over time.

    Needs matplotlib (optional); raises ImportError with the install command otherwise.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_report needs matplotlib: pip install matplotlib") from e
    tl = report.timeline
    hours = tl["t"] / 3600.0
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(hours, tl["bottleneck"])
    axes[0].axhline(report.offered_tokens_per_s, ls="--", c="grey", label="offered load")
    axes[0].set_ylabel("bottleneck tok/s")
    axes[0].legend(loc="lower right")
    axes[1].step(hours, tl["covered"], where="post")
    axes[1].set_ylabel("all blocks served")
    axes[1].set_ylim(-0.05, 1.05)
    axes[2].plot(hours, tl["online"], label="online")
    axes[2].plot(hours, tl["loading"], label="loading")
    axes[2].set_ylabel("servers")
    axes[2].legend(loc="lower right")
    axes[3].step(hours, tl["moves"], where="post")
    axes[3].set_ylabel("moves (cumulative)")
    axes[3].set_xlabel("simulated hours")
    cfg = report.config
    fig.suptitle(
        f"{cfg.num_nodes} nodes, policy={cfg.policy}: availability {report.availability:.3f}, "
        f"p50 latency {report.latency_p50_s:.1f}s"
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
