"""RowBatcher: concurrent callers get exactly their own rows, errors reach every caller of a call."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from swarmshard.client.rows import RowBatcher


def test_lone_caller_computes_inline():
    seen = []
    batcher = RowBatcher(lambda x: (seen.append(threading.get_ident()), x * 2)[1])
    out = batcher(torch.ones(3, 4))
    assert torch.equal(out, torch.full((3, 4), 2.0))
    assert seen == [threading.get_ident()] and batcher.calls == 1


def test_concurrent_callers_share_calls_and_get_their_rows():
    weight = torch.randn(8, 5)
    gate = threading.Event()
    sizes = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        gate.wait(5)  # hold the first call so the others queue up behind it
        return x @ weight

    batcher = RowBatcher(fn)
    inputs = [torch.randn(1 + i % 2, 8) for i in range(12)]
    results: list[torch.Tensor | None] = [None] * len(inputs)

    def worker(i: int) -> None:
        results[i] = batcher(inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    threads[0].start()
    deadline = time.monotonic() + 5
    while not sizes and time.monotonic() < deadline:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)  # every other caller is now queued
    gate.set()
    for t in threads:
        t.join(10)
    for x, out in zip(inputs, results):
        assert out is not None and torch.allclose(out, x @ weight, atol=1e-6)
    assert batcher.calls < len(inputs)  # the queued callers were combined
    assert sum(sizes) == sum(x.shape[0] for x in inputs)


def test_mixed_shapes_are_not_concatenated():
    batcher = RowBatcher(lambda x: x.sum(dim=-1))
    batcher._combining = True  # pretend a combiner is busy, queue two shapes, then combine
    a, b = torch.ones(2, 3), torch.ones(1, 5)
    from swarmshard.client.rows import _Call

    calls = [_Call(a), _Call(b)]
    batcher._pending.extend(calls)
    batcher._combine()
    assert torch.equal(calls[0].result, torch.full((2,), 3.0))
    assert torch.equal(calls[1].result, torch.full((1,), 5.0))
    assert batcher.calls == 2 and not batcher._combining


def test_error_reaches_every_caller_and_batcher_recovers():
    def fn(x):
        if (x < 0).any():
            raise ValueError("negative rows")
        return x

    batcher = RowBatcher(fn)
    with pytest.raises(ValueError, match="negative rows"):
        batcher(-torch.ones(1, 2))
    assert torch.equal(batcher(torch.ones(1, 2)), torch.ones(1, 2))
