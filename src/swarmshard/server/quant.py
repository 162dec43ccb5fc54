"""Weight quantization of a served span (``swarmshard serve --quant``), applied after loading.

``int8``: every linear layer of the span becomes a `core.compression.Int8Linear` (int8 rows with
per-row scales; activations quantized per row, in two int8 digits once an outlier feature
appears), ~0.25x the memory of float32 weights, on CPU. Layers reading the same input (q/k/v,
gate/up) share one matmul (`core.int8_siblings`). GPT-2-style ``Conv1D`` layers are linear layers
with a transposed weight, so they are converted too. Norms, rotary tables and the KV cache stay
float32.

The block digests a server announces stay those of the stored float32 weights (what it loaded and
checked); the record's ``quant`` field tells clients what it does with them.

NF4 weights are not offered: the codebook exists (`core.compression.NF4`), but on CPU there is no
4-bit matmul kernel, so each forward would have to dequantize every weight to float32 first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

from torch import nn
from transformers.pytorch_utils import Conv1D

from swarmshard.core.compression import Int8Linear, quantize_module_linears
from swarmshard.core.int8_siblings import fuse_int8_siblings
from swarmshard.transport.schemas import QuantMode

QUANT_MODES: tuple[str, ...] = get_args(QuantMode)

# Once a feature's |x| passes this, its batch goes in two int8 digits (~15 bits) instead of one.
# LLM.int8() uses 6.0 for 6.7B+ models; SmolLM2's normalised activations rarely pass 2-3, but
# those that do carry most of the one-digit error (a token's int8 step is its largest |x| / 127).
# bench/accuracy.py (perplexity vs float32; decode speed of all 30 blocks vs float32, two threads):
# 2.0: -0.01%, 1.10x; 3.0: -0.14%, 1.19x; 4.0: +0.09%, 1.21x; 6.0: +0.58%, 1.23x.
INT8_THRESHOLD = 3.0


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


def quantize_span(module: nn.Module, mode: str, probe: Callable[[], object] | None = None) -> int:
    """Quantize ``module``'s weights in place; returns how many linear layers were converted.

    ``probe`` runs ``module`` once; with it, layers that read the same input (q/k/v, gate/up) are
    fused into one int8 matmul (`core.int8_siblings`). A span with no linear layer cannot be int8
    and is refused rather than announced as such.
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
    if probe is not None:
        fuse_int8_siblings(module, probe)
    return converted
