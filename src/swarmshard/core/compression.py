"""Compression maths (SPEC §4): activation codecs for the wire and LLM.int8() weights.

Pure, vectorised torch on CPU: no I/O, no global state beyond tables built once.

Activation codecs (``CODECS``): ``blockwise8`` and ``blockwise4`` (dynamic blockwise
quantization, as in "8-bit Optimizers via Block-wise Quantization"; ``blockwise4`` sends the
largest features of a tensor in 8 bits, see :class:`SplitBlockwiseCodec`), ``fp16`` (a cast) and
``none``. ``encode`` returns an :class:`Encoded` whose tensors are the wire payload; ``decode``
needs nothing but that value.

Weights: :class:`Int8Linear` stores a Linear as int8 rows and multiplies int8 activations by
them with int32 accumulation; rows holding outlier features go in two int8 digits (~15 bits).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CODECS",
    "DEFAULT_BLOCK_SIZE",
    "DYNAMIC8",
    "NF4",
    "BlockwiseCodec",
    "CastCodec",
    "Codebook",
    "Codec",
    "Encoded",
    "INT8_THRESHOLD",
    "Int8Linear",
    "SplitBlockwiseCodec",
    "SplitLayout",
    "decode",
    "dynamic_map",
    "encode",
    "encoded_nbytes",
    "int8_matmul",
    "make_codebook",
    "outlier_columns",
    "quantize_module_linears",
    "quantize_rows",
    "unpack_nibbles",
]

# 64 values per block: it divides the hidden sizes of the SmolLM2 family (576, 960, 2048), so a
# block never straddles two tokens; an outlier feature (LLM activations carry a few features
# 20-100x larger than the rest) coarsens only the 63 values sharing its block; and a float32
# absmax costs 4/64 byte per value, which keeps blockwise8 at 0.266x of float32 (blockwise4
# uses bfloat16 scales: 0.144x with its 8-bit wide features, see SplitBlockwiseCodec). The
# block sizes of bitsandbytes' optimizers (2048-4096) would save ~6% of the bytes but let each
# outlier coarsen thousands of values.
DEFAULT_BLOCK_SIZE = 64
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LITTLE_ENDIAN = sys.byteorder == "little"


# --------------------------------------------------------------------------------------------
# Codebooks
# --------------------------------------------------------------------------------------------


def dynamic_map(exponent_levels: int = 7) -> list[float]:
    """The signed 8-bit dynamic data type (Dettmers 2016/2022) as sorted values in [-1, 1].

    The type: a sign bit and 7 magnitude bits; the E leading zeros of the magnitude pick the
    decade 10^-E, the first 1 is an indicator bit, and the remaining 6-E bits are a linear
    fraction: magnitudes ``10^-E * (0.1 + 0.9 k / 2^(6-E))``, k=1..2^(6-E), plus zero (no 1 at
    all). Unlike bitsandbytes' map (bin *means*), we take the bin *ends*: the table is symmetric
    and holds +-1 exactly, and since every block is normalised by its absmax, every block has a
    value at exactly +-1, which now round-trips exactly. The widest gap is 0.9/64, so the error
    is at most 0.0071 of the block absmax. That gives 255 distinct levels (-0 duplicates +0).
    Our wire codes are the levels' sorted indices (comparing codes compares values), so code
    255 is never produced.
    """
    bits = exponent_levels - 1
    mags: list[float] = []
    for e in range(exponent_levels):
        n = 2 ** (bits - e)
        mags += [10.0**-e * (0.1 + 0.9 * k / n) for k in range(1, n + 1)]
    return sorted({0.0, *mags, *(-m for m in mags)})


# QLoRA's NormalFloat4 levels (bitsandbytes): equal-mass quantiles of N(0,1) scaled to [-1, 1],
# with an exact zero and exact +-1. For absmax-normalised blocks of 64 near-Gaussian values they
# give a lower error than a 4-bit dynamic map, which wastes levels on a dynamic range that a
# 64-value block does not have.
_NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


@dataclass(frozen=True, eq=False)
class Codebook:
    """A sorted table of at most 256 levels in [-1, 1] plus what a fast nearest lookup needs.

    ``torch.bucketize`` is a scalar binary search (~40 ns per value on our CPU, under 100 MB/s),
    so encoding instead indexes a table of 2^16 cells by the top 16 bits of the float32 (sign,
    exponent, 7 mantissa bits). No cell holds more than one decision boundary (checked when the
    table is built), so ``cell_code[cell] + (v > cell_threshold[cell])`` is exactly
    ``bucketize(v, mids)``: the index of the nearest level, ties going to the lower one.
    """

    name: str
    values: Tensor  # (K,) float32, ascending: the levels
    mids: Tensor  # (K-1,) float32: decision boundaries between neighbouring levels
    cell_code: Tensor  # (65536,) uint8: code of the lowest value in each cell
    cell_threshold: Tensor  # (65536,) float32: the boundary inside the cell, or +inf
    decode_table: Tensor  # (256,) float32: values padded with the top level
    pair_table: Tensor  # (256,) int64: two float32 levels for the two nibbles of a byte
    max_error: float  # bound on |level(v) - v| for v in [-1, 1]

    @property
    def size(self) -> int:
        return int(self.values.numel())

    def nearest(self, v: Tensor) -> Tensor:
        """uint8 index of the nearest level for every value of a contiguous float32 tensor."""
        flat = v.reshape(-1)
        cell = torch.bitwise_right_shift(flat.view(torch.int32), 16).bitwise_and_(0xFFFF)
        code = torch.index_select(self.cell_code, 0, cell)
        code.add_(torch.gt(flat, torch.index_select(self.cell_threshold, 0, cell)))
        return code.view(v.shape)


def make_codebook(name: str, levels: Sequence[float]) -> Codebook:
    """Build a :class:`Codebook` from up to 256 distinct levels in [-1, 1]."""
    values = torch.tensor(sorted(levels), dtype=torch.float64).to(torch.float32)
    k = values.numel()
    if not 2 <= k <= 256 or values.unique().numel() != k:
        raise ValueError(f"codebook {name!r} needs 2..256 distinct levels, got {k}")
    if values[0] < -1 or values[-1] > 1:
        raise ValueError(f"codebook {name!r} levels must lie in [-1, 1]")
    mids = ((values[1:].double() + values[:-1].double()) / 2).to(torch.float32)

    top = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    negative = top >= np.uint32(0x80000000)
    # For negative floats a larger mantissa is a more negative value.
    lo = torch.from_numpy(np.where(negative, top | np.uint32(0xFFFF), top).view(np.float32))
    hi = torch.from_numpy(np.where(negative, top, top | np.uint32(0xFFFF)).view(np.float32))
    finite = torch.isfinite(lo) & torch.isfinite(hi)  # inf/nan cells: inputs are validated first
    lo, hi = torch.where(finite, lo, 0.0), torch.where(finite, hi, 0.0)
    code_lo, code_hi = torch.bucketize(lo, mids), torch.bucketize(hi, mids)
    spread = code_hi - code_lo
    if int(spread.max()) > 1:
        raise ValueError(f"codebook {name!r} has levels too close for a 2^16-cell lookup")
    threshold = torch.where(spread == 1, mids[code_lo.clamp(max=k - 2)], torch.inf)

    decode_table = torch.cat([values, values[-1:].expand(256 - k)])
    byte = torch.arange(256)
    pairs = torch.stack([decode_table[byte & 15], decode_table[byte >> 4]], dim=1)
    gaps = (values[1:] - values[:-1]).double() / 2
    max_error = max(float(gaps.max()), float(values[0]) + 1.0, 1.0 - float(values[-1]))
    return Codebook(
        name=name,
        values=values,
        mids=mids,
        cell_code=code_lo.to(torch.uint8),
        cell_threshold=threshold.to(torch.float32),
        decode_table=decode_table,
        pair_table=pairs.contiguous().view(torch.int64).reshape(256),
        max_error=max_error,
    )


DYNAMIC8 = make_codebook("dynamic8", dynamic_map())
NF4 = make_codebook("nf4", _NF4_VALUES)


# --------------------------------------------------------------------------------------------
# Activation codecs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Encoded:
    """One encoded tensor: everything ``decode`` needs, and nothing else.

    ``payload`` is uint8 codes for the blockwise codecs (two 4-bit codes per byte, the first in
    the low nibble), the cast values for ``fp16`` and the tensor itself for ``none``.
    ``scales`` holds one absmax per block (blockwise codecs only).
    """

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int
    payload: Tensor
    scales: Tensor | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (payload and scales; the small header is not counted)."""
        n = self.payload.numel() * self.payload.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n


class Codec(Protocol):
    name: str

    def encode(self, x: Tensor) -> Encoded: ...

    def decode(self, enc: Encoded) -> Tensor: ...

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int: ...


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"can only encode float tensors, got {x.dtype}")


def _nonfinite_error(flat: Tensor) -> ValueError:
    n_nan = int(torch.isnan(flat).sum())
    n_inf = int(torch.isinf(flat).sum())
    return ValueError(
        f"cannot encode a tensor with non-finite values: {n_nan} NaN and {n_inf} inf "
        f"among {flat.numel()} values"
    )


# Torch runs an elementwise op or a reduction on the calling thread below 32768 elements (its
# GRAIN_SIZE) and forks an OpenMP team above. On a busy node (a server's codec runs next to its
# model) each fork-join can wait for a scheduler slice: we measured 16-24 ms for one 64K-value
# op with 2 threads on 2 loaded cores, against 4-20 us on one thread. So the codecs work in
# chunks just under that size, with scratch buffers reused by every chunk (they stay in L2, and
# fresh multi-MB temporaries would cost page faults).
_GRAIN = 32768
_TINY = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23  # smallest subnormal


def _pair_unit(block: int) -> int:
    """The smallest whole number of blocks holding an even number of values (4-bit pairs)."""
    return block if block % 2 == 0 else 2 * block


def _chunk_length(block: int) -> int:
    """Just under ``_GRAIN`` values, whole blocks, even."""
    unit = _pair_unit(block)
    return unit * max(1, (_GRAIN - 1) // unit)


def _spans(n: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _blockwise(op: Callable[..., Tensor], src: Tensor, per_block: Tensor, block: int, out: Tensor) -> None:
    """``out = op(src, per_block)`` with one factor per block of ``src`` (flat, last may be short)."""
    n = src.numel()
    nfull = n // block
    if nfull:
        op(src[: nfull * block].view(nfull, block), per_block[:nfull, None], out=out[: nfull * block].view(nfull, block))
    if n > nfull * block:
        op(src[nfull * block :], per_block[nfull:], out=out[nfull * block : n])


def _round_up_scales(absmax: Tensor, out: Tensor) -> Tensor:
    """Store ``absmax`` into the half-precision ``out`` rounded *up*, so normalised values stay
    within [-1, 1]; returns the stored values as float32, the divisor decode will match."""
    out.copy_(absmax)
    # positive floats: the next value up is the next bit pattern (no branch: a sync per chunk
    # costs more than adding zeros). A scale that overflows to inf is reported by the caller.
    out.view(torch.int16).add_(out.to(torch.float32) < absmax)
    return out.to(torch.float32)


def _as_numpy_f32(t: Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen the bits
        return (t.view(torch.int16).numpy().astype(np.int32) << 16).view(np.float32)
    return t.numpy()


def _all_finite(t: Tensor) -> bool:
    # numpy: a torch reduction over a long per-block vector would fork threads (see _GRAIN).
    return bool(np.isfinite(_as_numpy_f32(t)).all())


class BlockwiseCodec:
    """Dynamic blockwise quantization: per-block absmax, values in [-1, 1] -> nearest level.

    8 bits (:data:`DYNAMIC8`, one code per byte) or 4 bits (:data:`NF4`, two codes per byte).
    Scales are float32 by default (exact, and any float32 absmax fits: gradients too);
    float16/bfloat16 save 2 bytes per block and are rounded up so no value leaves [-1, 1].
    Values are normalised by division, not by a reciprocal: a block's absmax element lands on
    exactly +-1, and subnormal blocks cannot overflow.
    """

    def __init__(
        self,
        name: str,
        codebook: Codebook,
        bits: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        scale_dtype: torch.dtype = torch.float32,
    ) -> None:
        if bits not in (4, 8) or codebook.size > 2**bits:
            raise ValueError(f"a {bits}-bit codec cannot hold codebook {codebook.name!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {scale_dtype}")
        self.name = name
        self.codebook = codebook
        self.bits = bits
        self.block_size = block_size
        self.scale_dtype = scale_dtype

    def __repr__(self) -> str:
        return f"BlockwiseCodec({self.name!r}, block_size={self.block_size}, scale_dtype={self.scale_dtype})"

    def _payload_len(self, n: int) -> int:
        return n if self.bits == 8 else -(-n // 2)

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        n = _numel(shape)
        return self._payload_len(n) + -(-n // self.block_size) * self.scale_dtype.itemsize

    def encode(self, x: Tensor, keep: Tensor | None = None) -> Encoded:
        """``keep``: a float32 0/1 factor per feature (last dimension); values whose factor is
        0 are encoded as zeros (and ignored by their block's absmax)."""
        _check_input(x)
        flat = x.detach().reshape(-1)  # a copy only if x is not contiguous
        n, block, book = flat.numel(), self.block_size, self.codebook
        nblocks = -(-n // block)
        absmax = torch.empty(nblocks)
        # bfloat16 scales are the top half of float32 ones: rounded up in place in ``absmax``
        # (two integer ops a chunk), cut to 16 bits once at the end.
        bf16 = self.scale_dtype == torch.bfloat16
        scales = absmax if self.scale_dtype == torch.float32 or bf16 else torch.empty(nblocks, dtype=self.scale_dtype)
        payload = torch.empty(self._payload_len(n), dtype=torch.uint8)
        if n == 0:
            return Encoded(self.name, tuple(x.shape), x.dtype, block, payload, scales.to(self.scale_dtype))
        # Every chunk runs at the scratch length m (whole blocks, even); the last one, if
        # shorter, is zero-padded (padding changes no block's absmax) and its codes trimmed.
        step = _chunk_length(block)
        m = min(step, -(-n // _pair_unit(block)) * _pair_unit(block))
        nbm = m // block
        xin = torch.empty(m)  # upcast or padded input
        v = torch.empty(m)  # |x|, then x / scale
        cell = torch.empty(m, dtype=torch.int32)
        threshold = torch.empty(m)
        above = torch.empty(m, dtype=torch.bool)
        codes = torch.empty(m, dtype=torch.uint8)
        amax_tmp = torch.empty(nbm)
        divisor = torch.empty(nbm)
        v2, divisor2 = v.view(nbm, block), divisor.view(nbm, 1)
        pairs, code_pairs, pack_tmp = codes.view(-1, 2), codes.view(torch.int16), torch.empty(m // 2, dtype=torch.int16)
        # numpy where it is faster at this size (one thread, less overhead a call): logical
        # shift, float compare into bool, abs, bool add, the nibble packing, small-vector ops.
        v_u32, cell_u32, v_np, threshold_np, above_np = (
            v.numpy().view(np.uint32), cell.numpy().view(np.uint32), v.numpy(), threshold.numpy(), above.numpy()
        )
        xin_np, codes_np, pairs_np, pack_np = xin.numpy(), codes.numpy(), code_pairs.numpy(), pack_tmp.numpy()
        payload_np, divisor_np = payload.numpy(), divisor.numpy()
        exact_f32 = flat.dtype == torch.float32
        if keep is not None:  # the feature factors repeated along a chunk, from any offset
            period = keep.numel()
            keep = keep.to(torch.float32).repeat(-(-(m + period) // period))
            keep_np = keep.numpy()
        for s in range(0, n, step):
            e = min(s + step, n)
            k, b0, b1 = e - s, s // block, -(-e // block)
            whole = k == m
            if whole and exact_f32 and keep is None:
                xk = flat[s:e]
            else:
                xk = xin
                if keep is None:
                    xin[:k].copy_(flat[s:e])
                elif exact_f32:
                    np.multiply(flat[s:e].numpy(), keep_np[s % period : s % period + k], out=xin_np[:k])
                else:
                    torch.mul(flat[s:e], keep[s % period : s % period + k], out=xin[:k])
                if not whole:
                    xin[k:].zero_()
            amk = absmax[b0:b1] if whole else amax_tmp
            np.abs(xk.numpy(), out=v_np)
            torch.amax(v.view(nbm, block), 1, out=amk)
            if bf16:  # positive floats: adding 0xFFFF then truncating rounds up; NaN -> inf first
                amk_u32 = amk.numpy().view(np.uint32)
                np.minimum(amk_u32, 0x7F800000, out=amk_u32)
                np.add(amk_u32, 0xFFFF, out=amk_u32)
                np.bitwise_and(amk_u32, 0xFFFF0000, out=amk_u32)
            if not whole:
                absmax[b0:b1].copy_(amax_tmp[: b1 - b0])
            if scales is not absmax:
                amk = _round_up_scales(amk, scales[b0:b1] if whole else torch.empty(nbm, dtype=scales.dtype))
                if not whole:
                    scales[b0:b1].copy_(amk[: b1 - b0])
            np.maximum(amk.numpy(), _TINY, out=divisor_np)  # all-zero blocks stay zero
            torch.div(xk.view(nbm, block), divisor2, out=v2)
            # Lookup cell = top 16 bits of the float32: sign, exponent and 7 mantissa bits.
            np.right_shift(v_u32, 16, out=cell_u32)
            out = payload[s:e] if whole and self.bits == 8 else codes
            torch.index_select(book.cell_code, 0, cell, out=out)
            torch.index_select(book.cell_threshold, 0, cell, out=threshold)
            np.greater(v_np, threshold_np, out=above_np)
            np.add(out.numpy(), above_np, out=out.numpy(), casting="unsafe")
            if self.bits == 4:  # two codes per byte, the first in the low nibble
                nb = -(-k // 2)
                packed = payload[s // 2 : s // 2 + nb]
                if _LITTLE_ENDIAN:  # contiguous int16 ops: 3x faster than strided uint8 ones
                    # (c0 | c1 << 8) >> 4 | (c0 | c1 << 8) has c0 | c1 << 4 as its low byte
                    np.right_shift(pairs_np, 4, out=pack_np)
                    np.bitwise_or(pack_np, pairs_np, out=pack_np)
                    payload_np[s // 2 : s // 2 + nb] = pack_np[:nb]  # int16 -> uint8 keeps the low byte
                else:
                    torch.bitwise_left_shift(pairs[:nb, 1], 4, out=packed).bitwise_or_(pairs[:nb, 0])
            elif out is codes:
                payload[s:e].copy_(codes[:k])
        # NaN/inf flowed through the loop harmlessly until here; a bfloat16 scale rounded up
        # past the largest float is inf too, hence the second look at the input.
        if not _all_finite(absmax) and (not bf16 or not _all_finite(flat)):
            raise _nonfinite_error(flat)
        if not _all_finite(scales):
            peak = float(np.abs(_as_numpy_f32(flat.detach())).max())
            raise ValueError(
                f"block absmax {peak:.6g} overflows {self.scale_dtype} scales; use scale_dtype=torch.float32"
            )
        if bf16:
            scales = torch.from_numpy((absmax.numpy().view(np.uint32) >> 16).astype(np.int16)).view(torch.bfloat16)
        return Encoded(self.name, tuple(x.shape), x.dtype, block, payload, scales)

    def decode(self, enc: Encoded) -> Tensor:
        n, block = enc.numel, enc.block_size
        if block < 1:
            raise ValueError(f"{enc.codec}: invalid block size {block}")
        nblocks = -(-n // block)
        _check_payload(enc, torch.uint8, self._payload_len(n))
        scales = enc.scales
        if scales is None or scales.dtype not in _SCALE_DTYPES or scales.shape != (nblocks,):
            raise ValueError(f"{enc.codec}: expected {nblocks} float scales, got {_describe(scales)}")
        scales_np = _as_numpy_f32(scales)
        if not (np.isfinite(scales_np).all() and (scales_np >= 0).all()):
            raise ValueError(f"{enc.codec}: scales must be finite and non-negative")
        if scales.dtype != torch.float32:  # exact; a mixed-dtype multiply per chunk is slower
            scales = torch.from_numpy(np.ascontiguousarray(scales_np, dtype=np.float32))
        step = _chunk_length(block)
        m = min(step, n)
        out = torch.empty(n, dtype=enc.dtype)
        direct = self.bits == 8 and enc.dtype == torch.float32
        level = None if direct else torch.empty(m + 1)  # float32 levels of one chunk
        index = torch.empty(m if self.bits == 8 else m // 2 + 1, dtype=torch.int32)
        payload = enc.payload
        for s, e in _spans(n, step):
            k, b0, b1 = e - s, s // block, -(-e // block)
            if self.bits == 8:
                dst = out[s:e] if level is None else level[:k]
                torch.index_select(self.codebook.decode_table, 0, index[:k].copy_(payload[s:e]), out=dst)
            else:  # one gather per byte yields the levels of both nibbles
                nb = -(-k // 2)
                ik = index[:nb].copy_(payload[s // 2 : s // 2 + nb])
                torch.index_select(self.codebook.pair_table, 0, ik, out=level[: 2 * nb].view(torch.int64))
                dst = level[:k]
            if enc.dtype == torch.float32:  # scale straight into the output
                _blockwise(torch.mul, dst, scales[b0:b1], block, out=out[s:e])
                continue
            _blockwise(torch.mul, dst, scales[b0:b1], block, out=dst)
            if not direct:
                out[s:e].copy_(dst)
        return out.view(enc.shape)


# Wide features of ``blockwise4``: one feature in ``_WIDE_DIVISOR`` (48 of SmolLM2-135M's 576).
_WIDE_DIVISOR = 12


@dataclass(frozen=True)
class SplitLayout:
    """Where the parts of a ``blockwise4`` value lie (see :class:`SplitBlockwiseCodec`).

    The tensor is read as ``rows`` x ``features`` (its last dimension), ``wide`` of which travel
    in 8 bits. Payload: a bitmap of the wide features (``bitmap`` bytes, little-endian bit order,
    only when ``wide > 0``); one 4-bit code per value (``codes`` bytes, two per byte, the first
    in the low nibble); the low nibbles of the wide values' 8-bit codes (``low_nibbles`` bytes,
    feature-major). Scales: one per block of the 4-bit codes, then one per block of the wide
    values (feature-major).
    """

    rows: int
    features: int
    wide: int
    bitmap: int
    codes: int
    low_nibbles: int
    narrow_scales: int
    wide_scales: int

    @property
    def payload(self) -> int:
        return self.bitmap + self.codes + self.low_nibbles

    @property
    def scales(self) -> int:
        return self.narrow_scales + self.wide_scales


class SplitBlockwiseCodec:
    """``blockwise4``: 4-bit blockwise codes, with 8-bit codes for the largest features.

    LLM residual streams carry a few features (channels of the last dimension) 10-1000x larger
    than the rest, in the same places for most tokens ("massive activations"). In a 64-value
    absmax block one of them sets a scale under which NF4 rounds the other 63 values to zero:
    plain 4-bit blocks cost SmolLM2-135M +30% perplexity, 21 points of it in the final hidden
    states. So per tensor, the ``features // 12`` features with the largest mean ``|x|`` over
    its rows (picked by the encoder, sent as a bitmap: one bit per feature per message) travel
    with 8-bit :data:`DYNAMIC8` codes in blocks of one feature (feature-major: like values
    together), and the other values with :data:`NF4` codes in blocks that ignore the wide
    features. A wide value's 4-bit slot among the NF4 codes carries the high nibble of its 8-bit
    code and a side stream the low nibble, so no slot is wasted. With bfloat16 block scales
    (rounded up; they cover float32's range, and their precision does not matter since decode
    divides by the same stored value) this is 0.144x of float32 for SmolLM2's 576 features,
    against 0.141x for plain NF4 blocks with float32 scales, for +2% perplexity instead of +30%
    on bench/accuracy.py. Per-token outliers outside the chosen features stay in their block.

    Every decoded value is within ``NF4.max_error`` (narrow) or ``DYNAMIC8.max_error`` (wide)
    of its block scale, as with the plain codecs. Shapes with fewer than 12 features have no
    wide part and are plain NF4 blocks.
    """

    def __init__(self, name: str, block_size: int = DEFAULT_BLOCK_SIZE, scale_dtype: torch.dtype = torch.bfloat16,
                 wide_divisor: int = _WIDE_DIVISOR) -> None:
        if wide_divisor < 1:
            raise ValueError(f"wide_divisor must be positive, got {wide_divisor}")
        self.name = name
        self.narrow = BlockwiseCodec(name, NF4, 4, block_size, scale_dtype)
        self.wide = BlockwiseCodec(name, DYNAMIC8, 8, block_size, scale_dtype)
        self.block_size = block_size
        self.scale_dtype = scale_dtype
        self.wide_divisor = wide_divisor
        zero = NF4.nearest(torch.tensor([0.0, -0.0]))
        if zero[0] != zero[1]:
            raise ValueError("the 4-bit codebook must give +0 and -0 one code")
        self._zero_code = int(zero[0])

    def __repr__(self) -> str:
        return f"SplitBlockwiseCodec({self.name!r}, block_size={self.block_size}, scale_dtype={self.scale_dtype})"

    def layout(self, shape: Sequence[int], block_size: int | None = None) -> SplitLayout:
        block = self.block_size if block_size is None else block_size
        if block < 1:
            raise ValueError(f"{self.name}: invalid block size {block}")
        n = _numel(shape)
        features = int(shape[-1]) if len(shape) else 1
        rows = n // features if features else 0
        wide = features // self.wide_divisor if n else 0
        return SplitLayout(
            rows=rows,
            features=features,
            wide=wide,
            bitmap=-(-features // 8) if wide else 0,
            codes=-(-n // 2),
            low_nibbles=-(-(rows * wide) // 2),
            narrow_scales=-(-n // block),
            wide_scales=-(-(rows * wide) // block),
        )

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        lay = self.layout(shape)
        return lay.payload + lay.scales * self.scale_dtype.itemsize

    @staticmethod
    def _slot_bytes(wide_cols: Tensor, rows: int, features: int) -> tuple[Tensor, Tensor]:
        """Where the wide values' 4-bit slots are in the packed codes: byte index and nibble
        shift (0 or 4). With an even feature count a feature's slots share one byte column of
        the codes viewed as (rows, features / 2): both are (wide,); otherwise flat byte indices
        and shifts, (rows, wide)."""
        if features % 2 == 0:
            return wide_cols >> 1, ((wide_cols & 1) << 2).to(torch.uint8)
        slots = torch.arange(rows)[:, None] * features + wide_cols[None, :]
        return slots >> 1, ((slots & 1) << 2).to(torch.uint8)

    def _put_high(self, codes: Tensor, wide_cols: Tensor, rows: int, features: int, high: Tensor) -> None:
        """Write ``high`` ((rows, wide) nibbles) into the wide values' slots of ``codes``."""
        at, shift = self._slot_bytes(wide_cols, rows, features)
        # The slots hold the code of 0 (their inputs were zeroed): adding (high - zero code)
        # in place sets them, modulo 256, even when a byte holds two slots.
        add = high.sub(self._zero_code).bitwise_left_shift_(shift)
        if features % 2 == 0:
            codes.view(rows, -1).index_add_(1, at, add)
        else:
            codes.index_add_(0, at.reshape(-1), add.reshape(-1))

    def _get_high(self, codes: Tensor, wide_cols: Tensor, rows: int, features: int) -> Tensor:
        """The nibbles in the wide values' slots of ``codes``, (rows, wide) uint8."""
        at, shift = self._slot_bytes(wide_cols, rows, features)
        if features % 2 == 0:
            got = codes.view(rows, -1).index_select(1, at)
        else:
            got = codes.index_select(0, at.reshape(-1)).view(rows, -1)
        return torch.bitwise_right_shift(got, shift).bitwise_and_(15)

    def encode(self, x: Tensor) -> Encoded:
        _check_input(x)
        lay = self.layout(tuple(x.shape))
        if not lay.wide:
            return self.narrow.encode(x)
        flat = x.detach().reshape(-1)
        rows, d, k = lay.rows, lay.features, lay.wide
        x2 = flat.view(rows, d)
        # Score: sum of squares per feature (numpy's einsum: one pass, no temporary, one
        # thread). float32 squares overflow past 1.8e19: then (or for a non-finite input,
        # which is refused) the sums are taken again in float64.
        xs = (x2 if x.dtype in (torch.float32, torch.float64) else x2.to(torch.float32)).numpy()
        score = torch.from_numpy(np.einsum("ij,ij->j", xs, xs))
        if not bool(torch.isfinite(score).all()):
            if not _all_finite(flat):
                raise _nonfinite_error(flat)
            score = torch.from_numpy(np.einsum("ij,ij->j", xs, xs, dtype=np.float64))
        wide_cols = torch.topk(score, k, sorted=False).indices.sort().values
        is_wide = torch.zeros(d, dtype=torch.bool)
        is_wide[wide_cols] = True
        a = self.narrow.encode(flat, keep=(~is_wide).to(torch.float32))
        wide = torch.empty(rows, k, dtype=x.dtype)
        for r, e in _spans(rows, max(1, (_GRAIN - 1) // k)):
            torch.index_select(x2[r:e], 1, wide_cols, out=wide[r:e])
        b = self.wide.encode(wide.t().contiguous())  # feature-major: like values share blocks
        codes, wide_codes = a.payload, b.payload.view(k, rows)
        self._put_high(codes, wide_cols, rows, d, torch.bitwise_right_shift(wide_codes.t(), 4).contiguous())
        low = b.payload.bitwise_and(15)
        if low.numel() % 2:
            low = torch.cat([low, low.new_zeros(1)])
        low_packed = low[0::2].bitwise_or(low[1::2] << 4)
        bitmap = torch.from_numpy(np.packbits(is_wide.numpy(), bitorder="little"))
        payload = torch.cat([bitmap, codes, low_packed])
        return Encoded(self.name, tuple(x.shape), x.dtype, self.block_size, payload, torch.cat([a.scales, b.scales]))

    def split(self, enc: Encoded) -> tuple[Tensor, Encoded, Encoded | None]:
        """Check ``enc``; return its wide-feature mask, its 4-bit part and its 8-bit part.

        The 4-bit part decodes to the whole tensor but for the wide features; the 8-bit part
        (shape (wide, rows)) to those features, transposed. Raises ValueError if malformed.
        """
        lay = self.layout(enc.shape, enc.block_size)
        _check_payload(enc, torch.uint8, lay.payload)
        scales = enc.scales
        if scales is None or scales.dtype not in _SCALE_DTYPES or scales.shape != (lay.scales,):
            raise ValueError(f"{enc.codec}: expected {lay.scales} float scales, got {_describe(scales)}")
        rows, d, k = lay.rows, lay.features, lay.wide
        if not k:
            return torch.zeros(d, dtype=torch.bool), enc, None
        bits = np.unpackbits(enc.payload[: lay.bitmap].numpy(), bitorder="little")
        n_wide, stray = int(bits[:d].sum()), int(bits[d:].sum())
        if n_wide != k or stray:
            raise ValueError(
                f"{enc.codec}: the feature bitmap must mark {k} of {d} features, got {n_wide}"
                + (f" and {stray} set padding bits" if stray else "")
            )
        is_wide = torch.from_numpy(bits[:d].astype(np.bool_))
        codes = enc.payload[lay.bitmap : lay.bitmap + lay.codes]
        narrow = Encoded(enc.codec, tuple(enc.shape), enc.dtype, enc.block_size, codes, scales[: lay.narrow_scales])
        high = self._get_high(codes, is_wide.nonzero().squeeze(1), rows, d).t().contiguous().view(-1)
        low_packed = enc.payload[lay.bitmap + lay.codes :]
        low = torch.stack([low_packed.bitwise_and(15), torch.bitwise_right_shift(low_packed, 4)], 1).reshape(-1)
        wide_codes = (high << 4).bitwise_or_(low[: high.numel()])
        wide = Encoded(enc.codec, (k, rows), enc.dtype, enc.block_size, wide_codes, scales[lay.narrow_scales :])
        return is_wide, narrow, wide

    def decode(self, enc: Encoded) -> Tensor:
        is_wide, narrow_enc, wide_enc = self.split(enc)
        out = self.narrow.decode(narrow_enc)  # wide slots hold high nibbles: overwritten below
        if wide_enc is None:
            return out
        wide = self.wide.decode(wide_enc)
        k, rows = wide_enc.shape
        out2 = out.view(rows, -1)
        wide_cols = is_wide.nonzero().squeeze(1)
        wide = wide.t().contiguous()
        for r, e in _spans(rows, max(1, (_GRAIN - 1) // k)):
            out2[r:e].index_copy_(1, wide_cols, wide[r:e])
        return out


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """The ``n`` 4-bit codes of a packed payload, one per uint8 (for inspection and tests)."""
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n]


def _describe(t: Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"


def _check_payload(enc: Encoded, dtype: torch.dtype, numel: int) -> None:
    p = enc.payload
    if not isinstance(p, Tensor) or p.dtype != dtype or p.dim() != 1 or p.numel() != numel:
        raise ValueError(
            f"{enc.codec}: payload for shape {enc.shape} must be 1-D {dtype} with {numel} "
            f"values, got {_describe(p) if isinstance(p, Tensor) else type(p).__name__}"
        )


_FP16_OVERFLOW = 65520.0  # float32 values from here on round to inf in float16


class CastCodec:
    """``fp16`` casts (half the bytes of float32, exact for fp16 inputs); ``none`` sends as is.

    ``none``'s payload is the (flattened) input itself and its decode a view of the payload:
    copying would only cost time. Both reject non-finite values like the blockwise codecs.
    """

    def __init__(self, name: str, wire_dtype: torch.dtype | None) -> None:
        self.name = name
        self.wire_dtype = wire_dtype

    def __repr__(self) -> str:
        return f"CastCodec({self.name!r}, wire_dtype={self.wire_dtype})"

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        return _numel(shape) * (self.wire_dtype or dtype).itemsize

    def encode(self, x: Tensor) -> Encoded:
        _check_input(x)
        flat = x.reshape(-1)
        n = flat.numel()
        cast = self.wire_dtype is not None and self.wire_dtype != flat.dtype
        payload = torch.empty(n, dtype=self.wire_dtype) if cast else flat
        spans = _spans(n, _GRAIN - 1)
        peaks = torch.empty(2 * len(spans), dtype=flat.dtype)
        for i, (s, e) in enumerate(spans):  # chunked: see _GRAIN
            torch.amax(flat[s:e], 0, keepdim=True, out=peaks[2 * i : 2 * i + 1])
            torch.amin(flat[s:e], 0, keepdim=True, out=peaks[2 * i + 1 : 2 * i + 2])
            if cast:
                payload[s:e].copy_(flat[s:e])
        peak = float(np.abs(_as_numpy_f32(peaks).astype(np.float64)).max(initial=0.0))
        if not math.isfinite(peak):
            raise _nonfinite_error(flat)
        if self.wire_dtype == torch.float16 and peak >= _FP16_OVERFLOW:
            raise ValueError(
                f"values up to {float(peak):.6g} overflow float16 (max 65504); use codec 'blockwise8' or 'none'"
            )
        return Encoded(self.name, tuple(x.shape), x.dtype, 0, payload, None)

    def decode(self, enc: Encoded) -> Tensor:
        _check_payload(enc, self.wire_dtype or enc.dtype, enc.numel)
        if enc.scales is not None:
            raise ValueError(f"{enc.codec}: unexpected scales")
        if enc.payload.dtype == enc.dtype:
            return enc.payload.view(enc.shape)
        out = torch.empty(enc.numel, dtype=enc.dtype)
        for s, e in _spans(enc.numel, _GRAIN - 1):
            out[s:e].copy_(enc.payload[s:e])
        return out.view(enc.shape)


CODECS: Mapping[str, Codec] = MappingProxyType(
    {
        "blockwise8": BlockwiseCodec("blockwise8", DYNAMIC8, bits=8),
        "blockwise4": SplitBlockwiseCodec("blockwise4"),
        "fp16": CastCodec("fp16", torch.float16),
        "none": CastCodec("none", None),
    }
)


def _codec(codec: str | Codec) -> Codec:
    if isinstance(codec, str):
        try:
            return CODECS[codec]
        except KeyError:
            raise ValueError(f"unknown codec {codec!r}; known: {sorted(CODECS)}") from None
    return codec


def encode(x: Tensor, codec: str | Codec = "blockwise8") -> Encoded:
    """Encode ``x`` with a codec given by name (see ``CODECS``) or as an instance."""
    return _codec(codec).encode(x)


def decode(enc: Encoded) -> Tensor:
    """Restore a tensor of ``enc.shape`` and ``enc.dtype``; raises ValueError on a malformed value.

    Everything is read from ``enc`` (block size and scale dtype included), so values made by a
    codec with a non-default block size decode through the registry's codec of the same name.
    """
    if enc.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{enc.codec}: cannot decode to {enc.dtype}")
    if any(not isinstance(d, int) or d < 0 for d in enc.shape):
        raise ValueError(f"{enc.codec}: invalid shape {enc.shape}")
    return _codec(enc.codec).decode(enc)


def encoded_nbytes(codec: str | Codec, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Wire bytes of a tensor of ``shape``/``dtype`` under ``codec``, without encoding it.

    This is the ``bytes(a)`` a placement or routing cost needs (SPEC §1).
    """
    return _codec(codec).nbytes(shape, dtype)


# --------------------------------------------------------------------------------------------
# int8 weights, with outlier activations carried at higher precision (after LLM.int8())
# --------------------------------------------------------------------------------------------

INT8_THRESHOLD = 6.0


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row absmax int8 of a 2-D tensor: ``t ~= q * scale[:, None]``.

    ``scale = absmax / 127`` per row; all-zero rows get codes 0.
    """
    t = t.to(torch.float32)
    return _quantize_rows_by(t, t.abs().amax(dim=-1))


def _quantize_rows_by(t: Tensor, absmax: Tensor) -> tuple[Tensor, Tensor]:
    # The floor keeps 127/absmax finite for zero and subnormal rows, so codes stay within
    # +-127 (t * 127/absmax <= 127 up to rounding) without a clamp.
    absmax = absmax.clamp(min=1e-30)
    q = torch.mul(t, (127.0 / absmax)[:, None]).round_().to(torch.int8)
    return q, absmax / 127.0


@cache
def _int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` exists and is right on this build (probed once, tiny)."""
    if not hasattr(torch, "_int_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (3, 5), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (4, 5), dtype=torch.int8, generator=g)
    try:
        got = torch._int_mm(a, b.t())
    except RuntimeError:
        return False
    return bool(torch.equal(got.long(), a.long() @ b.long().t()))


def int8_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """Exact ``a @ b_t`` for int8 (M, K) x (K, N) with int32 accumulation (exact for K < 133k).

    ``torch._int_mm`` works on CPU in torch 2.13 and is ~3-4x faster than the float32 GEMM of
    the same shape at batch 128 (bench/codecs.py). It returns garbage for K == 1, hence the
    float64 path (exact: |sum| < 2^53) for that case and for builds without a working kernel.
    """
    if a.shape[1] >= 2 and _int_mm_is_exact():
        return torch._int_mm(a.contiguous(), b_t)
    return (a.to(torch.float64) @ b_t.to(torch.float64)).to(torch.int32)


def outlier_columns(x: Tensor, threshold: float = INT8_THRESHOLD) -> Tensor:
    """Indices of the input features (last dim) with any ``|x| > threshold``."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    return (rows.abs().amax(0) > threshold).nonzero().squeeze(1)


class Int8Linear(nn.Module):
    """A Linear stored as int8 rows (+ float32 row scales) with int8 x int8 -> int32 matmuls.

    Activations are quantized per row at run time. An outlier feature (``|x| > threshold``; LLM
    activations carry a few features 20-100x the others) would set its row's int8 step and ruin
    the rest, so once one appears the batch goes in two int8 digits (``int8_mixed_linear``):
    outliers and all are computed to ~15 bits, through the same int8 matmul. LLM.int8() instead
    splits the outlier columns off into a float16 matmul; on CPU gathering those weight columns
    cost more than the whole int8 matmul, and its accuracy was lower here (perplexity +0.15% vs
    -0.01% on bench/accuracy.py's corpus). When calibration activations show *systematic*
    outlier features, ``from_linear(..., calibration=X)`` keeps exactly those weight columns in
    float32 (at most ``max_fp_columns``, default in_features // 32: under 4% more memory) and
    drops them from the int8 rows, whose scales then ignore them. Memory: 1 byte per weight plus
    4 per output row (~0.25x of float32) without calibration.

    Kernel choice (bench/codecs.py, one core): ``torch._int_mm`` makes this ~2x faster than the
    float32 Linear at batch 1 and 128. torch's own ``quantized::linear_dynamic`` (fbgemm) keeps
    weights in an opaque packed copy and quantizes activations per *tensor*, which costs accuracy
    at batch > 1 unless rows are normalised first. Layers that read the same input can share one
    matmul and one quantization of it: see `core.int8_siblings`.
    """

    weight_int8: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    fp_columns: Tensor
    weight_fp: Tensor
    fp_mask: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = INT8_THRESHOLD,
        n_fp_columns: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = float(threshold)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("fp_columns", torch.zeros(n_fp_columns, dtype=torch.long))
        self.register_buffer("weight_fp", torch.zeros(out_features, n_fp_columns))
        # Derived from fp_columns; not saved, a bool per input feature.
        self.register_buffer("fp_mask", torch.zeros(in_features, dtype=torch.bool), persistent=False)
        # Set by `core.int8_siblings.fuse_int8_siblings` when this layer shares its input with others.
        self.siblings: Callable[[Int8Linear, Tensor], Tensor] | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        threshold: float = INT8_THRESHOLD,
        calibration: Tensor | None = None,
        max_fp_columns: int | None = None,
    ) -> Int8Linear:
        """Quantize ``linear``; ``calibration`` (..., in_features) picks static float32 columns."""
        w = linear.weight.detach().to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("cannot quantize a Linear with non-finite weights")
        fp_cols = torch.zeros(0, dtype=torch.long)
        if calibration is not None:
            if calibration.shape[-1] != linear.in_features:
                raise ValueError(
                    f"calibration has {calibration.shape[-1]} features, the Linear {linear.in_features}"
                )
            cap = linear.in_features // 32 if max_fp_columns is None else max_fp_columns
            peak = calibration.detach().reshape(-1, linear.in_features).to(torch.float32).abs().amax(0)
            hot = (peak > threshold).nonzero().squeeze(1)
            fp_cols = hot[peak[hot].argsort(descending=True)[:cap]].sort().values
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, fp_cols.numel())
        m.fp_columns.copy_(fp_cols)
        m.fp_mask[fp_cols] = True
        m.weight_fp.copy_(w[:, fp_cols])
        q, scale = quantize_rows(w.index_fill(1, fp_cols, 0.0))
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Buffers sized by the number of static columns follow the checkpoint.
        cols = state_dict.get(prefix + "fp_columns")
        if cols is not None:
            self.fp_columns = torch.zeros_like(cols)
            self.weight_fp = torch.zeros(self.out_features, cols.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.fp_mask = torch.zeros(self.in_features, dtype=torch.bool)
        self.fp_mask[self.fp_columns] = True

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}, fp_columns={self.fp_columns.numel()}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.siblings is not None:
            return self.siblings(self, x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        y = int8_mixed_linear(x2, self.weight_int8, self.weight_scale, self.bias, self.threshold,
                              (self.fp_mask, self.fp_columns, self.weight_fp) if self.fp_columns.numel() else None)
        return y.view(*lead, self.out_features).to(x.dtype)


def int8_mixed_linear(
    x2: Tensor,
    weight_int8: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    threshold: float,
    static: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """``x2 @ W.T + bias`` for float32 rows ``x2`` (M, in) and int8 rows ``W``: :class:`Int8Linear`.

    While every ``|x| <= threshold`` the rows are absmax-quantized to int8 (one digit). Once a
    feature passes the threshold (an outlier, which would set the whole row's int8 step), the
    batch is carried in two int8 digits instead: ``x ~= s * (hi + lo / 254)`` with ``s`` the
    row's absmax / 127, so every activation keeps ~15 bits (an error of at most absmax / 64516,
    finer than float16 for these magnitudes). Both digits go through the same int8 matmul as
    extra rows, so the outlier path reads the weight once and gathers nothing. ``static`` is
    (mask, columns, float32 weight columns) of calibrated features, multiplied in float32.

    Written for few small ops: at batch 1 a layer's time is mostly per-op overhead.
    """
    base = bias
    xq = x2
    if static is not None:
        mask, columns, weight_fp = static
        fp_part = x2.index_select(1, columns) @ weight_fp.t()
        base = fp_part if bias is None else fp_part.add_(bias)
        xq = x2.masked_fill(mask, 0.0)
    rowmax = xq.abs().amax(1)
    if rowmax.numel() and float(rowmax.max()) > threshold:
        return _int8_two_digits(xq, rowmax, weight_int8, weight_scale, base)
    qx, sx = _quantize_rows_by(xq, rowmax)
    acc = int8_matmul(qx, weight_int8.t())
    scale = sx[:, None] * weight_scale
    return torch.mul(acc, scale) if base is None else torch.addcmul(base, acc, scale)


# Two int8 digits in base 254: |hi| <= 127 and |lo| <= 127 hold any integer |v| <= 127 * 254.
_DIGIT_BASE = 254.0
_TWO_DIGIT_MAX = 127.0 * _DIGIT_BASE


def _int8_two_digits(
    x2: Tensor, rowmax: Tensor, weight_int8: Tensor, weight_scale: Tensor, base: Tensor | None
) -> Tensor:
    m = x2.shape[0]
    absmax = rowmax.clamp(min=1e-30)
    v = torch.mul(x2, (_TWO_DIGIT_MAX / absmax)[:, None]).round_()
    hi = torch.div(v, _DIGIT_BASE).round_()
    lo = v.sub_(hi, alpha=_DIGIT_BASE)  # |lo| <= 127: v - 254 * round(v / 254)
    acc = int8_matmul(torch.cat([hi, lo]).to(torch.int8), weight_int8.t())  # one pass over the weight
    scale = (absmax / 127.0)[:, None] * weight_scale
    y = torch.mul(acc[:m], scale) if base is None else torch.addcmul(base, acc[:m], scale)
    return y.addcmul_(acc[m:], scale, value=1.0 / _DIGIT_BASE)


def quantize_module_linears(
    module: nn.Module, threshold: float = INT8_THRESHOLD, exclude: Collection[str] = ()
) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (in place) by an :class:`Int8Linear`.

    ``exclude`` names modules to leave as they are, by qualified name (e.g. ``"lm_head"``).
    A Linear reachable under several names is converted once and stays shared. Returns
    ``module``, or the converted module when ``module`` is itself a Linear.
    """
    if isinstance(module, nn.Linear):
        return Int8Linear.from_linear(module, threshold)
    converted: dict[int, Int8Linear] = {}
    for qualified, parent in list(module.named_modules(remove_duplicate=False)):
        for name, child in list(parent._modules.items()):  # named_children() hides repeats
            full = f"{qualified}.{name}" if qualified else name
            if isinstance(child, nn.Linear) and full not in exclude:
                if id(child) not in converted:
                    converted[id(child)] = Int8Linear.from_linear(child, threshold)
                setattr(parent, name, converted[id(child)])
    return module
