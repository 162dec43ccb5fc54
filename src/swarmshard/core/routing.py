"""Choosing the chain of servers a request takes: a shortest path over block boundaries."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace


class NoRoute(RuntimeError):
    """No chain of usable servers covers every block; the message names what is missing."""

    def __init__(self, message: str, missing_blocks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.missing_blocks = list(missing_blocks)


@dataclass(frozen=True)
class Candidate:
    """A server as routing sees it.

    ``rtt_s`` is the client's measured round trip to it (hidden states go client -> server ->
    client on every hop); ``load`` counts the sessions it is already serving, so concurrent
    sessions spread over replicas instead of all picking the one that looked fastest when idle.
    """

    peer_id: str
    start: int
    end: int
    throughput: float  # decode tokens/s of its whole span, one session at a time
    cache_tokens_left: int
    rtt_s: float = 0.001
    load: float = 0.0
    machine: str = ""  # the machine it runs on, as announced ("": unknown, assumed a machine of its own)


@dataclass(frozen=True)
class RouteHop:
    peer_id: str
    start: int
    end: int


DEFAULT_LOAD_PENALTY = 1.0


def hop_cost(candidate: Candidate, load_penalty: float = DEFAULT_LOAD_PENALTY) -> float:
    """Seconds per decoded token spent on this hop: network round trip plus compute.

    Each session already on the server is assumed to cost ``load_penalty`` of a step's compute
    time (1.0: steps take turns; below 1 when the server batches concurrent steps well).
    """
    if load_penalty < 0:
        raise ValueError(f"load_penalty must be >= 0, got {load_penalty}")
    compute = (1.0 + load_penalty * max(candidate.load, 0.0)) / max(candidate.throughput, 1e-9)
    return candidate.rtt_s + compute


def missing_blocks(candidates: Sequence[Candidate], n_blocks: int, start: int = 0, end: int | None = None) -> list[int]:
    """Blocks of ``[start, end)`` that no candidate serves."""
    end = n_blocks if end is None else end
    covered = [False] * n_blocks
    for c in candidates:
        for b in range(max(c.start, 0), min(c.end, n_blocks)):
            covered[b] = True
    return [b for b in range(start, end) if not covered[b]]


def block_ranges(blocks: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2, 5, 7-8"``: block lists as people read them."""
    parts, i = [], 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        parts.append(f"{blocks[i]}" if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ", ".join(parts)


def choose_route(
    candidates: Sequence[Candidate],
    n_blocks: int,
    need_tokens: int = 0,
    banned: Collection[str] = (),
    start: int = 0,
    end: int | None = None,
    load_penalty: float = DEFAULT_LOAD_PENALTY,
) -> list[RouteHop]:
    """Min-latency chain of whole server spans tiling ``[start, end)`` (default: all blocks).

    A shortest path on the DAG of block boundaries, each hop costing ``hop_cost``. Servers that
    are banned or lack ``need_tokens`` of cache are skipped; ties go to fewer hops.
    """
    end = n_blocks if end is None else end
    usable = [c for c in candidates if c.peer_id not in banned and c.cache_tokens_left >= need_tokens]
    gaps = missing_blocks(usable, n_blocks, start, end)
    if gaps:
        raise NoRoute(f"no usable server holds blocks {block_ranges(gaps)} of {n_blocks}", gaps)
    by_start: dict[int, list[Candidate]] = {}
    for c in usable:
        if start <= c.start < c.end <= end:
            by_start.setdefault(c.start, []).append(c)
    best: list[tuple[float, int] | None] = [None] * (n_blocks + 1)
    via: list[Candidate | None] = [None] * (n_blocks + 1)
    best[start] = (0.0, 0)
    for boundary in range(start, end):  # spans only move forward: boundaries in order are a topological order
        if best[boundary] is None:
            continue
        cost, hops = best[boundary]
        for c in by_start.get(boundary, []):
            option = (cost + hop_cost(c, load_penalty), hops + 1)
            if best[c.end] is None or option < best[c.end]:
                best[c.end], via[c.end] = option, c
    if best[end] is None:
        reachable = [b for b in range(start, end + 1) if best[b] is not None]
        raise NoRoute(
            f"servers cover blocks {start}-{end - 1} but their spans do not chain: "
            f"no span starts at block {max(reachable)}",
            [max(reachable)],
        )
    route: list[RouteHop] = []
    boundary = end
    while boundary > start:
        c = via[boundary]
        assert c is not None
        route.append(RouteHop(c.peer_id, c.start, c.end))
        boundary = c.start
    return route[::-1]


# A client's new session takes a route its other sessions already use if that costs at most this
# much more than the fastest route. Sessions on one route step in lockstep and each server stacks
# them into one forward pass (client/rows.py, server/batching.py); spread over many mixes of
# replicas, they reach every server in small groups. bench/concurrency.py, 16 sessions over 3
# spans x 2 replicas: 4 distinct routes 55 tok/s, 2 routes 72-81 tok/s. 10% absorbs round-trip
# jitter between equal replicas; a clearly faster idle replica still takes the next session.
ROUTE_AFFINITY = 0.1


def route_cost(
    route: Sequence[RouteHop],
    candidates: Sequence[Candidate],
    need_tokens: int = 0,
    banned: Collection[str] = (),
    load_penalty: float = DEFAULT_LOAD_PENALTY,
) -> float | None:
    """Summed ``hop_cost`` of ``route`` now, or None if one of its servers is no longer usable
    (gone, banned, span changed, or short of ``need_tokens`` of cache)."""
    by_peer = {c.peer_id: c for c in candidates}
    total = 0.0
    for hop in route:
        c = by_peer.get(hop.peer_id)
        if c is None or c.peer_id in banned or c.cache_tokens_left < need_tokens or (c.start, c.end) != (hop.start, hop.end):
            return None
        total += hop_cost(c, load_penalty)
    return total


def _same_machines(route: Sequence[RouteHop], other: Sequence[RouteHop], by_peer: Mapping[str, Candidate]) -> bool:
    """Whether two routes cut the blocks alike and compute each hop on the same (announced) machine."""
    if [(h.start, h.end) for h in route] != [(h.start, h.end) for h in other]:
        return False
    for mine, theirs in zip(route, other):
        a, b = by_peer.get(mine.peer_id), by_peer.get(theirs.peer_id)
        if a is None or b is None or not a.machine or a.machine != b.machine:
            return False
    return True


def prefer_shared_route(
    best: Sequence[RouteHop],
    known: Sequence[Sequence[RouteHop]],
    candidates: Sequence[Candidate],
    need_tokens: int = 0,
    banned: Collection[str] = (),
    load_penalty: float = DEFAULT_LOAD_PENALTY,
    affinity: float = ROUTE_AFFINITY,
) -> list[RouteHop]:
    """``best``, or the cheapest of the ``known`` routes (those covering the same blocks) if it
    costs at most ``1 + affinity`` times as much: concurrent sessions then share few routes.

    A known route is also taken, whatever its load, when ``best`` computes every hop on the machine
    the known route computes that hop on, and is not faster idle by more than ``affinity``: servers
    on one machine share its cores, so spreading sessions over them adds no compute, while stepping
    together on one route lets each server stack more sessions into one pass.
    """
    best = list(best)
    best_cost = route_cost(best, candidates, need_tokens, banned, load_penalty)
    if best_cost is None or not best:
        return best
    if any(list(route) == best for route in known):
        return best
    by_peer = {c.peer_id: c for c in candidates}
    best_idle = route_cost(best, candidates, need_tokens, banned, 0.0)
    first, last = best[0].start, best[-1].end
    choice, choice_cost = best, math.inf
    for route in known:
        if not route or route[0].start != first or route[-1].end != last:
            continue
        cost = route_cost(route, candidates, need_tokens, banned, load_penalty)
        if cost is None or cost >= choice_cost:
            continue
        colocated = (
            _same_machines(best, route, by_peer)
            and route_cost(route, candidates, need_tokens, banned, 0.0) <= (1.0 + affinity) * best_idle
        )
        if colocated or cost <= (1.0 + affinity) * best_cost:
            choice, choice_cost = list(route), cost
    return choice


def with_load(candidates: Sequence[Candidate], extra: Mapping[str, float]) -> list[Candidate]:
    """The candidates with ``extra[peer]`` sessions added to their load (e.g. a client's own
    sessions, which the servers' announcements may not show yet)."""
    return [replace(c, load=c.load + extra[c.peer_id]) if extra.get(c.peer_id) else c for c in candidates]


def spread_routes(
    candidates: Sequence[Candidate],
    n_blocks: int,
    sessions: int,
    need_tokens: int = 0,
    banned: Collection[str] = (),
    load_penalty: float = DEFAULT_LOAD_PENALTY,
) -> list[list[RouteHop]]:
    """Routes for ``sessions`` sessions opened together (a batch, parallel requests).

    Routed one after the other, each session adds one unit of load to the servers it uses and
    takes ``need_tokens`` of their cache, so later sessions see earlier ones and spread over
    replicas when that is faster. Raises NoRoute (naming the blocks) once the cache runs out.
    """
    if sessions < 0:
        raise ValueError(f"sessions must be >= 0, got {sessions}")
    state = {c.peer_id: c for c in candidates}
    routes = []
    for _ in range(sessions):
        route = choose_route(list(state.values()), n_blocks, need_tokens, banned, load_penalty=load_penalty)
        for hop in route:
            c = state[hop.peer_id]
            state[hop.peer_id] = replace(c, load=c.load + 1, cache_tokens_left=c.cache_tokens_left - need_tokens)
        routes.append(route)
    return routes
