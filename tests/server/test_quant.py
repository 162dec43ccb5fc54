"""``serve --quant int8``: a span's linear layers become LLM.int8() layers, and the span still
computes (nearly) the same function at about a quarter of the weight memory.

Token identity with float32 is not expected from int8 weights; these tests bound the error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from swarmshard.core.compression import Int8Linear
from swarmshard.server.quant import QUANT_MODES, _conv1d_to_linear, check_quant, quantize_span
from swarmshard.server.shard import SpanBackend
from tests.tiny_models import CONFIGS

def _corpus_ids(store, manifest, n: int) -> torch.Tensor:
    """The first ``n`` tokens of Python's own help topics: fixed, offline text (as in bench/accuracy.py)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics.values())[: 40 * n]
    return torch.tensor([store.load_tokenizer(manifest)(text)["input_ids"][:n]])


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def smol_spans(store, smollm2):
    return {
        quant: [SpanBackend(store, smollm2, a, b, quant=quant) for a, b in [(0, 10), (10, 20), (20, 30)]]
        for quant in ("none", "int8")
    }


def test_int8_span_holds_int8_weights_at_a_third_of_the_memory(smol_spans):
    fp32, int8 = smol_spans["none"][0], smol_spans["int8"][0]
    assert int8.quantized_layers == 10 * 7  # q, k, v, o, gate, up, down per Llama block
    assert not any(type(m) is nn.Linear for m in int8.module.modules())
    assert all(m.weight_int8.dtype == torch.int8 for m in int8.module.modules() if isinstance(m, Int8Linear))
    assert fp32.quantized_layers == 0 and not any(isinstance(m, Int8Linear) for m in fp32.module.modules())
    assert _weight_bytes(int8.module) <= 0.35 * _weight_bytes(fp32.module)


@torch.inference_mode()
def test_int8_chain_predicts_like_float32(store, smollm2, smol_spans):
    client = store.load_client(smollm2)
    ids = _corpus_ids(store, smollm2, 512)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    logprobs = {}
    for quant, chain in smol_spans.items():
        hidden = client.embed(ids, positions)
        for backend in chain:
            hidden = backend.forward(hidden, 0, None)
        logprobs[quant] = torch.log_softmax(client.head(hidden)[0], dim=-1)
    p = logprobs["none"].exp()
    kl = (p * (logprobs["none"] - logprobs["int8"])).sum(-1)
    agreement = (logprobs["none"].argmax(-1) == logprobs["int8"].argmax(-1)).float().mean()
    nll = {q: -float(lp[:-1].gather(1, ids[0, 1:, None]).mean()) for q, lp in logprobs.items()}
    assert float(kl.mean()) < 0.02, f"mean KL(fp32 || int8) per token {float(kl.mean()):.4f}"
    assert float(agreement) >= 0.9, f"top-1 agreement {float(agreement):.2f}"
    assert nll["int8"] - nll["none"] < 0.01, f"perplexity ratio {torch.tensor(nll['int8'] - nll['none']).exp():.4f}"


@torch.inference_mode()
def test_int8_span_with_kv_cache_matches_its_stateless_forward(store, smollm2, smol_spans):
    """Decoding token by token against the cache gives what one pass over the sequence gives (up to
    the outlier features, which are those of the tokens sharing a pass)."""
    ids = _corpus_ids(store, smollm2, 12)
    x = smol_spans["none"][0].forward(store.load_client(smollm2).embed(ids, torch.arange(12)[None]), 0, None)
    backend = smol_spans["int8"][1]
    whole = backend.forward(x, 0, None)
    cache = backend.new_cache()
    parts = [backend.forward(x[:, :8], 0, cache)] + [backend.forward(x[:, i : i + 1], i, cache) for i in range(8, 12)]
    stepped = torch.cat(parts, dim=1)
    assert cache.get_seq_length() == 12
    assert float((stepped - whole).norm() / whole.norm()) < 0.02


@pytest.fixture(scope="module")
def stored(store, tiny_model_dirs):
    return {name: store.resolve(str(path), progress=False) for name, path in tiny_model_dirs.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.inference_mode()
def test_int8_works_for_every_architecture(store, stored, name):
    """GPT-2's Conv1D layers are linear layers too: they are converted, not skipped."""
    manifest = stored[name]
    fp32 = SpanBackend(store, manifest, 0, manifest.n_blocks)
    int8 = SpanBackend(store, manifest, 0, manifest.n_blocks, quant="int8")
    assert int8.quantized_layers > 0
    assert not any(isinstance(m, (nn.Linear, Conv1D)) for m in int8.module.modules())
    x = torch.randn(2, 7, manifest.hidden_size, generator=torch.Generator().manual_seed(1))
    expected, got = fp32.forward(x, 0, None), int8.forward(x, 0, None)
    error = float((got - expected).norm() / expected.norm())
    assert error < 0.05, f"{name}: relative error {error:.4f}"


@torch.inference_mode()
def test_conv1d_becomes_an_exact_linear_then_int8():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs: y = x @ W + b with W of shape (16, 24)
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 16)
    expected = conv(x)
    assert torch.allclose(_conv1d_to_linear(conv)(x), expected, atol=1e-6)
    wrapper = nn.Sequential(conv)
    assert quantize_span(wrapper, "int8") == 1
    assert isinstance(wrapper[0], Int8Linear) and wrapper[0].out_features == 24
    assert float((wrapper[0](x) - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_unknown_modes_and_linear_free_spans_are_refused():
    assert QUANT_MODES == ("none", "int8")
    with pytest.raises(ValueError, match="unknown quantization 'nf4'; known: none, int8"):
        check_quant("nf4")
    with pytest.raises(ValueError, match="no linear layers to quantize"):
        quantize_span(nn.Sequential(nn.LayerNorm(8)), "int8")
    assert quantize_span(nn.Sequential(nn.Linear(4, 4)), "none") == 0
