"""Concurrent calls of a row-wise function share one call (flat combining), in lockstep.

Many sessions generating at once in one client process each need the head (final norm + lm_head)
once per token. Done separately, every call streams the whole head matrix from memory (113 MB in
float32 for SmolLM2), and every calling thread drives its own OpenMP team, so 16 sessions
oversubscribe 2 cores with 32 threads. Here a caller that finds work ready becomes the combiner:
it concatenates the ready rows, makes one call and hands each caller its rows; the others wait.
A lone caller computes inline: no extra thread, no hand-off on the single-session path.

Lockstep: threads inside ``participant()`` (each generating session's decode loop) call once per
token, naming a ``group`` (their route). A group's calls wait, bounded, until every participant of
that group has called, so those sessions leave the head together and reach each server of their
route as one convoy, which the server stacks into one forward pass (server/batching.py). Without
it, sessions drift into the pipeline's stages and every server computes small rounds, each
re-reading its span's weights.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class _Call:
    rows: torch.Tensor
    thread: int = 0
    group: Hashable = None
    arrived: float = 0.0
    deadline: float = 0.0  # computed by then even if its group is incomplete
    done: bool = False
    result: torch.Tensor | None = None
    error: BaseException | None = None


class RowBatcher:
    """Wraps ``fn`` (row-wise over dim 0: ``fn(cat(xs))`` splits into ``fn(x)`` for each x)."""

    def __init__(
        self, fn: Callable[[torch.Tensor], torch.Tensor], max_rows: int = 256, max_wait_s: float = 0.1
    ) -> None:
        self.fn = fn
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: list[_Call] = []
        self._combining = False
        self._members: dict[int, Hashable] = {}  # participating thread -> group of its last call
        self._period_s = 0.0  # smoothed time between a thread's calls: bounds the wait for the late
        self._last_call: dict[int, float] = {}
        self.calls = 0  # calls of fn, for tests and reports
        self.rows = 0
        self.waited_s = 0.0  # summed over calls: time from arrival to computation

    @contextmanager
    def participant(self) -> Iterator[None]:
        """The calling thread will call once per round until it leaves: its group waits for it."""
        thread = threading.get_ident()
        with self._lock:
            self._members[thread] = None
        try:
            yield
        finally:
            with self._lock:
                self._members.pop(thread, None)
                self._last_call.pop(thread, None)
                self._changed.notify_all()

    def __call__(self, rows: torch.Tensor, group: Hashable = None) -> torch.Tensor:
        """``fn(rows)``, computed together with other callers' rows.

        ``group``: participants that travel together (sessions on one route); a call waits only
        for the participants of its own group (and those that have not called yet).
        """
        now, thread = time.perf_counter(), threading.get_ident()
        with self._lock:
            if thread in self._members:  # only participants' rhythm bounds the waits
                self._members[thread] = group
                last = self._last_call.get(thread)
                if last is not None:
                    period = now - last
                    self._period_s = period if not self._period_s else 0.9 * self._period_s + 0.1 * period
                self._last_call[thread] = now
            wait = min(self.max_wait_s, 0.5 * self._period_s) if self._period_s else self.max_wait_s
            call = _Call(rows, thread, group, now, now + wait)
            self._pending.append(call)
            self._changed.notify_all()
            while not call.done:
                batch = [] if self._combining else self._take_ready(time.perf_counter())
                if batch:
                    self._combining = True
                    self._lock.release()
                    try:
                        self._compute(batch)
                    finally:
                        self._lock.acquire()
                        self._combining = False
                        self._changed.notify_all()
                    continue
                timeout = None
                if not self._combining and self._pending:
                    timeout = max(0.0, min(c.deadline for c in self._pending) - time.perf_counter())
                self._changed.wait(timeout)
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _take_ready(self, now: float) -> list[_Call]:
        """Pending calls of the groups that are complete or past a deadline: one shape and dtype,
        up to ``max_rows`` rows. Participants that have not called yet count in every group."""
        if not self._pending:
            return []
        arrived = {c.thread for c in self._pending}
        # A participant silent for two periods is busy elsewhere (a long prompt, a failover, its
        # caller): rounds stop waiting for it until it calls again.
        recent = now - 2.0 * self._period_s if self._period_s else -math.inf
        waiting_for = {g for t, g in self._members.items()
                       if t not in arrived and self._last_call.get(t, now) >= recent}
        anyone = None in waiting_for
        # A group is ready when complete or when its oldest call's deadline passed; then all of it goes.
        groups = {c.group for c in self._pending if now >= c.deadline or not (anyone or c.group in waiting_for)}
        ready = [c for c in self._pending if c.group in groups]
        if not ready:
            return []
        key = (ready[0].rows.shape[1:], ready[0].rows.dtype)
        batch, count = [], 0
        for call in ready:
            if (call.rows.shape[1:], call.rows.dtype) == key and (count + call.rows.shape[0] <= self.max_rows or not batch):
                batch.append(call)
                count += call.rows.shape[0]
        taken = {id(c) for c in batch}
        self._pending = [c for c in self._pending if id(c) not in taken]
        self.waited_s += sum(now - c.arrived for c in batch)
        return batch

    def _compute(self, batch: list[_Call]) -> None:
        try:
            out = self.fn(batch[0].rows if len(batch) == 1 else torch.cat([c.rows for c in batch]))
            self.calls += 1
            self.rows += out.shape[0]
            offset = 0
            for call in batch:
                n = call.rows.shape[0]
                call.result = out[offset : offset + n]
                offset += n
        except BaseException as exc:  # every caller of the failed call gets the error
            for call in batch:
                call.error = exc
        finally:
            for call in batch:
                call.done = True
