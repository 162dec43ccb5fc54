"""Explicit wire schemas: every message is JSON metadata validated by pydantic plus raw tensors.

Nothing from the wire is ever unpickled: metadata is JSON, tensors are raw little-endian buffers with
a declared dtype and shape that are checked (dtype allowed, byte count matches, limits respected)
before any byte becomes a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
INFERENCE_RPC = "swarmshard.inference"  # stream: open a session, then steps
FORWARD_RPC = "swarmshard.forward"  # stream: stateless forwards
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
MAX_TENSOR_DIMS = 4
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
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


class Step(_Strict):
    """One inference step: hidden states for positions ``[position, position + seq_len)``."""

    kind: str = Field("step", pattern="^step$")
    step: int = Field(ge=0)
    position: int = Field(ge=0)


class Forward(_Strict):
    """A stateless forward of blocks ``[start, end)`` over positions ``[0, seq_len)`` (no cache kept)."""

    kind: str = Field("forward", pattern="^forward$")
    protocol: int = PROTOCOL_VERSION
    model_id: str = Field(min_length=1, max_length=200)
    start: int = Field(ge=0)
    end: int = Field(ge=1)


class Reply(_Strict):
    """Server answer: ``ok`` with optional fields, or an ``error`` naming what was wrong."""

    ok: bool
    error: str | None = None
    step: int | None = None
    cache_tokens_left: int | None = None


class ServerRecord(_Strict):
    """What a server announces in the DHT (an expiring record, refreshed periodically)."""

    peer_id: str
    model_id: str
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    n_blocks: int = Field(ge=1)
    block_digests: list[str]
    throughput: float = Field(ge=0.0)  # decode tokens/s of this server's whole span
    cache_tokens_left: int = Field(ge=0)
    cache_tokens_total: int = Field(ge=0)
    addrs: list[str] = Field(default_factory=list)
    version: str = ""


@dataclass
class Message:
    """Transport-neutral message: validated-later JSON metadata and raw tensors."""

    meta: dict
    tensors: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class TensorLimits:
    """What a receiver accepts; everything else is refused before allocation."""

    max_bytes: int = 256 * 1024**2
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in WIRE_DTYPES.items():
        if value == dtype:
            return name
    raise WireError(f"dtype {dtype} cannot travel on the wire")


def tensor_from_wire(buffer: bytes, shape: list[int], dtype: str, limits: TensorLimits) -> torch.Tensor:
    """Rebuild a tensor from raw bytes after checking dtype, shape and size against ``limits``."""
    if dtype not in limits.dtypes or dtype not in WIRE_DTYPES:
        raise WireError(f"tensor dtype {dtype!r} not accepted (allowed: {', '.join(limits.dtypes)})")
    if not (1 <= len(shape) <= MAX_TENSOR_DIMS) or any(d < 0 for d in shape):
        raise WireError(f"tensor shape {list(shape)} is malformed")
    torch_dtype = WIRE_DTYPES[dtype]
    expected = math.prod(shape) * torch.empty((), dtype=torch_dtype).element_size()
    if expected > limits.max_bytes:
        raise WireError(f"tensor of {expected} bytes exceeds the {limits.max_bytes}-byte limit")
    if len(buffer) != expected:
        raise WireError(f"tensor buffer holds {len(buffer)} bytes, shape {list(shape)} {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(buffer), dtype=torch_dtype).reshape(shape)


def tensor_to_wire(tensor: torch.Tensor) -> tuple[bytes, list[int], str]:
    """Raw little-endian bytes, shape and dtype name of a CPU tensor."""
    name = dtype_name(tensor.dtype)
    data = tensor.detach().contiguous().cpu()
    return data.view(torch.uint8).numpy().tobytes() if data.numel() else b"", list(data.shape), name


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
