"""Concurrent calls of a row-wise function share one call (flat combining).

Many sessions generating at once in one client process each need the head (final norm + lm_head)
once per token. Done separately, every call streams the whole head matrix from memory (113 MB in
float32 for SmolLM2), and every calling thread drives its own OpenMP team, so 16 sessions
oversubscribe 2 cores with 32 threads. Here the first caller becomes the combiner: it takes every
queued request, concatenates their rows, makes one call, hands each caller its rows, and repeats
until the queue is empty; the others just wait. A lone caller computes inline: no extra thread,
no hand-off on the single-session path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class _Call:
    rows: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class RowBatcher:
    """Wraps ``fn`` (row-wise over dim 0: ``fn(cat(xs))`` splits into ``fn(x)`` for each x)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_rows: int = 256) -> None:
        self.fn = fn
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._pending: list[_Call] = []
        self._combining = False
        self.calls = 0  # calls of fn, for tests and reports
        self.rows = 0

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        call = _Call(rows)
        with self._lock:
            self._pending.append(call)
            lead = not self._combining
            self._combining = True
        if lead:
            self._combine()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _take(self) -> list[_Call]:
        """Requests of one shape and dtype, up to ``max_rows`` rows; releases the role when empty."""
        with self._lock:
            if not self._pending:
                self._combining = False
                return []
            first = self._pending[0].rows
            key = (first.shape[1:], first.dtype)
            batch, rest, count = [], [], 0
            for call in self._pending:
                fits = (call.rows.shape[1:], call.rows.dtype) == key and count + call.rows.shape[0] <= self.max_rows
                if fits or not batch:
                    batch.append(call)
                    count += call.rows.shape[0]
                else:
                    rest.append(call)
            self._pending = rest
            return batch

    def _combine(self) -> None:
        while batch := self._take():
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
                    call.done.set()
