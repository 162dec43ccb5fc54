"""Activation codecs on the wire: framing round-trips, negotiation rules, and strict refusals.

Every malformed compressed payload must be refused with a `WireError` that names the problem,
before any of its bytes are interpreted.
"""

from __future__ import annotations

import json

import pytest
import torch

from swarmshard.core.compression import CODECS
from swarmshard.transport.codecs import (
    CODECS_KEY,
    accepted_codecs,
    buffer_nbytes,
    check_codec,
    decode_tensor,
    encode_tensor,
)
from swarmshard.transport.p2p import message_to_proto, proto_to_message
from swarmshard.transport.schemas import (
    WIRE_CODECS,
    Forward,
    Message,
    OpenSession,
    TensorLimits,
    WireError,
    WireTensor,
    parse_meta,
)

STEP = {"kind": "step", "step": 0, "position": 0}


def _hidden(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _roundtrip(message: Message, limits: TensorLimits | None = None) -> Message:
    proto = message_to_proto(message, response=False)
    wire = type(proto).FromString(proto.SerializeToString())  # what actually crosses the network
    return proto_to_message(wire, limits or TensorLimits())


@pytest.mark.parametrize("codec", WIRE_CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 96), (1, 3, 65)])  # 195 values: a partial block, unaligned scales
def test_every_codec_roundtrips_through_a_message(codec, dtype, shape):
    x = _hidden(*shape).to(dtype)
    back = _roundtrip(Message(meta=STEP, tensors=[encode_tensor(x, codec)]))
    assert back.meta == STEP and back.codecs == [codec]
    y = back.tensors[0]
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, CODECS[codec].decode(CODECS[codec].encode(x)))  # exactly the core codec's result


def test_plain_tensors_keep_the_old_wire_format():
    """Codec ``none`` adds nothing to the metadata, so old and new peers read each other."""
    proto = message_to_proto(Message(meta=STEP, tensors=[_hidden(1, 3, 8)]), response=False)
    assert json.loads(proto.metadata) == STEP
    encoded = message_to_proto(Message(meta=STEP, tensors=[encode_tensor(_hidden(1, 3, 8), "fp16")]), False)
    assert json.loads(encoded.metadata)[CODECS_KEY] == [{"codec": "fp16", "block_size": 0}]


def test_wire_bytes_shrink_as_promised():
    x = _hidden(1, 512, 576)
    sizes = {c: len(encode_tensor(x, c).buffer) for c in WIRE_CODECS}
    assert sizes["none"] == x.numel() * 4
    assert sizes["fp16"] / sizes["none"] == 0.5
    assert sizes["blockwise8"] / sizes["none"] <= 0.27
    assert sizes["blockwise4"] / sizes["none"] <= 0.15
    for codec in WIRE_CODECS:
        assert sizes[codec] == buffer_nbytes(codec, x.shape, "float32", 64 if codec.startswith("block") else 0)


def test_ids_travel_plain_and_refuse_lossy_codecs():
    ids = torch.arange(6).reshape(1, 6)
    back = _roundtrip(Message(meta={}, tensors=[encode_tensor(ids)]), TensorLimits(dtypes=("int64",)))
    assert torch.equal(back.tensors[0], ids)
    with pytest.raises(WireError, match="float tensors only"):
        encode_tensor(ids, "blockwise8")


def test_unencodable_values_are_named_errors():
    with pytest.raises(WireError, match="overflow float16"):
        encode_tensor(torch.full((1, 2, 4), 1e6), "fp16")
    with pytest.raises(WireError, match="non-finite"):
        encode_tensor(torch.tensor([[[1.0, float("nan")]]]), "blockwise8")
    with pytest.raises(WireError, match="unknown wire codec 'zstd'"):
        encode_tensor(_hidden(1, 1, 4), "zstd")


def test_negotiation_cap_accepts_smaller_codecs_only():
    assert accepted_codecs("none") == WIRE_CODECS
    assert accepted_codecs("fp16") == ("fp16", "blockwise8", "blockwise4")
    assert accepted_codecs("blockwise8") == ("blockwise8", "blockwise4")
    assert accepted_codecs("blockwise4") == ("blockwise4",)
    with pytest.raises(ValueError, match="unknown wire codec 'int3'; known: none, fp16"):
        check_codec("int3")
    # what a request asks back is validated with the metadata
    assert parse_meta(Forward, {"model_id": "m", "start": 0, "end": 1, "reply_codec": "blockwise4"}).reply_codec == "blockwise4"
    with pytest.raises(WireError, match="reply_codec"):
        parse_meta(OpenSession, {"session_id": "abcdefgh12", "model_id": "m", "start": 0, "end": 1,
                                 "max_length": 4, "reply_codec": "gzip"})


def test_receiver_refuses_codecs_it_does_not_accept():
    limits = TensorLimits(codecs=accepted_codecs("blockwise8"))
    ok = _roundtrip(Message(meta=STEP, tensors=[encode_tensor(_hidden(1, 2, 64), "blockwise4")]), limits)
    assert ok.codecs == ["blockwise4"]
    for codec in ("none", "fp16"):
        with pytest.raises(WireError, match=f"tensor codec '{codec}' not accepted here .accepted: blockwise8, blockwise4"):
            _roundtrip(Message(meta=STEP, tensors=[encode_tensor(_hidden(1, 2, 64), codec)]), limits)


def _good(codec: str = "blockwise8", shape: tuple[int, ...] = (1, 3, 64)) -> WireTensor:
    return encode_tensor(_hidden(*shape), codec)


def _replace(wire: WireTensor, **changes) -> WireTensor:
    fields = dict(buffer=wire.buffer, shape=wire.shape, dtype=wire.dtype, codec=wire.codec, block_size=wire.block_size)
    return WireTensor(**{**fields, **changes})


@pytest.mark.parametrize(
    "wire, error",
    [
        (_replace(_good(), buffer=_good().buffer[:-1]), r"blockwise8 tensor of shape \[1, 3, 64\] float32 with block size 64 needs 204 buffer bytes, got 203"),
        (_replace(_good(), buffer=_good().buffer + b"\0"), "needs 204 buffer bytes, got 205"),
        # 64 features, 5 wide: 8 bitmap + 96 code + 8 low-nibble bytes, 3 + 1 bfloat16 scales
        (_replace(_good("blockwise4"), buffer=_good("blockwise4").buffer[:-4]), "blockwise4 tensor .* needs 120 buffer bytes, got 116"),
        (_replace(_good(), block_size=32), "with block size 32 needs 216 buffer bytes, got 204"),
        (_replace(_good(), block_size=0), "needs a block size in 1..65536, got 0"),
        (_replace(_good("fp16"), block_size=64), "codec 'fp16' takes no block size"),
        (_replace(_good("none"), block_size=64), "codec 'none' takes no block size"),
        (_replace(_good("fp16"), buffer=_good("fp16").buffer[:10]), "fp16 tensor of shape .* needs 384 buffer bytes, got 10"),
        (_replace(_good(), shape=(1, 3, 65)), r"shape \[1, 3, 65\] float32 with block size 64 needs 211"),
        (_replace(_good(), shape=(1, 1, 1, 1, 192)), "shape .* is malformed"),
        (_replace(_good(), shape=(1, -3, 64)), "shape .* is malformed"),
        (_replace(_good(), dtype="int64"), "dtype 'int64' not accepted for codec 'blockwise8'"),
        (_replace(_good(), dtype="complex64"), "dtype 'complex64' not accepted"),
        (_replace(_good(), codec="lz4"), "unknown wire codec 'lz4'"),
    ],
)
def test_malformed_payloads_are_refused_by_name(wire, error):
    with pytest.raises(WireError, match=error):
        decode_tensor(wire, TensorLimits())


def _with_scales(wire: WireTensor, scales: torch.Tensor) -> WireTensor:
    n_codes = len(wire.buffer) - scales.numel() * 4
    return _replace(wire, buffer=wire.buffer[:n_codes] + scales.to(torch.float32).numpy().tobytes())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_block_scales_are_refused(bad):
    wire = _good()
    scales = torch.ones(3)
    scales[1] = bad
    with pytest.raises(WireError, match="malformed blockwise8 tensor: .*scales must be finite and non-negative"):
        decode_tensor(_with_scales(wire, scales), TensorLimits())


def test_bad_blockwise4_feature_bitmap_is_refused():
    wire = _good("blockwise4")  # (1, 3, 64): the first 8 bytes mark the 5 wide features
    bitmap = bytearray(wire.buffer[:8])
    bitmap[next(i for i, b in enumerate(bitmap) if b)] = 0
    with pytest.raises(WireError, match="malformed blockwise4 tensor: .*bitmap must mark 5 of 64 features"):
        decode_tensor(_replace(wire, buffer=bytes(bitmap) + wire.buffer[8:]), TensorLimits())


def test_decoded_size_is_bounded_before_allocation():
    """4-bit codes expand 8x when decoded: the limit applies to what they decode to."""
    wire = _good("blockwise4", (1, 16, 64))  # 4096 bytes decoded, 576 on the wire
    with pytest.raises(WireError, match="decodes to 4096 bytes, over the 4000-byte limit"):
        decode_tensor(wire, TensorLimits(max_bytes=4000))
    two = Message(meta=STEP, tensors=[wire, wire])
    with pytest.raises(WireError, match="message decodes to over 6000 tensor bytes"):
        _roundtrip(two, TensorLimits(max_bytes=6000))


def test_codec_headers_in_metadata_are_validated():
    proto = message_to_proto(Message(meta=STEP, tensors=[_good()]), response=False)
    cases = {
        json.dumps({**STEP, CODECS_KEY: []}): "must list one codec per tensor \\(1\\), got 0 entries",
        json.dumps({**STEP, CODECS_KEY: "blockwise8"}): "must list one codec per tensor \\(1\\), got str",
        json.dumps({**STEP, CODECS_KEY: [{"codec": "blockwise8", "block_size": 64, "x": 1}]}): "x: Extra inputs",
        json.dumps({**STEP, CODECS_KEY: [{"codec": "pickle", "block_size": 64}]}): "codec: Input should be",
        json.dumps({**STEP, CODECS_KEY: [{"codec": "blockwise8", "block_size": 1 << 20}]}): "block_size",
        json.dumps({**STEP, CODECS_KEY: [["blockwise8", 64]]}): r"__codecs__\[0\]",
        json.dumps(STEP): "buffer holds 204 bytes, shape .1, 3, 64. float32 needs 768",  # header stripped
    }
    for metadata, error in cases.items():
        proto.metadata = metadata.encode()
        with pytest.raises(WireError, match=error):
            proto_to_message(proto, TensorLimits())


def test_sender_cannot_forge_the_reserved_key():
    with pytest.raises(WireError, match="reserved"):
        message_to_proto(Message(meta={**STEP, CODECS_KEY: []}, tensors=[_hidden(1, 1, 4)]), response=False)


def test_empty_tensors_roundtrip():
    for codec in WIRE_CODECS:
        back = _roundtrip(Message(meta=STEP, tensors=[encode_tensor(torch.zeros(1, 0, 64), codec)]))
        assert back.tensors[0].shape == (1, 0, 64)
