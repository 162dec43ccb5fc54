"""Wire schemas refuse malformed messages with errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from swarmshard.transport.p2p import message_to_proto, proto_to_message
from swarmshard.transport.schemas import (
    Message,
    OpenSession,
    Step,
    TensorLimits,
    WireError,
    parse_meta,
    tensor_from_wire,
    tensor_to_wire,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_roundtrip(dtype):
    x = torch.randn(2, 3, 5).to(dtype)
    buffer, shape, name = tensor_to_wire(x)
    y = tensor_from_wire(buffer, shape, name, TensorLimits())
    assert y.dtype == dtype and torch.equal(x, y)


def test_tensor_checks():
    limits = TensorLimits(max_bytes=1000)
    with pytest.raises(WireError, match="needs 24"):
        tensor_from_wire(b"\0" * 20, [2, 3], "float32", limits)
    with pytest.raises(WireError, match="'int8' not accepted"):
        tensor_from_wire(b"\0" * 6, [2, 3], "int8", limits)
    with pytest.raises(WireError, match="exceeds"):
        tensor_from_wire(b"\0" * 4004, [1001], "float32", limits)
    with pytest.raises(WireError, match="malformed"):
        tensor_from_wire(b"", [1, 1, 1, 1, 1], "float32", limits)


def test_metadata_validation_names_fields():
    with pytest.raises(WireError, match="max_length"):
        parse_meta(OpenSession, {"session_id": "abcdefgh12", "model_id": "m", "start": 0, "end": 1, "max_length": 0})
    with pytest.raises(WireError, match="session_id"):
        parse_meta(OpenSession, {"session_id": "../etc", "model_id": "m", "start": 0, "end": 1, "max_length": 4})
    with pytest.raises(WireError, match="evil: Extra inputs"):
        parse_meta(Step, {"step": 0, "position": 0, "evil": 1})


def test_proto_roundtrip_and_bad_metadata():
    message = Message(meta={"kind": "step", "step": 1, "position": 2}, tensors=[torch.ones(1, 2, 3)])
    proto = message_to_proto(message, response=False)
    back = proto_to_message(proto, TensorLimits())
    assert back.meta == message.meta and torch.equal(back.tensors[0], message.tensors[0])
    proto.metadata = b"\x80not json"
    with pytest.raises(WireError, match="not JSON"):
        proto_to_message(proto, TensorLimits())
    proto.metadata = b"[1, 2]"
    with pytest.raises(WireError, match="JSON object"):
        proto_to_message(proto, TensorLimits())
