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
    sizes = []
    batcher = RowBatcher(lambda x: (sizes.append(tuple(x.shape)), x.sum(dim=-1))[1])
    from swarmshard.client.rows import _Call

    a, b = torch.ones(2, 3), torch.ones(1, 5)
    batcher._pending.extend([_Call(a), _Call(b)])  # two shapes queued at once
    first = batcher._take_ready(time.perf_counter())
    second = batcher._take_ready(time.perf_counter())
    assert [c.rows.shape for c in first] == [(2, 3)] and [c.rows.shape for c in second] == [(1, 5)]
    for batch in (first, second):
        batcher._compute(batch)
    assert torch.equal(first[0].result, torch.full((2,), 3.0))
    assert torch.equal(second[0].result, torch.full((1,), 5.0))
    assert batcher.calls == 2 and not batcher._pending


def test_error_reaches_every_caller_and_batcher_recovers():
    def fn(x):
        if (x < 0).any():
            raise ValueError("negative rows")
        return x

    batcher = RowBatcher(fn)
    with pytest.raises(ValueError, match="negative rows"):
        batcher(-torch.ones(1, 2))
    assert torch.equal(batcher(torch.ones(1, 2)), torch.ones(1, 2))


def run_participants(batcher: RowBatcher, groups: list[str], delays: list[float], rounds: int = 3):
    """Threads in ``participant()``, each calling once per round after its own delay."""
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(groups))}

    def worker(i: int) -> None:
        with batcher.participant():
            for r in range(rounds):
                time.sleep(delays[i])
                results[i].append(batcher(torch.full((1, 2), float(10 * i + r)), group=groups[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    for i, outs in results.items():  # everyone got their own rows back
        assert [float(o[0, 0]) for o in outs] == [float(10 * i + r) for r in range(rounds)]
    return results


def test_participants_of_a_group_step_in_lockstep():
    sizes = []
    batcher = RowBatcher(lambda x: (sizes.append(x.shape[0]), x)[1], max_wait_s=1.0)
    # ~100 ms of work per token (the servers), arriving up to 30 ms apart
    run_participants(batcher, ["route"] * 4, [0.1, 0.11, 0.12, 0.13])
    assert sizes == [4, 4, 4]  # the late ones are waited for: one call per round


def test_groups_do_not_wait_for_each_other():
    calls = []
    batcher = RowBatcher(lambda x: (calls.append(sorted(set(x[:, 1].tolist()))), x)[1], max_wait_s=5.0)
    began = time.perf_counter()
    # route a: two fast sessions; route b: two sessions 0.3 s behind
    run_participants(batcher, ["a", "a", "b", "b"], [0.0, 0.0, 0.3, 0.3], rounds=2)
    assert time.perf_counter() - began < 3.0  # nobody sat out the 5 s bound
    assert len(calls) >= 3  # a's rounds did not wait for b's


def test_the_wait_for_a_missing_participant_is_bounded():
    sizes = []
    batcher = RowBatcher(lambda x: (sizes.append(x.shape[0]), x)[1], max_wait_s=0.05)
    began = time.perf_counter()
    run_participants(batcher, ["r", "r"], [0.0, 0.4], rounds=2)
    assert 1 in sizes  # the punctual one went ahead after the bound
    assert time.perf_counter() - began < 3.0


def test_a_lone_caller_never_waits_and_leaving_releases_the_others():
    batcher = RowBatcher(lambda x: x, max_wait_s=5.0)
    with batcher.participant():
        began = time.perf_counter()
        batcher(torch.ones(1, 2), group="r")
        batcher(torch.ones(1, 2), group="r")
        assert time.perf_counter() - began < 1.0
    batcher = RowBatcher(lambda x: x, max_wait_s=5.0)  # no history of quick rounds
    stay = threading.Event()
    entered = threading.Event()

    def idle_member() -> None:  # joins the group, then leaves without calling
        with batcher.participant():
            entered.set()
            stay.wait(5)

    t = threading.Thread(target=idle_member)
    t.start()
    assert entered.wait(5)
    timer = threading.Timer(0.2, stay.set)
    timer.start()
    with batcher.participant():
        began = time.perf_counter()
        batcher(torch.ones(1, 2), group="r")  # waits for the idle member until it leaves
        waited = time.perf_counter() - began
    t.join(5)
    assert 0.1 < waited < 3.0


def test_head_rows_are_padded_to_the_fast_gemm_size_but_one_row_is_not():
    from types import SimpleNamespace

    from swarmshard.client.model import HEAD_PAD_ROWS, DistributedModelForCausalLM

    weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def head(hidden):
        seen.append(hidden.shape[0])
        return hidden @ weight.t()

    model = SimpleNamespace(client=SimpleNamespace(head=head))
    for rows in (1, 2, 9, HEAD_PAD_ROWS, HEAD_PAD_ROWS + 3):
        x = torch.randn(rows, 1, 8)
        out = DistributedModelForCausalLM._head_rows(model, x)
        assert out.shape == (rows, 1, 50) and torch.allclose(out, x @ weight.t(), atol=1e-6)
    assert seen == [1, HEAD_PAD_ROWS, HEAD_PAD_ROWS, HEAD_PAD_ROWS, HEAD_PAD_ROWS + 3]


def test_a_participant_busy_elsewhere_is_not_waited_for():
    """A session that stops calling for a while (a long prompt, a failover) does not slow the
    others' rounds once it has been silent for two periods."""
    batcher = RowBatcher(lambda x: x, max_wait_s=0.2)
    busy = threading.Event()
    done = threading.Event()

    def slow_member() -> None:
        with batcher.participant():
            batcher(torch.ones(1, 2), group="r")
            busy.set()
            done.wait(10)  # silent: busy with something else

    t = threading.Thread(target=slow_member)
    t.start()
    assert busy.wait(5)
    with batcher.participant():
        for _ in range(3):  # establish the period: the first rounds may wait for the silent one
            time.sleep(0.02)
            batcher(torch.ones(1, 2), group="r")
        time.sleep(0.1)  # the silent member is now more than two periods behind
        began = time.perf_counter()
        for _ in range(10):
            batcher(torch.ones(1, 2), group="r")
        quick = time.perf_counter() - began
    done.set()
    t.join(5)
    assert quick < 0.05, f"10 rounds took {quick:.3f}s"
