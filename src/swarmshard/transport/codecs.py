"""Activation codecs on the wire: how an encoded tensor is framed, checked and restored.

The maths lives in `core/compression` (SPEC §4); this module only frames it. A float tensor travels
as one `runtime_pb2.Tensor` whose ``size``/``dtype`` are those of the *decoded* tensor and whose
``buffer`` is the codec's payload:

- ``none``: the raw values (exactly what the transport sent before codecs existed);
- ``fp16``: the values cast to float16;
- ``blockwise8``: one uint8 code per value, then one little-endian float32 absmax per block of
  ``block_size`` values;
- ``blockwise4`` (`compression.SplitBlockwiseCodec`): a bitmap of the tensor's "wide" features
  (``features // 12`` of its last dimension, sent with 8-bit codes), one 4-bit code per value (two
  per byte, the first in the low nibble; a wide value's slot holds the high nibble of its 8-bit
  code), the low nibbles of the wide values, then little-endian bfloat16 block scales (those of the
  4-bit codes, then those of the wide values). The lengths follow from shape and block size
  (`SplitBlockwiseCodec.layout`); the bitmap must mark exactly ``features // 12`` features.

Each message's JSON metadata lists the codec and block size of each of its tensors under
`CODECS_KEY` (absent when every tensor is ``none``), so a message is self-describing and the
receiver checks everything before allocating: the codec is one it accepts, the block size is
sane, and the buffer length equals exactly what the declared shape, dtype, codec and block size
need. Nothing is unpickled.

Negotiation (see server/node.py): the sender picks the codec of what it sends; a request asks
for the codec of its reply (``reply_codec``); a server's ``--wire-codec C`` is its default reply
codec and its cap: it accepts ``C`` and every codec with fewer bytes per value (`accepted_codecs`).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from swarmshard.core import compression
from swarmshard.transport.schemas import (
    WIRE_CODECS,
    WIRE_DTYPES,
    TensorLimits,
    WireCodec,
    WireError,
    WireTensor,
    _Strict,
    dtype_name,
    parse_meta,
    tensor_from_wire,
    tensor_to_wire,
)

CODECS_KEY = "__codecs__"  # reserved metadata key: one `TensorCodec` per tensor
MAX_BLOCK_SIZE = 1 << 16
BLOCKWISE = ("blockwise8", "blockwise4")
_FLOAT_WIRE_DTYPES = ("float32", "float16", "bfloat16")

if set(WIRE_CODECS) != set(compression.CODECS):  # a codec added to core must be framed here too
    raise ImportError(f"wire codecs {WIRE_CODECS} differ from core codecs {sorted(compression.CODECS)}")


class TensorCodec(_Strict):
    """How one tensor of a message is encoded (an entry of the metadata's `CODECS_KEY` list)."""

    codec: WireCodec
    block_size: int = Field(0, ge=0, le=MAX_BLOCK_SIZE)


def check_codec(name: str) -> str:
    """``name`` if it is a wire codec, else a ValueError listing the known ones."""
    if name not in WIRE_CODECS:
        raise ValueError(f"unknown wire codec {name!r}; known: {', '.join(WIRE_CODECS)}")
    return name


def accepted_codecs(cap: str) -> tuple[str, ...]:
    """What a server started with ``--wire-codec cap`` accepts: ``cap`` and every codec after it.

    The flag is a bandwidth cap (an operator on a thin link says "at most 8 bits a value"), so the
    default ``none`` accepts everything and keeps the uncompressed behaviour.
    """
    return WIRE_CODECS[WIRE_CODECS.index(check_codec(cap)) :]


def buffer_nbytes(codec: str, shape: tuple[int, ...] | list[int], dtype: str, block_size: int = 0) -> int:
    """Exact buffer length of a tensor of ``shape``/``dtype`` encoded with ``codec``."""
    n = math.prod(shape)
    if codec == "none":
        return n * WIRE_DTYPES[dtype].itemsize
    if codec == "fp16":
        return 2 * n
    code_bytes, n_scales, scale_dtype = _blockwise_parts(codec, shape, block_size)
    return code_bytes + n_scales * scale_dtype.itemsize


def _blockwise_parts(codec: str, shape, block_size: int) -> tuple[int, int, torch.dtype]:
    """A blockwise codec's buffer: code bytes, then this many scales of this dtype (the core
    codec's own ``scale_dtype``)."""
    core = compression.CODECS[codec]
    if codec == "blockwise4":
        layout = core.layout(tuple(shape), block_size)
        return layout.payload, layout.scales, core.scale_dtype
    n = math.prod(shape)
    return n, -(-n // block_size), core.scale_dtype


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def encode_tensor(tensor: torch.Tensor, codec: str = "none") -> WireTensor:
    """``tensor`` in its wire form under ``codec``; a tensor that cannot be encoded is a WireError.

    Non-float tensors (ids, masks) only travel as ``none``.
    """
    data = tensor.detach().cpu()
    if codec == "none":
        buffer, shape, dtype = tensor_to_wire(data)
        return WireTensor(buffer, tuple(shape), dtype)
    if codec not in WIRE_CODECS:
        raise WireError(f"unknown wire codec {codec!r}; known: {', '.join(WIRE_CODECS)}")
    dtype = dtype_name(data.dtype)
    if dtype not in _FLOAT_WIRE_DTYPES:
        raise WireError(f"codec {codec!r} encodes float tensors only, not {dtype}")
    try:
        enc = compression.encode(data, codec)
    except ValueError as exc:  # non-finite values, float16 overflow: named by the codec
        raise WireError(f"cannot encode a {dtype} tensor of shape {list(data.shape)} as {codec}: {exc}") from None
    buffer = _tensor_bytes(enc.payload)
    if enc.scales is not None:
        buffer += _tensor_bytes(enc.scales.to(compression.CODECS[codec].scale_dtype))
    return WireTensor(buffer, tuple(data.shape), dtype, codec, enc.block_size)


def decode_tensor(wire: WireTensor, limits: TensorLimits) -> torch.Tensor:
    """Check ``wire`` against ``limits`` and its own header, then restore the tensor.

    Every refusal is a WireError naming the problem; no byte is interpreted before the buffer
    length has been checked against the declared shape, dtype, codec and block size.
    """
    codec, shape, dtype = wire.codec, list(wire.shape), wire.dtype
    if codec not in WIRE_CODECS:
        raise WireError(f"unknown wire codec {codec!r}; known: {', '.join(WIRE_CODECS)}")
    if codec not in limits.codecs:
        raise WireError(f"tensor codec {codec!r} not accepted here (accepted: {', '.join(limits.codecs)})")
    if codec == "none":
        if wire.block_size:
            raise WireError(f"codec 'none' takes no block size, got {wire.block_size}")
        return tensor_from_wire(wire.buffer, shape, dtype, limits)
    if dtype not in limits.dtypes or dtype not in _FLOAT_WIRE_DTYPES:
        allowed = [d for d in limits.dtypes if d in _FLOAT_WIRE_DTYPES]
        raise WireError(f"tensor dtype {dtype!r} not accepted for codec {codec!r} (allowed: {', '.join(allowed)})")
    if not (limits.min_dims <= len(shape) <= limits.max_dims) or any(d < 0 for d in shape):
        raise WireError(f"tensor shape {shape} is malformed")
    n = math.prod(shape)
    decoded = n * WIRE_DTYPES[dtype].itemsize
    if decoded > limits.max_bytes:
        raise WireError(f"{codec} tensor decodes to {decoded} bytes, over the {limits.max_bytes}-byte limit")
    block = wire.block_size
    if codec in BLOCKWISE and not 1 <= block <= MAX_BLOCK_SIZE:
        raise WireError(f"{codec} tensor needs a block size in 1..{MAX_BLOCK_SIZE}, got {block}")
    if codec not in BLOCKWISE and block:
        raise WireError(f"codec {codec!r} takes no block size, got {block}")
    expected = buffer_nbytes(codec, shape, dtype, block)
    if len(wire.buffer) != expected:
        detail = f" with block size {block}" if block else ""
        raise WireError(
            f"{codec} tensor of shape {shape} {dtype}{detail} needs {expected} buffer bytes, got {len(wire.buffer)}"
        )
    torch_dtype = WIRE_DTYPES[dtype]
    if n == 0:
        return torch.empty(shape, dtype=torch_dtype)
    raw = bytearray(wire.buffer)  # one copy: torch tensors over it stay writable and owned
    if codec == "fp16":
        payload, scales = torch.frombuffer(raw, dtype=torch.float16), None
    else:
        n_codes, _, scale_dtype = _blockwise_parts(codec, shape, block)
        payload = torch.frombuffer(raw, dtype=torch.uint8, count=n_codes)
        scales = torch.frombuffer(raw, dtype=scale_dtype, offset=n_codes)
    enc = compression.Encoded(codec, tuple(shape), torch_dtype, block, payload, scales)
    try:
        return compression.decode(enc)
    except ValueError as exc:  # e.g. negative or non-finite scales
        raise WireError(f"malformed {codec} tensor: {exc}") from None


def header(wire: WireTensor) -> dict:
    """The metadata entry describing ``wire`` (see `CODECS_KEY`)."""
    return TensorCodec(codec=wire.codec, block_size=wire.block_size).model_dump()


def parse_headers(entries: object, n_tensors: int) -> list[TensorCodec]:
    """Validate the metadata's `CODECS_KEY` value: one well-formed entry per tensor."""
    if not isinstance(entries, list) or len(entries) != n_tensors:
        got = f"{len(entries)} entries" if isinstance(entries, list) else type(entries).__name__
        raise WireError(f"{CODECS_KEY} must list one codec per tensor ({n_tensors}), got {got}")
    headers = []
    for index, entry in enumerate(entries):
        try:
            headers.append(parse_meta(TensorCodec, entry))
        except WireError as exc:
            raise WireError(f"{CODECS_KEY}[{index}]: {exc}") from None
    return headers
