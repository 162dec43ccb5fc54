"""Benchmark the compression maths on one core; prints one JSON object per line.

- codec_throughput/<codec>: encode+decode MB/s of float32 input, (8, 512, 576) activations
  (SmolLM2-135M's hidden size, 4096 tokens), median of several runs (wall clock; the same from
  thread CPU time as cpu_time_MBps); target >= 500 MB/s for blockwise8 and blockwise4.
- wire_bytes_ratio/<codec>: encoded bytes / float32 bytes, with the roundtrip error.
- linear_576x1536/batch<B>/<impl>: ms per forward of an nn.Linear(576, 1536) in float32, as
  Int8Linear, and as torch's own dynamic int8 kernel (quantized::linear_dynamic, per-channel
  weights, full-range activations), timed interleaved in one run, with relative errors on
  plain and outlier-carrying inputs.

Run: .venv/bin/python bench/codecs.py
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from swarmshard.core.compression import CODECS, Int8Linear, decode, encode


def emit(name: str, value: float, unit: str, **extra: object) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def median_ms(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall-clock and thread-CPU milliseconds per call. On a shared machine the CPU
    time is the better measure of the code; the wall clock is what a caller would see."""
    fn()
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def bench_codecs(runs: int = 15) -> None:
    x = torch.randn(8, 512, 576, generator=torch.Generator().manual_seed(0))
    mb = x.numel() * 4 / 1e6
    for name in CODECS:
        enc = encode(x, name)
        enc_ms, _ = median_ms(lambda: encode(x, name), runs)
        dec_ms, _ = median_ms(lambda: decode(enc), runs)
        both_ms, both_cpu_ms = median_ms(lambda: decode(encode(x, name)), runs)
        extra: dict[str, object] = {
            "cpu_time_MBps": round(mb / (both_cpu_ms / 1e3), 1),
            "encode_ms": round(enc_ms, 3),
            "decode_ms": round(dec_ms, 3),
            "input_mb": round(mb, 3),
        }
        if name in ("blockwise8", "blockwise4"):
            extra["target"] = 500
        emit(f"codec_throughput/{name}", mb / (both_ms / 1e3), "MB/s", **extra)
    for name in CODECS:
        enc = encode(x, name)
        y = decode(enc)
        err = (y - x).view(-1, 64)
        absmax = x.view(-1, 64).abs().amax(1, keepdim=True)
        emit(
            f"wire_bytes_ratio/{name}",
            enc.nbytes / (x.numel() * 4),
            "ratio",
            rel_rmse=round(float(err.norm() / x.norm()), 6),
            max_err_over_block_absmax=round(float((err.abs() / absmax).max()), 6),
        )


def torch_dynamic_int8(linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's CPU int8 kernel at its most accurate: per-channel weights, no reduce_range."""
    w = linear.weight.detach()
    scale = (w.abs().amax(1) / 127).double()
    qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, linear.bias.detach())
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.double() - b.double()).norm() / b.double().norm()), 6)


def bench_linear(runs: int = 31) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(576, 1536)
    q = Int8Linear.from_linear(lin)
    tq = torch_dynamic_int8(lin)
    fp32_bytes = sum(p.numel() * 4 for p in lin.parameters())
    int8_bytes = sum(b.numel() * b.element_size() for b in q.buffers())
    emit("int8linear_memory_ratio/576x1536", int8_bytes / fp32_bytes, "ratio", bytes=int8_bytes, fp32_bytes=fp32_bytes)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 128):
        x = torch.randn(batch, 576, generator=g)
        xo = x.clone()
        xo[:, [3, 100, 400]] *= 40.0  # LLM-style outlier features
        impls = {"fp32": lin, "int8linear": q, "torch_dynamic_int8": tq}
        inner = 100 if batch == 1 else 5
        samples: dict[str, list[float]] = {k: [] for k in impls}
        samples["int8linear_outliers"] = []
        with torch.inference_mode():
            refs = (lin(x), lin(xo))
            for _ in range(runs):  # interleaved, so load changes hit every implementation alike
                for key, fn, inp in [*((k, f, x) for k, f in impls.items()), ("int8linear_outliers", q, xo)]:
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn(inp)
                    samples[key].append((time.perf_counter() - t0) / inner * 1e3)
            fp32_ms = statistics.median(samples["fp32"])
            for key, times in samples.items():
                fn = q if key == "int8linear_outliers" else impls[key]
                ms = statistics.median(times)
                extra: dict[str, object] = {"fp32_ms": round(fp32_ms, 4), "speedup_vs_fp32": round(fp32_ms / ms, 3)}
                if key != "int8linear_outliers":
                    extra["rel_err"] = rel_err(fn(x), refs[0])
                extra["rel_err_outlier_input"] = rel_err(fn(xo), refs[1])
                emit(f"linear_576x1536/batch{batch}/{key}", ms, "ms", **extra)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    # Other work on the machine skews every number below: say how busy it was.
    emit("machine/loadavg_1min", os.getloadavg()[0], "load", cpus=os.cpu_count())
    bench_codecs()
    bench_linear()


if __name__ == "__main__":
    main()
