"""Continuous batching: steps of concurrent sessions that arrive together share one forward pass.

Steps queue up while the compute thread is busy; each round takes everything queued, after a
short, bounded wait for sessions due for their next decode step (a client's concurrent sessions
step in lockstep but their messages trickle in a few ms apart). Decode steps
(one new token per sequence) of different sessions are stacked into one batch: their KV caches, of
different lengths, are padded to a common length for that pass and masked, and each session's new
keys and values go back into its own cache. Prompts (prefill) of fresh sessions are stacked too,
padded at the end to the longest of their group. Anything else (a lone step, a rewind,
sliding-window layers) runs on its own, on exactly the path a single session takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from swarmshard.server.shard import SpanBackend


def supports_stacking(config) -> bool:
    """Stacked decoding masks every layer alike, so it needs full attention in every layer."""
    if getattr(config, "sliding_window", None):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)


class _StackedCache(Cache):
    """Presents several sessions' caches as one padded batch to the model's attention layers."""

    def __init__(self, caches: Sequence[DynamicCache]) -> None:
        super().__init__(layers=[])
        self.caches = list(caches)
        self.kv_lengths: list[int] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = [], []
        for row, cache in enumerate(self.caches):
            k, v = cache.update(key_states[row : row + 1], value_states[row : row + 1], layer_idx)
            keys.append(k)
            values.append(v)
        self.kv_lengths = [k.shape[-2] for k in keys]
        longest = max(self.kv_lengths)
        batch_k = key_states.new_zeros(len(keys), keys[0].shape[1], longest, keys[0].shape[-1])
        batch_v = value_states.new_zeros(len(values), values[0].shape[1], longest, values[0].shape[-1])
        for row, (k, v) in enumerate(zip(keys, values)):
            batch_k[row, :, : k.shape[-2]] = k[0]
            batch_v[row, :, : v.shape[-2]] = v[0]
        return batch_k, batch_v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(c.get_seq_length(layer_idx) for c in self.caches)


def stacked_decode(backend: SpanBackend, hidden: Sequence[torch.Tensor], caches: Sequence[DynamicCache]) -> list[torch.Tensor]:
    """One forward pass for one new token of each session (each ``hidden`` is (1, 1, H))."""
    lengths = [c.get_seq_length() for c in caches]
    longest = max(lengths) + 1
    batch = torch.cat(list(hidden), dim=0).to(backend.dtype)
    positions = torch.tensor(lengths).unsqueeze(1)
    allowed = torch.arange(longest).unsqueeze(0) <= positions  # (B, longest): own tokens and the new one
    mask = allowed[:, None, None, :]
    if backend.config._attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, dtype=batch.dtype).masked_fill(~mask, torch.finfo(batch.dtype).min)
    with torch.inference_mode():
        out = backend.module(
            inputs_embeds=batch, position_ids=positions, past_key_values=_StackedCache(caches),
            attention_mask=mask, use_cache=True,
        ).last_hidden_state
    return [out[row : row + 1] for row in range(out.shape[0])]


def stacked_prefill(backend: SpanBackend, hidden: Sequence[torch.Tensor], caches: Sequence[DynamicCache]) -> list[torch.Tensor]:
    """One forward pass for the prompts of fresh sessions; splits the cache back per session.

    Shorter prompts are padded at the end to the longest: attention is causal, so a prompt's own
    positions never see its padding, and each session keeps only its own keys and values.
    """
    lengths = [h.shape[1] for h in hidden]
    longest = max(lengths)
    batch = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, longest - h.shape[1])) for h in hidden], dim=0)
    shared = backend.new_cache()
    out = backend.forward(batch, 0, shared)
    for row, (cache, length) in enumerate(zip(caches, lengths)):
        for layer_idx, layer in enumerate(shared.layers):
            cache.update(layer.keys[row : row + 1, :, :length], layer.values[row : row + 1, :, :length], layer_idx)
    return [out[row : row + 1, :length] for row, length in enumerate(lengths)]


def prefill_groups(lengths: Sequence[int], max_padding: float = 0.5) -> list[list[int]]:
    """Indices of prompts to stack, by length: a group's padding stays within ``max_padding`` of
    its real tokens (a long prompt is not stacked with many short ones)."""
    groups: list[list[int]] = []
    total = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups:
            group = groups[-1]
            padded = lengths[index] * (len(group) + 1)  # sorted: this one is the longest so far
            if padded <= (1.0 + max_padding) * (total + lengths[index]):
                group.append(index)
                total += lengths[index]
                continue
        groups.append([index])
        total = lengths[index]
    return groups


_GATHER_YIELDS = 3
# Sessions due for a decode step are waited for at most this long, and at most this share of a
# round's compute: a client's lockstep convoy reaches a server spread over ~5-15 ms (one client
# thread per session wakes, samples, embeds and sends). bench/concurrency.py, 16 sessions: 5 ms
# 63.9 tok/s, 15 ms 67.7 (one chain); rounds of 16 instead of mostly rounds of one.
_CONVOY_WAIT_S = 0.015
_CONVOY_WAIT_SHARE = 0.5


@dataclass
class _Work:
    hidden: torch.Tensor
    position: int
    cache: DynamicCache
    future: asyncio.Future = field(repr=False)


class StepBatcher:
    """Queues inference steps and runs them in rounds, stacking what can be stacked."""

    def __init__(self, backend: SpanBackend, executor: Executor, max_batch: int = 64, inline: bool = True) -> None:
        self.backend = backend
        self.executor = executor
        # Inline compute (on the event loop) saves two thread wake-ups per step, which dominate a
        # decode step's overhead on a loaded machine; steps arriving meanwhile wait in the sockets
        # and are taken together in the next round.
        self.inline = inline
        self.max_batch = max_batch
        self.stackable = supports_stacking(backend.config)
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.rounds = 0
        self.stacked_steps = 0
        self.waited_s = 0.0
        self._last_step: dict[int, float] = {}  # cache -> time of its last decode step
        self._step_gap_s = 0.0  # smoothed time between two decode steps of one session
        self._round_s = 0.0  # smoothed compute time of a round

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, hidden: torch.Tensor, position: int, cache: DynamicCache) -> torch.Tensor:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Work(hidden, position, cache, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            work = [await self._queue.get()]
            for _ in range(_GATHER_YIELDS):  # let handlers with messages already read enqueue theirs
                await asyncio.sleep(0)
            while not self._queue.empty() and len(work) < self.max_batch:
                work.append(self._queue.get_nowait())
            await self._wait_for_convoy(work)
            work = [w for w in work if not w.future.cancelled()]
            if not work:
                continue
            groups = self._group(work)
            self.rounds += 1
            began = loop.time()
            if self.inline:
                results = self._compute(groups)
            else:
                results = await loop.run_in_executor(self.executor, self._compute, groups)
            now = loop.time()
            spent = now - began
            self._round_s = spent if not self._round_s else 0.8 * self._round_s + 0.2 * spent
            self._note_steps(work, now)
            for group, outcome in zip(groups, results):
                for item, value in zip(group, outcome if isinstance(outcome, list) else [outcome] * len(group)):
                    if item.future.done():
                        continue
                    if isinstance(value, BaseException):
                        item.future.set_exception(value)
                    else:
                        item.future.set_result(value)

    def _note_steps(self, work: list[_Work], now: float) -> None:
        for w in work:
            if w.hidden.shape[1] != 1 or w.position == 0:
                continue
            key = id(w.cache)
            last = self._last_step.get(key)
            if last is not None:
                gap = now - last
                self._step_gap_s = gap if not self._step_gap_s else 0.9 * self._step_gap_s + 0.1 * gap
            self._last_step[key] = now
        if len(self._last_step) > 4 * self.max_batch:  # forget sessions that stopped stepping
            horizon = now - 4 * self._step_gap_s
            self._last_step = {k: t for k, t in self._last_step.items() if t >= horizon}

    async def _wait_for_convoy(self, work: list[_Work]) -> None:
        """A client steps its concurrent sessions in lockstep (client/rows.py), but their steps
        arrive a few ms apart; wait briefly for the sessions that are due (they stepped within
        the usual gap) so they share this round instead of trailing in rounds of one."""
        if not self.stackable or not self._last_step or not any(w.hidden.shape[1] == 1 for w in work):
            return
        loop = asyncio.get_running_loop()
        began = loop.time()
        queued = {id(w.cache) for w in work}
        due = {k for k, t in self._last_step.items() if began - t < 1.5 * self._step_gap_s} - queued
        if not due:
            return
        deadline = began + min(_CONVOY_WAIT_S, _CONVOY_WAIT_SHARE * self._round_s)
        while due and len(work) < self.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), left)
            except asyncio.TimeoutError:
                break
            work.append(item)
            due.discard(id(item.cache))
        self.waited_s += loop.time() - began

    def _group(self, work: list[_Work]) -> list[list[_Work]]:
        """Decode steps together, fresh prompts of similar lengths together, everything else alone."""
        if not self.stackable:
            return [[w] for w in work]
        decode: list[_Work] = []
        prefill: list[_Work] = []
        alone: list[list[_Work]] = []
        seen: set[int] = set()
        for w in work:
            fresh = w.position == 0 and w.cache.get_seq_length() == 0
            if id(w.cache) in seen or w.hidden.shape[0] != 1:
                alone.append([w])
            elif w.hidden.shape[1] == 1 and w.position == w.cache.get_seq_length() and w.position > 0:
                decode.append(w)
            elif fresh:
                prefill.append(w)
            else:
                alone.append([w])
            seen.add(id(w.cache))
        groups = [decode] if decode else []
        stacked = [[prefill[i] for i in g] for g in prefill_groups([w.hidden.shape[1] for w in prefill])]
        return groups + stacked + alone

    def _compute(self, groups: list[list[_Work]]) -> list:
        results: list = []
        for group in groups:
            try:
                if len(group) == 1:
                    w = group[0]
                    results.append([self.backend.forward(w.hidden, w.position, w.cache)])
                elif group[0].position == 0:
                    results.append(stacked_prefill(self.backend, [w.hidden for w in group], [w.cache for w in group]))
                    self.stacked_steps += len(group)
                else:
                    results.append(stacked_decode(self.backend, [w.hidden for w in group], [w.cache for w in group]))
                    self.stacked_steps += len(group)
            except Exception as exc:  # a failure answers every step of its group, the server goes on
                results.append(exc)
        return results
