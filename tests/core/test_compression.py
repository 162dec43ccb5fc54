"""Compression maths: codebooks, activation codecs and LLM.int8() weights (SPEC §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from swarmshard.core.compression import (
    CODECS,
    DEFAULT_BLOCK_SIZE,
    DYNAMIC8,
    NF4,
    BlockwiseCodec,
    Encoded,
    Int8Linear,
    SplitBlockwiseCodec,
    decode,
    dynamic_map,
    encode,
    encoded_nbytes,
    int8_matmul,
    make_codebook,
    outlier_columns,
    quantize_module_linears,
    quantize_rows,
    unpack_nibbles,
)

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
BLOCKWISE = {"blockwise8": DYNAMIC8, "blockwise4": NF4}
# Half an ulp, relative: the rounding a decoded value takes when cast back to a narrow dtype.
OUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 0.0}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def codes_of(enc: Encoded) -> torch.Tensor:
    """One code per value, whatever the packing."""
    if enc.codec == "blockwise4":
        return unpack_nibbles(enc.payload, enc.numel)
    return enc.payload


def check_within_bound(x: torch.Tensor, enc: Encoded, y: torch.Tensor, book=None) -> None:
    """|decode - x| <= max_error * block scale (+ the output dtype's own rounding).

    ``blockwise4`` values (no ``book``) are checked part by part: 4-bit values against their
    NF4 blocks, the wide features (8-bit, feature-major blocks) against theirs."""
    if book is None and isinstance(CODECS[enc.codec], SplitBlockwiseCodec):
        is_wide, narrow, wide = CODECS[enc.codec].split(enc)
        keep = ~is_wide if x.dim() else torch.ones(1, dtype=torch.bool)
        check_within_bound(x * keep.to(x.dtype), narrow, torch.where(keep, y, 0).to(y.dtype), NF4)
        if wide is not None:
            rows = wide.shape[1]
            xw, yw = x.reshape(rows, -1)[:, is_wide].t(), y.reshape(rows, -1)[:, is_wide].t()
            check_within_bound(xw.contiguous(), wide, yw.contiguous(), DYNAMIC8)
        return
    book = book or BLOCKWISE[enc.codec]
    n, block = x.numel(), enc.block_size
    if n == 0:
        return
    scale = enc.scales.to(torch.float64).repeat_interleave(block)[:n]
    xf, yf = x.reshape(-1).double(), y.reshape(-1).double()
    tiny = 2.0**-24 if x.dtype == torch.float16 else 0.0  # fp16 subnormal spacing
    bound = book.max_error * scale * (1 + 1e-6) + yf.abs() * OUT_ROUNDING[x.dtype] + tiny
    excess = (yf - xf).abs() - bound
    assert float(excess.max()) <= 0, f"error exceeds bound by {float(excess.max())}"


# ---------------------------------------------------------------------------------- codebooks


def test_dynamic_map_structure() -> None:
    levels = torch.tensor(dynamic_map(), dtype=torch.float64)
    assert levels.numel() == 255 and torch.equal(levels, -levels.flip(0))
    assert {0.0, 1.0, -1.0} <= set(levels.tolist())
    positive = levels[levels > 0]
    # decade 10^-E holds 2^(6-E) levels: sign + leading-zero exponent + linear fraction
    for e in range(7):
        in_decade = ((positive > 10.0 ** -(e + 1)) & (positive <= 10.0**-e)).sum()
        assert int(in_decade) == 2 ** (6 - e)
    assert DYNAMIC8.max_error == pytest.approx(0.9 / 64 / 2, rel=1e-5)


def test_nf4_levels() -> None:
    assert NF4.size == 16 and float(NF4.values[0]) == -1.0 and float(NF4.values[-1]) == 1.0
    assert 0.0 in NF4.values.tolist()


def float_probe(g: torch.Generator) -> torch.Tensor:
    """Values that stress a nearest-level lookup: a sweep, random bit patterns, every boundary
    and its float neighbours, every level, and the ends of every lookup cell."""
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), dtype=torch.int64, generator=g)
    random_bits = bits.to(torch.int32).view(torch.float32)
    random_bits = random_bits[torch.isfinite(random_bits) & (random_bits.abs() <= 1.5)]
    cells = (torch.arange(1 << 16, dtype=torch.int64) << 16).to(torch.int32)
    cell_ends = torch.cat([cells, cells | 0xFFFF]).view(torch.float32)
    cell_ends = cell_ends[torch.isfinite(cell_ends) & (cell_ends.abs() <= 1.5)]
    parts = [torch.linspace(-1.2, 1.2, 100_001), random_bits, cell_ends, torch.tensor([0.0, -0.0, 1e-45, -1e-45])]
    for book in (DYNAMIC8, NF4):
        for t in (book.mids, book.values):
            parts += [t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))]
    return torch.cat(parts).contiguous()


@pytest.mark.parametrize("book", [DYNAMIC8, NF4], ids=lambda b: b.name)
def test_fast_lookup_equals_bucketize_and_is_nearest(book) -> None:
    v = float_probe(gen(1))
    fast = book.nearest(v).long()
    assert torch.equal(fast, torch.bucketize(v, book.mids))
    # and bucketize on midpoints is the nearest level (ties within float rounding of a midpoint)
    sample = v[torch.randperm(v.numel(), generator=gen(2))[:20_000]].double()
    dist = (sample[:, None] - book.values.double()[None, :]).abs()
    chosen = dist.gather(1, fast[torch.randperm(v.numel(), generator=gen(2))[:20_000], None])[:, 0]
    assert float((chosen - dist.min(1).values).max()) <= 1e-7


def test_make_codebook_rejects_bad_levels() -> None:
    with pytest.raises(ValueError, match="distinct"):
        make_codebook("dup", [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        make_codebook("wide", [-2.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="too close"):
        make_codebook("dense", [0.5, 0.5001, 0.5002, 0.5003])


# ------------------------------------------------------------------------- roundtrip accuracy


def test_blockwise8_gaussian_error_under_one_percent_of_block_absmax() -> None:
    x = torch.randn(8, 512, 576, generator=gen(3))
    enc = encode(x, "blockwise8")
    y = decode(enc)
    absmax = x.view(-1, 64).abs().amax(1, keepdim=True)
    rel = (y - x).view(-1, 64).abs() / absmax
    assert float(rel.max()) < 0.0071  # half the widest gap, 0.9/64/2
    assert float(rel.mean()) < 0.004
    assert float((y - x).norm() / x.norm()) < 0.012
    # every block's absmax element lands on +-1 exactly
    idx = x.view(-1, 64).abs().argmax(1, keepdim=True)
    assert torch.equal(y.view(-1, 64).gather(1, idx), x.view(-1, 64).gather(1, idx))


def test_blockwise4_gaussian_error_bounded() -> None:
    x = torch.randn(64, 4096, generator=gen(4)) * 3
    enc = encode(x, "blockwise4")
    y = decode(enc)
    check_within_bound(x, enc, y)
    absmax = x.view(-1, 64).abs().amax(1, keepdim=True)
    # bfloat16 scales are rounded up: at most 2^-8 coarser than the block absmax
    assert float(((y - x).view(-1, 64).abs() / absmax).max()) <= NF4.max_error * (1 + 2**-8) * (1 + 1e-6)
    assert float((y - x).norm() / x.norm()) < 0.10


def test_outlier_only_coarsens_its_own_block() -> None:
    x = torch.randn(4096, generator=gen(5))
    x[100] = 1000.0
    y = decode(encode(x, "blockwise8"))
    others = torch.ones(4096, dtype=torch.bool)
    others[64:128] = False
    assert float((y - x)[others].abs().max()) < 0.0071 * float(x[others].abs().max())
    assert float(y[100]) == 1000.0


@pytest.mark.parametrize("name", ["fp16", "none"])
def test_cast_codecs(name: str) -> None:
    x = torch.randn(33, 7, generator=gen(6))
    y = decode(encode(x, name))
    expected = x.half().float() if name == "fp16" else x
    assert torch.equal(y, expected)


# ---------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("shape", [(4096,), (8, 512, 576), (3, 1500), (64, 65)])
def test_wire_ratio(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=gen(7))
    fp32 = x.numel() * 4
    assert encode(x, "blockwise8").nbytes <= 0.27 * fp32
    rows = x.numel() // shape[-1]
    # blockwise4's wide-feature bitmap is one bit per feature per tensor: 1/4 of a bit per value
    # on a single row (a decoded token), nothing much from a few dozen rows on (a prefill).
    assert encode(x, "blockwise4").nbytes <= (0.15 if rows >= 64 else 0.15 + 1 / (32 * rows)) * fp32
    assert encode(x, "fp16").nbytes == fp32 // 2
    assert encode(x, "none").nbytes == fp32


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (1,), (63,), (65,), (2, 3, 5), (128, 64)])
def test_encoded_nbytes_predicts_size(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=gen(8)).to(dtype)
    enc = encode(x, name)
    assert enc.nbytes == encoded_nbytes(name, shape, dtype)
    y = decode(enc)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_encoded_nbytes_counts_scales() -> None:
    assert encoded_nbytes("blockwise8", (640,)) == 640 + 10 * 4
    # one row of 641 features, 53 wide: bitmap, 4-bit codes, wide low nibbles; bfloat16 scales
    assert encoded_nbytes("blockwise4", (641,)) == 81 + 321 + 27 + (11 + 1) * 2
    assert encoded_nbytes("blockwise4", (11,)) == 6 + 2  # under 12 features: plain 4-bit blocks
    assert encoded_nbytes(BlockwiseCodec("blockwise4", NF4, 4), (641,)) == 321 + 11 * 4
    assert encoded_nbytes(BlockwiseCodec("blockwise8", DYNAMIC8, 8, 128, torch.float16), (640,)) == 640 + 5 * 2
    assert encoded_nbytes("none", (10,), torch.bfloat16) == 20
    with pytest.raises(ValueError, match="unknown codec"):
        encoded_nbytes("zstd", (10,))


# ------------------------------------------------------------------------ shapes and dtypes


@pytest.mark.parametrize("name", ["blockwise8", "blockwise4"])
@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64])
def test_blockwise_dtypes_and_noncontiguous(name: str, dtype: torch.dtype) -> None:
    base = (torch.randn(40, 70, generator=gen(9)) * 5).to(dtype)
    for x in (base, base.t(), base[::3, 1::2], base[5]):
        assert not x.is_contiguous() or x is base or x.dim() == 1
        before = x.clone()
        enc = encode(x, name)
        y = decode(enc)
        assert torch.equal(x, before), "encode must not modify its input"
        assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
        check_within_bound(x.contiguous(), enc, y)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_empty_and_scalar(name: str) -> None:
    for x in (torch.empty(0), torch.empty(3, 0, 2), torch.tensor(2.5)):
        y = decode(encode(x, name))
        assert y.shape == x.shape
        assert torch.equal(y, x)  # 2.5 is on every grid: it is its own block's absmax


# --------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", ["blockwise8", "blockwise4"])
def test_zero_blocks(name: str) -> None:
    x = torch.randn(5, 64, generator=gen(10))
    x[1] = 0.0
    x[3, :] = -0.0
    enc = encode(x, name)
    assert float(enc.scales[1]) == 0.0 and float(enc.scales[3]) == 0.0
    y = decode(enc)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros(64)) and float(y[3].abs().max()) == 0.0
    assert torch.equal(decode(encode(torch.zeros(1000), name)), torch.zeros(1000))


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rejected(name: str, bad: float) -> None:
    x = torch.randn(300, generator=gen(11))
    x[123] = bad
    what = "NaN" if math.isnan(bad) else "inf"
    with pytest.raises(ValueError, match=f"1 {what}"):
        encode(x, name)
    with pytest.raises(ValueError, match="non-finite"):
        encode(x.to(torch.bfloat16), name)


def test_extreme_magnitudes() -> None:
    x = torch.tensor([3e38, -1e38, 1.0, 1e-40, 0.0] * 20)
    enc = encode(x, "blockwise8")
    y = decode(enc)
    assert torch.isfinite(y).all() and float(y[0]) == float(x[0])
    check_within_bound(x, enc, y)
    tiny = torch.full((64,), 1e-42)  # subnormal block: normalised by division, so no overflow
    assert torch.equal(decode(encode(tiny, "blockwise8")), tiny)


def test_fp16_codec_overflow_rejected() -> None:
    with pytest.raises(ValueError, match="overflow float16"):
        encode(torch.tensor([1.0, 70000.0]), "fp16")
    assert float(decode(encode(torch.tensor([65504.0]), "fp16"))) == 65504.0


def test_half_precision_scales_round_up() -> None:
    codec = BlockwiseCodec("blockwise8", DYNAMIC8, 8, block_size=33, scale_dtype=torch.float16)
    x = torch.randn(10, 99, generator=gen(12)) * 3
    enc = codec.encode(x)
    assert enc.scales.dtype == torch.float16 and enc.block_size == 33
    absmax = torch.nn.functional.pad(x.reshape(-1), (0, 33 * 30 - 990)).view(-1, 33).abs().amax(1)
    assert torch.all(enc.scales.float() >= absmax)
    y = decode(enc)  # the registry codec decodes a non-default block size: it is in the value
    check_within_bound(x, enc, y)
    with pytest.raises(ValueError, match="float32"):
        codec.encode(torch.tensor([1e6]))


def test_deterministic() -> None:
    x = torch.randn(3, 1000, generator=gen(13))
    for name in ("blockwise8", "blockwise4"):
        a, b = encode(x, name), encode(x.clone(), name)
        assert torch.equal(a.payload, b.payload) and torch.equal(a.scales, b.scales)


def test_decode_validates() -> None:
    x = torch.randn(200, generator=gen(14))
    enc = encode(x, "blockwise8")
    fields = dict(codec=enc.codec, shape=enc.shape, dtype=enc.dtype, block_size=enc.block_size)
    with pytest.raises(ValueError, match="payload"):
        decode(Encoded(**fields, payload=enc.payload[:-1], scales=enc.scales))
    with pytest.raises(ValueError, match="scales"):
        decode(Encoded(**fields, payload=enc.payload, scales=enc.scales[:-1]))
    with pytest.raises(ValueError, match="finite"):
        decode(Encoded(**fields, payload=enc.payload, scales=torch.full_like(enc.scales, math.nan)))
    with pytest.raises(ValueError, match="unknown codec"):
        decode(Encoded(**{**fields, "codec": "gzip"}, payload=enc.payload, scales=enc.scales))
    with pytest.raises(ValueError, match="payload"):
        decode(Encoded("fp16", (3,), torch.float32, 0, torch.zeros(3), None))
    with pytest.raises(ValueError, match="shape"):
        decode(Encoded(**{**fields, "shape": (-200,)}, payload=enc.payload, scales=enc.scales))
    with pytest.raises(ValueError, match="float"):
        encode(torch.arange(5), "blockwise8")


def test_bad_codec_config() -> None:
    with pytest.raises(ValueError):
        BlockwiseCodec("x", DYNAMIC8, bits=4)
    with pytest.raises(ValueError):
        BlockwiseCodec("x", NF4, bits=4, block_size=0)
    assert CODECS["blockwise8"].block_size == DEFAULT_BLOCK_SIZE == 64


# ---------------------------------------------------------------------------- properties

shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    log_scale=st.floats(-20, 20),
    name=st.sampled_from(["blockwise8", "blockwise4"]),
    dtype=st.sampled_from(FLOATS),
    block=st.sampled_from([1, 7, 64, 100]),
    scale_dtype=st.sampled_from(FLOATS),
    seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_within_bound(shape, log_scale, name, dtype, block, scale_dtype, seed) -> None:
    if torch.float16 in (dtype, scale_dtype):
        log_scale = max(min(log_scale, 3.0), -3.0)
    x = (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * 10.0**log_scale).to(dtype)
    bits = 8 if name == "blockwise8" else 4
    codec = BlockwiseCodec(name, BLOCKWISE[name], bits, block_size=block, scale_dtype=scale_dtype)
    enc = codec.encode(x)
    y = codec.decode(enc)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert enc.nbytes == encoded_nbytes(codec, shape, dtype)
    check_within_bound(x, enc, y, BLOCKWISE[name])
    codes = codes_of(enc)
    book = BLOCKWISE[name]
    assert codes.numel() == x.numel()
    if codes.numel():
        assert int(codes.max()) < book.size  # 8-bit: code 255 (the spare) is never produced
        # codes are exactly the nearest levels of the normalised values
        scale = enc.scales.double().repeat_interleave(block)[: x.numel()]
        v = (x.reshape(-1).double() / torch.where(scale > 0, scale, 1.0)).float()
        assert torch.equal(codes.long(), torch.bucketize(v, book.mids))


# ------------------------------------------------------------------------------ LLM.int8()


def test_quantize_rows() -> None:
    w = torch.randn(50, 300, generator=gen(20)) * torch.logspace(-3, 3, 50)[:, None]
    w[7] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and int(q[7].abs().max()) == 0
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (3, 1, 5), (17, 33, 9), (0, 8, 4), (128, 576, 64)])
def test_int8_matmul_exact(m: int, k: int, n: int) -> None:
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen(21))
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen(22))
    got = int8_matmul(a, b.t())
    assert got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long().t())


def test_outlier_columns() -> None:
    x = torch.zeros(2, 3, 10)
    x[1, 2, 4] = -7.0
    x[0, 0, 8] = 6.5
    x[0, 1, 1] = 6.0  # not above the threshold
    assert outlier_columns(x).tolist() == [4, 8]
    assert outlier_columns(x, threshold=6.6).tolist() == [4]
    assert outlier_columns(torch.empty(0, 10)).numel() == 0


def make_linear(in_f: int = 576, out_f: int = 1536, seed: int = 30, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def with_outliers(x: torch.Tensor, cols: list[int], factor: float = 40.0) -> torch.Tensor:
    x = x.clone()
    x[..., cols] *= factor
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("batch", [1, 128])
def test_int8_linear_close_to_fp32(batch: int) -> None:
    lin = make_linear()
    q = Int8Linear.from_linear(lin)
    naive = Int8Linear.from_linear(lin, threshold=math.inf)  # plain row-wise int8, no decomposition
    x = torch.randn(batch, 576, generator=gen(31))
    xo = with_outliers(x, [3, 100, 400])
    with torch.no_grad():
        assert rel_err(q(x), lin(x)) < 0.015
        ref = lin(xo)
        err, naive_err = rel_err(q(xo), ref), rel_err(naive(xo), ref)
    assert err < 0.015
    assert naive_err > 5 * err  # the mixed decomposition is what keeps outlier inputs accurate


def test_int8_linear_calibration_keeps_outlier_columns_in_fp32() -> None:
    lin = make_linear()
    calib = with_outliers(torch.randn(64, 576, generator=gen(32)), [3, 100, 400])
    q = Int8Linear.from_linear(lin, calibration=calib)
    assert q.fp_columns.tolist() == [3, 100, 400]
    assert torch.equal(q.weight_fp, lin.weight.detach()[:, [3, 100, 400]])
    assert int(q.weight_int8[:, [3, 100, 400]].abs().max()) == 0
    plain = Int8Linear.from_linear(lin)
    x = with_outliers(torch.randn(16, 576, generator=gen(33)), [3, 100, 400, 7])  # 7: not calibrated
    with torch.no_grad():
        ref = lin(x)
        assert rel_err(q(x), ref) < 0.7 * rel_err(plain(x), ref)
    capped = Int8Linear.from_linear(lin, calibration=calib, max_fp_columns=2)
    assert capped.fp_columns.numel() == 2
    assert memory_bytes(q) <= 0.35 * fp32_bytes(lin)


def memory_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def fp32_bytes(lin: nn.Linear) -> int:
    return sum(p.numel() * 4 for p in lin.parameters())


def test_int8_linear_memory() -> None:
    lin = make_linear(576, 1536)
    q = Int8Linear.from_linear(lin)
    assert memory_bytes(q) <= 0.35 * fp32_bytes(lin)
    stored = [*q.parameters(), *q.buffers()]
    assert not any(t.is_floating_point() and t.numel() >= lin.weight.numel() for t in stored)


def test_int8_linear_shapes_dtypes_and_no_bias() -> None:
    lin = make_linear(64, 32, bias=False)
    q = Int8Linear.from_linear(lin)
    assert q.bias is None
    x = torch.randn(2, 5, 64, generator=gen(34))
    with torch.no_grad():
        y = q(x)
        assert y.shape == (2, 5, 32) and rel_err(y, lin(x)) < 0.015
        yb = q(x.to(torch.bfloat16))
        assert yb.dtype == torch.bfloat16 and rel_err(yb.float(), lin(x)) < 0.02
        assert q(torch.empty(0, 64)).shape == (0, 32)
        assert torch.equal(q(torch.zeros(3, 64)), torch.zeros(3, 32))


def test_int8_linear_state_dict_roundtrip() -> None:
    lin = make_linear(128, 48)
    calib = with_outliers(torch.randn(8, 128, generator=gen(35)), [5, 9])
    q = Int8Linear.from_linear(lin, calibration=calib)
    fresh = Int8Linear(128, 48)
    fresh.load_state_dict(q.state_dict())
    x = with_outliers(torch.randn(4, 128, generator=gen(36)), [5, 20])
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    assert fresh.fp_columns.tolist() == [5, 9]


def test_quantize_module_linears() -> None:
    torch.manual_seed(40)
    shared = nn.Linear(32, 32)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(shared, nn.GELU(), shared), nn.Linear(32, 8))
    x = torch.randn(10, 16, generator=gen(41))
    with torch.no_grad():
        ref = model(x)
        out = quantize_module_linears(model, exclude={"3"})
        assert out is model
        assert isinstance(model[0], Int8Linear) and isinstance(model[3], nn.Linear)
        assert isinstance(model[2][0], Int8Linear) and model[2][0] is model[2][2]
        assert rel_err(model(x), ref) < 0.03
    assert isinstance(quantize_module_linears(nn.Linear(4, 4)), Int8Linear)


def _int8_reference(xd: np.ndarray, wq: np.ndarray, sw: np.ndarray, bias: np.ndarray, threshold: float) -> np.ndarray:
    """Int8Linear restated in float64 numpy: one int8 digit, or two (base 254) past the threshold."""
    absmax = np.maximum(np.abs(xd).max(1), 1e-30)
    s = absmax / 127
    if absmax.max() > threshold:
        v = np.round(xd * (127 * 254 / absmax)[:, None])
        hi = np.round(v / 254)
        lo = v - 254 * hi
        assert np.abs(hi).max() <= 127 and np.abs(lo).max() <= 127
        acc = (hi @ wq.T) + (lo @ wq.T) / 254
    else:
        acc = np.round(xd / s[:, None]) @ wq.T
    return acc * s[:, None] * sw[None, :] + bias


@pytest.mark.parametrize("scale", [0.5, 1.5])  # under the threshold everywhere; with outliers
def test_int8_linear_matches_numpy_reference(scale: float) -> None:
    lin = make_linear(40, 24)
    q = Int8Linear.from_linear(lin, threshold=2.5)
    x = torch.randn(6, 40, generator=gen(42)) * scale
    xd = x.double().numpy()
    wq, sw = q.weight_int8.double().numpy(), q.weight_scale.double().numpy()
    expected = _int8_reference(xd, wq, sw, lin.bias.detach().double().numpy(), 2.5)
    with torch.no_grad():
        got = q(x).double().numpy()
    assert (np.abs(xd).max() > 2.5) == (scale > 1)
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_int8_two_digits_keep_activations_to_15_bits() -> None:
    """Past the threshold, the activation error is at most absmax / 64516: the weight error dominates."""
    lin = make_linear()
    q = Int8Linear.from_linear(lin)
    x = with_outliers(torch.randn(4, 576, generator=gen(43)), [3, 100, 400], factor=60.0)
    exact_weights = nn.Linear(576, 1536)
    with torch.no_grad():
        exact_weights.weight.copy_(q.weight_int8.float() * q.weight_scale[:, None])
        exact_weights.bias.copy_(lin.bias)
        assert rel_err(q(x), exact_weights(x)) < 2e-4


# ------------------------------------------------------------- blockwise4: wide features in 8 bits


def massive(rows: int = 256, features: int = 576, cols=(3, 100, 101, 400), seed: int = 40) -> torch.Tensor:
    """LLM-like activations: a few features ~100x the others in every row."""
    x = torch.randn(rows, features, generator=gen(seed))
    x[:, list(cols)] *= 100.0
    return x


def test_blockwise4_sends_massive_features_in_8_bits() -> None:
    x = massive()
    enc = encode(x, "blockwise4")
    is_wide, _, wide = CODECS["blockwise4"].split(enc)
    assert int(is_wide.sum()) == 576 // 12 and is_wide[[3, 100, 101, 400]].all()  # 100, 101 share a byte
    y = decode(enc)
    check_within_bound(x, enc, y)
    plain = BlockwiseCodec("nf4", NF4, 4)  # the old blockwise4: one massive feature per block wipes it
    y_plain = plain.decode(plain.encode(x))
    rest = torch.ones(576, dtype=torch.bool)
    rest[[3, 100, 101, 400]] = False
    err, err_plain = rel_err(y[:, rest], x[:, rest]), rel_err(y_plain[:, rest], x[:, rest])
    assert err < 0.10 and err_plain > 3 * err
    assert rel_err(y[:, ~rest], x[:, ~rest]) < 0.01  # 8-bit dynamic codes, blocks of one feature


@pytest.mark.parametrize("shape", [(1, 576), (3, 65), (7, 24), (5, 13), (2, 3, 12), (64,), (1, 100_000)])
def test_blockwise4_layouts_roundtrip_within_bound(shape: tuple[int, ...]) -> None:
    # |x| grows with the feature index (random signs): the last features are the wide ones
    x = torch.randn(shape, generator=gen(41)).sign() * torch.linspace(0.1, 30, shape[-1])
    enc = encode(x, "blockwise4")
    lay = CODECS["blockwise4"].layout(shape)
    assert lay.wide == shape[-1] // 12
    assert enc.payload.numel() == lay.payload and enc.scales.numel() == lay.scales
    assert enc.nbytes == encoded_nbytes("blockwise4", shape) == lay.payload + 2 * lay.scales
    y = decode(enc)
    assert y.shape == x.shape
    check_within_bound(x, enc, y)
    is_wide, _, _ = CODECS["blockwise4"].split(enc)
    assert is_wide.nonzero().squeeze(1).tolist() == list(range(shape[-1] - lay.wide, shape[-1]))


def test_blockwise4_prefill_bytes() -> None:
    enc = encode(torch.randn(512, 576, generator=gen(42)), "blockwise4")
    # bitmap 72 B, 4-bit codes, low nibbles of 512 x 48 wide values; (4608 + 384) bfloat16 scales
    assert enc.nbytes == 72 + 147_456 + 12_288 + (4608 + 384) * 2
    assert enc.nbytes / (512 * 576 * 4) < 0.144


def test_blockwise4_accepts_what_the_plain_codec_did() -> None:
    x = massive(rows=8).requires_grad_()
    assert decode(encode(x, "blockwise4")).shape == x.shape  # no numpy() on a grad-tracking tensor
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = massive(rows=8).to(dtype)
        check_within_bound(xd, encode(xd, "blockwise4"), decode(encode(xd, "blockwise4")))
    big = massive(rows=8) * 1e30  # float32 squares overflow: the feature scores fall back to float64
    check_within_bound(big, encode(big, "blockwise4"), decode(encode(big, "blockwise4")))
    with pytest.raises(ValueError, match="overflows torch.bfloat16 scales"):
        encode(torch.full((4, 24), 3.4e38), "blockwise4")


def test_blockwise4_decode_validates() -> None:
    x = massive(rows=4, features=65, cols=(3, 40))  # 9 bitmap bytes, 7 padding bits
    enc = encode(x, "blockwise4")
    fields = dict(codec=enc.codec, shape=enc.shape, dtype=enc.dtype, block_size=enc.block_size)

    def with_payload(p: torch.Tensor) -> Encoded:
        return Encoded(**fields, payload=p, scales=enc.scales)

    flipped = enc.payload.clone()
    assert int(flipped[0]) & 8  # feature 3 is wide
    flipped[0] &= ~8
    with pytest.raises(ValueError, match="bitmap must mark 5 of 65 features, got 4"):
        decode(with_payload(flipped))
    padded = enc.payload.clone()
    padded[8] |= 0x80  # bit 71: past feature 64
    with pytest.raises(ValueError, match="1 set padding bits"):
        decode(with_payload(padded))
    with pytest.raises(ValueError, match="payload"):
        decode(with_payload(enc.payload[:-1]))
    with pytest.raises(ValueError, match="scales"):
        decode(Encoded(**fields, payload=enc.payload, scales=enc.scales[:-1]))
    bad = enc.scales.clone()
    bad[-1] = math.inf  # a wide block's scale
    with pytest.raises(ValueError, match="finite"):
        decode(Encoded(**fields, payload=enc.payload, scales=bad))
    assert torch.equal(decode(with_payload(enc.payload.clone())), decode(enc))
