"""Named stage values on the wire: encode on one side, check against the plan's specs on the other.

A graph stage reads and sends several named values (tensors, tuples of tensors, Python scalars).
They travel as a list of :class:`StageValue` in the metadata plus the message's raw tensors in the
same order. Decoding checks every name, kind, dtype and shape against the plan's
:class:`ValueSpec` before any value reaches a module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from swarmshard.core.graph_plan import ValueSpec
from swarmshard.transport.schemas import WIRE_DTYPES, StageValue, TensorLimits, WireError, dtype_name

# stage boundaries carry masks, indices and scalars of any rank, not just hidden states
STAGE_LIMITS = TensorLimits(dtypes=tuple(WIRE_DTYPES), min_dims=0, max_dims=16)


def encode_values(names: Sequence[str], values: Sequence[Any]) -> tuple[list[StageValue], list[torch.Tensor]]:
    """Metadata entries and the flat tensor list for ``values`` named ``names``."""
    entries: list[StageValue] = []
    tensors: list[torch.Tensor] = []
    for name, value in zip(names, values, strict=True):
        if isinstance(value, torch.Tensor):
            dtype_name(value.dtype)  # refuses dtypes the wire cannot carry, naming them
            entries.append(StageValue(name=name))
            tensors.append(value)
        elif isinstance(value, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in value):
            entries.append(StageValue(name=name, kind="tuple", tensors=len(value)))
            tensors.extend(value)
        elif isinstance(value, (bool, int, float)):
            entries.append(StageValue(name=name, kind="scalar", tensors=0, scalar=value))
        else:
            raise WireError(f"value {name!r} is a {type(value).__name__}, which cannot travel between stages")
    return entries, tensors


def decode_values(entries: Sequence[StageValue], tensors: Sequence[torch.Tensor],
                  expected: Sequence[ValueSpec], what: str) -> list[Any]:
    """The values of ``entries`` in ``expected``'s order, each checked against its spec.

    ``what`` names the stage side in errors (e.g. "stage 1 takes").
    """
    want = [spec.name for spec in expected]
    got = [entry.name for entry in entries]
    if sorted(got) != sorted(want):
        missing = [n for n in want if n not in got]
        extra = [n for n in got if n not in want]
        detail = "; ".join(part for part in (f"missing {missing}" if missing else "",
                                             f"unexpected {extra}" if extra else "") if part)
        raise WireError(f"{what} values {want}, got {got} ({detail})")
    declared = sum(entry.tensors for entry in entries)
    if declared != len(tensors):
        raise WireError(f"values declare {declared} tensors, the message carries {len(tensors)}")
    specs = {spec.name: spec for spec in expected}
    decoded: dict[str, Any] = {}
    offset = 0
    for entry in entries:
        spec = specs[entry.name]
        part = list(tensors[offset: offset + entry.tensors])
        offset += entry.tensors
        if entry.kind != spec.kind:
            raise WireError(f"value {entry.name!r} must be a {spec.kind}, got a {entry.kind}")
        if spec.kind == "scalar":
            if type(entry.scalar).__name__ != spec.scalar_type:
                raise WireError(f"value {entry.name!r} must be a {spec.scalar_type}, "
                                f"got {type(entry.scalar).__name__} {entry.scalar!r}")
            decoded[entry.name] = entry.scalar
            continue
        if len(part) != len(spec.shapes):
            raise WireError(f"value {entry.name!r} must hold {len(spec.shapes)} tensors, got {len(part)}")
        for k, (tensor, shape, dtype) in enumerate(zip(part, spec.shapes, spec.dtypes)):
            where = entry.name if spec.kind == "tensor" else f"{entry.name}[{k}]"
            got_dtype = str(tensor.dtype).removeprefix("torch.")
            if got_dtype != dtype or list(tensor.shape) != shape:
                raise WireError(f"value {where!r} must be {dtype} of shape {tuple(shape)}, "
                                f"got {got_dtype} of shape {tuple(tensor.shape)}")
        decoded[entry.name] = part[0] if spec.kind == "tensor" else tuple(part)
    return [decoded[name] for name in want]
