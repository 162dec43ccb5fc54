"""Stage forwards on the wire: named values of several kinds, checked against the plan's specs."""

from __future__ import annotations

import pytest
import torch

from swarmshard.core.graph_plan import describe_value
from swarmshard.transport.p2p import message_to_proto, proto_to_message
from swarmshard.transport.schemas import Message, StageForward, WireError, parse_meta, tensor_from_wire
from swarmshard.transport.stage_wire import STAGE_LIMITS, decode_values, encode_values

VALUES = {
    "hidden": torch.randn(2, 3, 5),
    "mask": torch.tensor([[True, False, True]]),
    "index": torch.tensor([[3, 1], [0, 2]]),
    "topk": (torch.randn(2, 2), torch.tensor([[1, 0], [0, 1]])),
    "total": torch.tensor(4.5),  # 0-dim
    "size": 7,
}
SPECS = [describe_value(name, value) for name, value in VALUES.items()]


def _meta(values) -> dict:
    return {"kind": "stage_forward", "model_id": "graph-x", "start": 1, "end": 2,
            "values": [v.model_dump(exclude_none=True) for v in values]}


def test_values_of_every_kind_roundtrip_through_the_wire():
    entries, tensors = encode_values(list(VALUES), list(VALUES.values()))
    proto = message_to_proto(Message(meta=_meta(entries), tensors=tensors), response=False)
    back = proto_to_message(proto, STAGE_LIMITS)
    request = parse_meta(StageForward, back.meta)
    decoded = decode_values(request.values, back.tensors, SPECS[::-1], "stage 1 takes")  # spec order wins
    for (name, want), got in zip(reversed(VALUES.items()), decoded):
        if isinstance(want, tuple):
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(want, got)), name
        elif isinstance(want, torch.Tensor):
            assert torch.equal(want, got) and want.dtype == got.dtype, name
        else:
            assert got == want, name


@pytest.mark.parametrize("values, message", [
    ([{"name": "../etc"}], "values.0.name"),
    ([{"name": "a"}, {"name": "a"}], "value names repeat"),
    ([{"name": "a", "tensors": 2}], "takes exactly 1 tensor"),
    ([{"name": "a", "kind": "scalar", "tensors": 0}], "needs 'scalar'"),
    ([{"name": "a", "scalar": 3}], "only scalar values carry"),
    ([{"name": "a", "kind": "pickle"}], "values.0.kind"),
])
def test_malformed_stage_metadata_is_named(values, message):
    meta = {"kind": "stage_forward", "model_id": "g", "start": 0, "end": 1, "values": values}
    with pytest.raises(WireError, match=message):
        parse_meta(StageForward, meta)


def _decode(values: dict, tensors=None, entries=None):
    got_entries, got_tensors = encode_values(list(values), list(values.values()))
    return decode_values(entries if entries is not None else got_entries,
                         tensors if tensors is not None else got_tensors, SPECS[:2], "stage 1 takes")


def test_values_that_break_the_contract_are_named():
    good = {"hidden": VALUES["hidden"], "mask": VALUES["mask"]}
    with pytest.raises(WireError, match=r"missing \['mask'\]"):
        _decode({"hidden": VALUES["hidden"]})
    with pytest.raises(WireError, match=r"unexpected \['extra'\]"):
        _decode({**good, "extra": torch.zeros(1)})
    with pytest.raises(WireError, match=r"'hidden' must be float32 of shape \(2, 3, 5\), got float32 of shape \(2, 3, 4\)"):
        _decode({**good, "hidden": torch.zeros(2, 3, 4)})
    with pytest.raises(WireError, match="'mask' must be bool"):
        _decode({**good, "mask": torch.zeros(1, 3, dtype=torch.int64)})
    with pytest.raises(WireError, match="declare 2 tensors, the message carries 1"):
        _decode(good, tensors=[VALUES["hidden"]])
    with pytest.raises(WireError, match="must be a tensor, got a scalar"):
        _decode({**good, "hidden": 3})


def test_bool_buffers_must_hold_zero_or_one():
    assert tensor_from_wire(b"\x00\x01", [2], "bool", STAGE_LIMITS).tolist() == [False, True]
    with pytest.raises(WireError, match="bool tensor holds bytes"):
        tensor_from_wire(b"\x00\x02", [2], "bool", STAGE_LIMITS)


def test_boundary_values_that_cannot_travel_are_refused_at_plan_time():
    from swarmshard.core.graph_plan import PlanMismatch

    with pytest.raises(PlanMismatch, match="value 'shape' crossing a stage boundary is a Size"):
        describe_value("shape", torch.Size([2, 3]))
