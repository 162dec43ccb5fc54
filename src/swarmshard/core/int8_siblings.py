"""Int8 linear layers that read the same input, run as one matmul (q/k/v, gate/up).

At batch 1 an :class:`Int8Linear` spends most of its time in per-op overhead (finding outlier
features, quantizing the input, rescaling), not in the int8 matmul. Layers that receive the same
input tensor (a decoder block's query/key/value projections; its gate and up projections) can
share all of it: their int8 rows are concatenated into one weight, and the first layer called
computes every sibling's output in one pass; the others return their part.

Which layers are siblings is found by running the module once (``probe``) and recording which
tensor object each layer received, so nothing depends on an architecture's attribute names. The
members keep being :class:`Int8Linear` modules with their own buffers, now views into the shared
weight: no memory is added. The result equals what the layers compute separately up to float32
rounding (the decomposition is per input row, identical for all siblings).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from swarmshard.core.compression import Int8Linear, int8_mixed_linear

__all__ = ["Int8Siblings", "fuse_int8_siblings"]


@dataclass
class _Pending:
    """Outputs computed for ``source`` that siblings have not collected yet."""

    source: Tensor
    version: int | None
    outputs: list[Tensor]
    collected: set[int] = field(default_factory=set)


def _version(t: Tensor) -> int | None:
    # Inference tensors carry no version counter; the probe checked that siblings see one value.
    return None if t.is_inference() else t._version


class Int8Siblings:
    """One int8 weight for several layers fed the same input; installed as each layer's ``siblings``."""

    def __init__(self, members: list[Int8Linear]) -> None:
        first = members[0]
        self.members = members
        self.threshold = first.threshold
        self.in_features = first.in_features
        self.weight_int8 = torch.cat([m.weight_int8 for m in members])
        self.weight_scale = torch.cat([m.weight_scale for m in members])
        has_bias = any(m.bias is not None for m in members)
        self.bias = (
            torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in members])
            if has_bias
            else None
        )
        self.bounds: list[tuple[int, int]] = []
        begin = 0
        for slot, m in enumerate(members):
            end = begin + m.out_features
            self.bounds.append((begin, end))
            # The member's buffers become views of the shared tensors: state_dict and sizes still
            # read per layer, and the separate copies are freed.
            m.weight_int8 = self.weight_int8[begin:end]
            m.weight_scale = self.weight_scale[begin:end]
            if m.bias is not None:
                m.bias = self.bias[begin:end]
            m.siblings = self
            m._sibling_slot = slot  # type: ignore[assignment]
            begin = end
        self._local = threading.local()

    def __getstate__(self) -> dict[str, object]:  # copy.deepcopy: the thread-local scratch is not copied
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __call__(self, member: Int8Linear, x: Tensor) -> Tensor:
        slot: int = member._sibling_slot  # type: ignore[assignment]
        pending: _Pending | None = getattr(self._local, "pending", None)
        if (
            pending is not None
            and pending.source is x
            and pending.version == _version(x)
            and slot not in pending.collected
        ):
            pending.collected.add(slot)
            if len(pending.collected) == len(self.members):
                self._local.pending = None
            return pending.outputs[slot]
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        y = int8_mixed_linear(rows, self.weight_int8, self.weight_scale, self.bias, self.threshold)
        outputs = []
        for begin, end in self.bounds:
            part = y[:, begin:end]
            outputs.append(part.contiguous().view(*lead, end - begin).to(x.dtype))
        self._local.pending = _Pending(x, _version(x), outputs, {slot})
        return outputs[slot]


def fuse_int8_siblings(module: nn.Module, probe: Callable[[], object]) -> int:
    """Group ``module``'s Int8Linear layers that read the same input; returns the number of groups.

    ``probe`` runs ``module`` once. A layer joins a group only if it was called exactly once,
    without calibrated float32 columns, and its siblings saw the same values (no in-place change
    between their calls); anything else stays as it was.
    """
    layers = [m for m in module.modules() if isinstance(m, Int8Linear) and m.siblings is None]
    calls: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for m in layers}

    def record(layer: nn.Module, args: tuple[object, ...]) -> None:
        x = args[0]
        if isinstance(x, Tensor):
            calls[id(layer)].append((x, x.detach().clone()))

    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        with torch.no_grad():
            probe()
    finally:
        for h in handles:
            h.remove()
    # Siblings: layers called once on the same tensor object holding the same values (a module
    # that changes its input in place between two calls splits them into separate groups).
    by_input: dict[int, list[tuple[Tensor, list[Int8Linear]]]] = {}
    for m in layers:
        if len(calls[id(m)]) != 1 or m.fp_columns.numel():
            continue
        x, value = calls[id(m)][0]
        classes = by_input.setdefault(id(x), [])
        for seen_value, members in classes:
            if torch.equal(seen_value, value):
                members.append(m)
                break
        else:
            classes.append((value, [m]))
    groups = 0
    for members in (members for classes in by_input.values() for _, members in classes):
        compatible = [m for m in members if m.threshold == members[0].threshold
                      and m.in_features == members[0].in_features]
        if len(compatible) >= 2:
            Int8Siblings(compatible)
            groups += 1
    return groups
