"""Explicit wire schemas: every message is JSON metadata validated by pydantic plus raw tensors.

Nothing from the wire is ever unpickled: metadata is JSON, tensors are raw little-endian buffers with
a declared dtype and shape that are checked (dtype allowed, byte count matches, limits respected)
before any byte becomes a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

PROTOCOL_VERSION = 1
INFERENCE_RPC = "swarmshard.inference"  # stream: open a session, then steps
FORWARD_RPC = "swarmshard.forward"  # stream: stateless forwards
PING_RPC = "swarmshard.ping"  # unary, empty: round-trip time measurement
GROUP_RPC = "swarmshard.group"  # stream: steps of several sessions (opened by INFERENCE_RPC) at once
MAX_GROUP_STEPS = 256  # steps one group message may carry
MAX_RTT_PEERS = 16  # peers a server pings and announces round trips to
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
MAX_TENSOR_DIMS = 4
# Activation codecs a float tensor may travel in (maths in core/compression, framing in
# transport/codecs), ordered from most to fewest bytes per value: a server's --wire-codec
# accepts its own codec and every one after it.
WIRE_CODECS: tuple[str, ...] = ("none", "fp16", "blockwise8", "blockwise4")
WireCodec = Literal["none", "fp16", "blockwise8", "blockwise4"]
QuantMode = Literal["none", "int8"]  # weights of a served span (server/quant.py)
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    # graph stages exchange whatever their boundary values are (masks, indices, sizes)
    "float64": torch.float64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


class WireError(ValueError):
    """A message that does not match its schema; the text names what was wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OpenSession(_Strict):
    """First message of an inference stream: reserve KV cache for ``max_length`` tokens per sequence."""

    kind: str = Field("open", pattern="^open$")
    protocol: int = PROTOCOL_VERSION
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    model_id: str = Field(min_length=1, max_length=200)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    max_length: int = Field(ge=1, le=1_000_000)
    batch_size: int = Field(1, ge=1, le=1024)
    reply_codec: WireCodec | None = None  # codec of the hidden states sent back; None: the server's own


class Step(_Strict):
    """One inference step: hidden states for positions ``[position, position + seq_len)``."""

    kind: str = Field("step", pattern="^step$")
    step: int = Field(ge=0)
    position: int = Field(ge=0)


class SessionStep(_Strict):
    """One session's step inside a `GroupStep`: the session is one the sender opened on this server."""

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    step: int = Field(ge=0)
    position: int = Field(ge=0)


class GroupStep(_Strict):
    """Steps of several sessions in one message; its tensors are their hidden states, in order."""

    kind: str = Field("group_step", pattern="^group_step$")
    steps: list[SessionStep] = Field(min_length=1, max_length=MAX_GROUP_STEPS)


class Forward(_Strict):
    """A stateless forward of blocks ``[start, end)`` over positions ``[0, seq_len)`` (no cache kept)."""

    kind: str = Field("forward", pattern="^forward$")
    protocol: int = PROTOCOL_VERSION
    model_id: str = Field(min_length=1, max_length=200)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    reply_codec: WireCodec | None = None  # as in OpenSession


STAGE_VALUE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
MAX_STAGE_VALUES = 256


class StageValue(_Strict):
    """One named value of a graph-stage forward and how many of the message's tensors it takes.

    ``tensor`` takes one tensor, ``tuple`` takes ``tensors`` of them in order (e.g. ``topk``'s
    values and indices), ``scalar`` takes none and travels as JSON in ``scalar`` (e.g. a size).
    """

    name: str = Field(pattern=STAGE_VALUE_PATTERN)
    kind: Literal["tensor", "tuple", "scalar"] = "tensor"
    tensors: int = Field(1, ge=0, le=MAX_STAGE_VALUES)
    scalar: StrictBool | StrictInt | StrictFloat | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "StageValue":
        if self.kind == "tensor" and self.tensors != 1:
            raise ValueError(f"value {self.name!r}: a tensor value takes exactly 1 tensor, not {self.tensors}")
        if self.kind == "scalar" and (self.tensors != 0 or self.scalar is None):
            raise ValueError(f"value {self.name!r}: a scalar value takes 0 tensors and needs 'scalar'")
        if self.kind != "scalar" and self.scalar is not None:
            raise ValueError(f"value {self.name!r}: only scalar values carry 'scalar'")
        return self


class StageForward(_Strict):
    """A stateless forward of graph stage ``[start, end)`` (stage indices): named values in order.

    The message's tensors are the values' tensors concatenated in ``values`` order.
    """

    kind: str = Field("stage_forward", pattern="^stage_forward$")
    protocol: int = PROTOCOL_VERSION
    model_id: str = Field(min_length=1, max_length=200)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    values: list[StageValue] = Field(max_length=MAX_STAGE_VALUES)

    @model_validator(mode="after")
    def _unique(self) -> "StageForward":
        names = [v.name for v in self.values]
        if len(set(names)) != len(names):
            raise ValueError(f"value names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        return self


class Reply(_Strict):
    """Server answer: ``ok`` with optional fields, or an ``error`` naming what was wrong."""

    ok: bool
    error: str | None = None
    step: int | None = None
    cache_tokens_left: int | None = None
    values: list[StageValue] | None = Field(None, max_length=MAX_STAGE_VALUES)  # stage forward outputs


class GroupReply(_Strict):
    """Answer to a `GroupStep`: one `Reply` per step, in order; each ok one takes the next tensor.

    ``ok`` false (with ``error``) refuses the whole message, e.g. when it is malformed.
    """

    ok: bool
    error: str | None = None
    results: list[Reply] = Field(default_factory=list, max_length=MAX_GROUP_STEPS)


class ServerRecord(_Strict):
    """What a server announces in the DHT (an expiring record, refreshed periodically).

    Fields a newer server adds are ignored, so clients keep routing through a rolling upgrade.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    peer_id: str
    model_id: str
    kind: Literal["span", "stage"] = "span"  # transformer blocks (KV cache) or graph stages (stateless)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    n_blocks: int = Field(ge=1)
    block_digests: list[str]
    throughput: float = Field(ge=0.0)  # decode tokens/s of this server's whole span
    cache_tokens_left: int = Field(ge=0)
    cache_tokens_total: int = Field(ge=0)
    addrs: list[str] = Field(default_factory=list)
    version: str = ""
    # What a client gets from this server: weights as stored or quantized (server/quant.py), and
    # its --wire-codec (its default reply codec and the most bytes per value it accepts).
    quant: QuantMode = "none"
    wire_codec: WireCodec = "none"
    # The server's measured profile (placement and routing inputs; 0 / empty: not announced, as in
    # records of older servers): decode tokens/s through ONE block, the memory its span was sized
    # for, open inference sessions (its load), and round-trip seconds to peers it pinged.
    block_speed: float = Field(0.0, ge=0.0)
    memory_bytes: int = Field(0, ge=0)
    sessions: int = Field(0, ge=0)
    rtt: dict[str, Annotated[float, Field(ge=0.0)]] = Field(default_factory=dict, max_length=MAX_RTT_PEERS)
    auto: bool = False  # --blocks auto: it chose its span and may move to another one
    machine: str = Field("", max_length=64)  # servers announcing one machine share its cores ("": unknown)
    group_steps: bool = False  # answers GROUP_RPC (older servers: only per-session streams)


@dataclass
class Message:
    """Transport-neutral message: validated-later JSON metadata and raw tensors."""

    meta: dict
    tensors: list[torch.Tensor | WireTensor] = field(default_factory=list)  # WireTensor: already encoded
    codecs: list[str] = field(default_factory=list)  # set by the receiver: the codec each tensor came in


@dataclass(frozen=True)
class WireTensor:
    """A tensor in its wire form (see transport/codecs.py): raw bytes plus what decoding needs.

    ``dtype`` and ``shape`` describe the decoded tensor; ``buffer`` holds the codec's payload
    (for the blockwise codecs: codes, then one float32 scale per block of ``block_size`` values).
    """

    buffer: bytes
    shape: tuple[int, ...]
    dtype: str
    codec: str = "none"
    block_size: int = 0


@dataclass(frozen=True)
class TensorLimits:
    """What a receiver accepts; everything else is refused before allocation."""

    max_bytes: int = 256 * 1024**2
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    min_dims: int = 1
    max_dims: int = MAX_TENSOR_DIMS
    codecs: tuple[str, ...] = WIRE_CODECS  # activation codecs accepted for float tensors


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in WIRE_DTYPES.items():
        if value == dtype:
            return name
    raise WireError(f"dtype {dtype} cannot travel on the wire")


def tensor_from_wire(buffer: bytes, shape: list[int], dtype: str, limits: TensorLimits) -> torch.Tensor:
    """Rebuild a tensor from raw bytes after checking dtype, shape and size against ``limits``."""
    if dtype not in limits.dtypes or dtype not in WIRE_DTYPES:
        raise WireError(f"tensor dtype {dtype!r} not accepted (allowed: {', '.join(limits.dtypes)})")
    if not (limits.min_dims <= len(shape) <= limits.max_dims) or any(d < 0 for d in shape):
        raise WireError(f"tensor shape {list(shape)} is malformed")
    torch_dtype = WIRE_DTYPES[dtype]
    expected = math.prod(shape) * torch.empty((), dtype=torch_dtype).element_size()
    if expected > limits.max_bytes:
        raise WireError(f"tensor of {expected} bytes exceeds the {limits.max_bytes}-byte limit")
    if len(buffer) != expected:
        raise WireError(f"tensor buffer holds {len(buffer)} bytes, shape {list(shape)} {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    if torch_dtype == torch.bool and max(buffer) > 1:
        raise WireError("bool tensor holds bytes other than 0 and 1")
    return torch.frombuffer(bytearray(buffer), dtype=torch_dtype).reshape(shape)


def tensor_to_wire(tensor: torch.Tensor) -> tuple[bytes, list[int], str]:
    """Raw little-endian bytes, shape and dtype name of a CPU tensor."""
    name = dtype_name(tensor.dtype)
    data = tensor.detach().contiguous().cpu()
    return data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"", list(data.shape), name


def parse_meta(model: type[BaseModel], meta: dict) -> BaseModel:
    """Validate metadata against ``model``, turning pydantic's report into a one-line `WireError`."""
    try:
        return model.model_validate(meta)
    except Exception as exc:  # pydantic.ValidationError and friends
        errors = getattr(exc, "errors", None)
        if callable(errors):
            parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors()]
            raise WireError(f"malformed {model.__name__}: " + "; ".join(parts)) from None
        raise WireError(f"malformed {model.__name__}: {exc}") from None
