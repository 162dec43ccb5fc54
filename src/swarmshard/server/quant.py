"""Weight quantization of a served span (``swarmshard serve --quant``), applied after loading.

``int8``: every linear layer of the span becomes a `core.compression.Int8Linear` (LLM.int8(): int8
rows with per-row scales, outlier input features multiplied in float32), ~0.25x the memory of
float32 weights, on CPU. GPT-2-style ``Conv1D`` layers are linear layers with a transposed weight,
so they are converted too. Norms, rotary tables and the KV cache stay float32.

The block digests a server announces stay those of the stored float32 weights (what it loaded and
checked); the record's ``quant`` field tells clients what it does with them.

NF4 weights are not offered: the codebook exists (`core.compression.NF4`), but on CPU there is no
4-bit matmul kernel, so each forward would have to dequantize every weight to float32 first.
"""

from __future__ import annotations

from typing import get_args

from torch import nn
from transformers.pytorch_utils import Conv1D

from swarmshard.core.compression import Int8Linear, quantize_module_linears
from swarmshard.transport.schemas import QuantMode

QUANT_MODES: tuple[str, ...] = get_args(QuantMode)

# Input features whose |x| exceeds this go through the float32 side of the decomposition. LLM.int8()
# uses 6.0 for 6.7B+ models; SmolLM2's normalised activations rarely pass 2, but those that do carry
# most of the int8 error (the int8 step of a token is its largest remaining |x| / 127). On
# bench/accuracy.py's corpus: perplexity +0.15% at 2.0 against +0.9% at 6.0 (+3.9% on its first
# 512 tokens with an 8-bit wire, against +0.7% at 2.0). The price is speed: at batch 1 the outlier
# path runs on most calls, so decoding is 1.2x float32 on one thread but 0.8-0.9x with two, where
# float32's GEMV parallelises and the int8 path (small ops, a single-threaded int8 matmul) does not
# (1.1x at 6.0). ~1.5% of features leave int8 on a 512-token prompt.
INT8_THRESHOLD = 2.0


def check_quant(mode: str) -> str:
    """``mode`` if it is a quantization mode, else a ValueError listing the known ones."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; known: {', '.join(QUANT_MODES)}")
    return mode


def _conv1d_to_linear(conv: Conv1D) -> nn.Linear:
    """The same map as ``conv`` (``x @ W + b`` with ``W`` of shape (in, out)) as an nn.Linear."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, dtype=conv.weight.dtype)
    linear.weight.data.copy_(conv.weight.detach().t())
    if conv.bias is not None:
        linear.bias.data.copy_(conv.bias.detach())
    return linear


def quantize_span(module: nn.Module, mode: str) -> int:
    """Quantize ``module``'s weights in place; returns how many linear layers were converted.

    A span with no linear layer cannot be int8 and is refused rather than announced as such.
    """
    if check_quant(mode) == "none":
        return 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                setattr(parent, name, _conv1d_to_linear(child))
    quantize_module_linears(module, threshold=INT8_THRESHOLD)
    converted = sum(isinstance(m, Int8Linear) for m in module.modules())
    if converted == 0:
        raise ValueError(f"--quant {mode}: this span has no linear layers to quantize")
    return converted
