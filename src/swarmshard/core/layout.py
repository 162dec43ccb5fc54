"""Split any Hugging Face decoder LM into client part (embeddings, final norm, head) and block spans.

We never hand-write a block per architecture. Every decoder LM in `transformers` has a *base model*
whose children are: input-side modules (token and position embeddings, embedding norms, dropout),
one `nn.ModuleList` of decoder layers, output-side modules (final norm) and a rotary embedding. The
base model's own `forward` already knows the architecture's masks, rotary and cache handling, so:

- a **span** is the base model built with only its layers, the input side made transparent (it
  receives hidden states, so position embeddings add zero and embedding norms are identities) and
  the final norm made an identity;
- the **client** is the causal-LM built with zero layers: running its base model with the final norm
  made an identity gives the embeddings; the final norm plus the output head give the logits.

Whether this reproduces the full model is checked numerically when a model enters the store
(`verify_split`), so an architecture that breaks the pattern is refused, never silently wrong.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights


class UnsupportedArchitecture(ValueError):
    """The model does not follow the embeddings / layer stack / final norm / head pattern."""


@dataclass(frozen=True)
class DecoderLayout:
    """Where the parts of a causal LM live, by attribute name (discovered, not hard-coded)."""

    base_prefix: str  # attribute of the causal LM holding the base model ("model", "transformer", ...)
    layers_attr: str  # attribute of the base model holding the decoder layers ("layers", "h", ...)
    input_attrs: tuple[str, ...]  # base-model children applied before the layers
    output_attrs: tuple[str, ...]  # base-model children applied after the layers (final norm)
    token_embedding_attr: str  # which input attr is the token embedding
    head_attr: str  # attribute of the causal LM holding the output head

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` in the full causal LM."""
        return f"{self.base_prefix}.{self.layers_attr}.{index}."


def _is_rotary(module: nn.Module) -> bool:
    return "rotary" in type(module).__name__.lower()


def discover_layout(model: PreTrainedModel) -> DecoderLayout:
    """Find the layer stack, input/output modules and head of a causal LM generically."""
    config = model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    base_prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, base_prefix, None) if base_prefix else None
    if not isinstance(base, nn.Module) or n_layers is None:
        raise UnsupportedArchitecture(f"{type(model).__name__}: no base model or num_hidden_layers")
    children = list(base.named_children())
    stacks = [
        i for i, (_, child) in enumerate(children) if isinstance(child, nn.ModuleList) and len(child) == n_layers
    ]
    if len(stacks) != 1:
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: expected one ModuleList of {n_layers} decoder layers, found {len(stacks)}"
        )
    pos = stacks[0]
    token_embedding = model.get_input_embeddings()
    token_attr = next((name for name, child in children[:pos] if child is token_embedding), None)
    if token_attr is None:
        raise UnsupportedArchitecture(f"{type(model).__name__}: token embedding is not a base-model child")
    head = model.get_output_embeddings()
    head_attr = next((name for name, child in model.named_children() if child is head), None)
    if head_attr is None:
        raise UnsupportedArchitecture(f"{type(model).__name__}: output head is not a child of the model")
    return DecoderLayout(
        base_prefix=base_prefix,
        layers_attr=children[pos][0],
        input_attrs=tuple(name for name, child in children[:pos] if not _is_rotary(child)),
        output_attrs=tuple(name for name, child in children[pos + 1 :] if not _is_rotary(child)),
        token_embedding_attr=token_attr,
        head_attr=head_attr,
    )


def layout_from_config(config: PretrainedConfig) -> DecoderLayout:
    """Discover the layout on a weightless (meta-device) instance of the architecture."""
    probe = copy.deepcopy(config)
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(probe)
    return discover_layout(model)


def trimmed_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of ``config`` describing only layers ``[start, end)`` (per-layer lists sliced too)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == config.num_hidden_layers:
        cfg.layer_types = list(layer_types[start:end])
    return cfg


class _ZeroPositions(nn.Module):
    """Stands in for a learned position embedding on a span: positions were added by the client."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, ids: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim)


class _NoTokens(nn.Module):
    """Stands in for the token embedding on a span: servers see hidden states, never token ids."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("a span received token ids; it only accepts hidden states")


def _renumber_layers(layers: nn.ModuleList) -> None:
    """Layers index the KV cache by ``layer_idx``; a span's cache holds only its own layers."""
    for local_index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = local_index


def build_span(
    config: PretrainedConfig, layout: DecoderLayout, start: int, end: int, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """An empty (uninitialised) base model computing layers ``[start, end)`` on hidden states.

    Its state dict keys are ``{layers_attr}.{i}.…`` with ``i`` local to the span; load weights with
    `span_state_dict_keys` mapping.
    """
    cfg = trimmed_config(config, start, end)
    with no_init_weights():
        base = AutoModel.from_config(cfg, torch_dtype=dtype)
    for attr in layout.input_attrs:
        child = getattr(base, attr)
        if attr == layout.token_embedding_attr:
            setattr(base, attr, _NoTokens())
        elif isinstance(child, nn.Embedding):
            setattr(base, attr, _ZeroPositions(child.embedding_dim))
        elif any(True for _ in child.parameters()):
            setattr(base, attr, nn.Identity())  # an embedding norm: already applied by the client
    for attr in layout.output_attrs:
        setattr(base, attr, nn.Identity())
    _renumber_layers(getattr(base, layout.layers_attr))
    return base.eval()


class ClientPart(nn.Module):
    """Embeddings, final norm and head: what stays on the client (split learning)."""

    def __init__(self, config: PretrainedConfig, layout: DecoderLayout, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        cfg = trimmed_config(config, 0, 0)
        with no_init_weights():
            self.lm = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
        self.layout = layout
        base = getattr(self.lm, layout.base_prefix)
        self.output_modules = nn.ModuleList([getattr(base, attr) for attr in layout.output_attrs])
        for attr in layout.output_attrs:
            setattr(base, attr, nn.Identity())
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.eval()

    @property
    def base(self) -> nn.Module:
        return getattr(self.lm, self.layout.base_prefix)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids → the hidden states entering block 0."""
        out = self.base(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states leaving the last block → logits (float32)."""
        for module in self.output_modules:
            hidden = module(hidden)
        logits = getattr(self.lm, self.layout.head_attr)(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def load_client_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load the client tensors (full-model names); a tied head may be absent and is re-tied."""
        prefix = f"{self.layout.base_prefix}."
        remap: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            attr, _, local = key[len(prefix) :].partition(".") if key.startswith(prefix) else ("", "", "")
            if attr in self.layout.output_attrs:
                remap[f"output_modules.{self.layout.output_attrs.index(attr)}.{local}"] = tensor
            else:
                remap[f"lm.{key}"] = tensor
        missing, unexpected = self.load_state_dict(remap, strict=False)
        if unexpected:
            raise ValueError(f"client weights hold unexpected tensors: {unexpected[:5]}")
        tied = bool(getattr(self.lm.config, "tie_word_embeddings", False))
        if tied:
            getattr(self.lm, self.layout.head_attr).weight = self.lm.get_input_embeddings().weight
        head_key = f"lm.{self.layout.head_attr}.weight"
        still_missing = [k for k in missing if not (tied and k == head_key)]
        if still_missing:
            raise ValueError(f"client weights are missing tensors: {still_missing[:5]}")


def split_state_dict(
    state: dict[str, torch.Tensor], layout: DecoderLayout, n_blocks: int, tied: bool
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Full-model state dict → (client tensors, per-block tensors keyed locally as ``{layers}.0.…``)."""
    stack = f"{layout.base_prefix}.{layout.layers_attr}."
    blocks: list[dict[str, torch.Tensor]] = [{} for _ in range(n_blocks)]
    client: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(stack):
            index, _, rest = key[len(stack) :].partition(".")
            blocks[int(index)][rest] = tensor
        else:
            client[key] = tensor
    if tied:
        client.pop(f"{layout.head_attr}.weight", None)  # stored once with the embeddings, re-tied on load
    return client, blocks


def span_state_dict(layout: DecoderLayout, blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-block tensors (in span order) → the state dict of a `build_span` module."""
    return {f"{layout.layers_attr}.{i}.{name}": t for i, block in enumerate(blocks) for name, t in block.items()}


@torch.inference_mode()
def verify_split(
    model: PreTrainedModel, layout: DecoderLayout, cut_points: list[int], atol: float = 1e-4, seq_len: int = 7
) -> float:
    """Run a probe through client + spans cut at ``cut_points`` and compare to the full model.

    Returns the max abs logits error; raises `UnsupportedArchitecture` when above ``atol``.
    """
    config = model.config
    n = config.num_hidden_layers
    bounds = [0, *cut_points, n]
    state = model.state_dict()
    client_state, blocks = split_state_dict(state, layout, n, bool(getattr(config, "tie_word_embeddings", False)))
    client = ClientPart(config, layout)
    client.load_client_state(client_state)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=generator)
    positions = torch.arange(seq_len).unsqueeze(0)
    hidden = client.embed(ids, positions)
    for start, end in zip(bounds, bounds[1:]):
        if start == end:
            continue
        span = build_span(config, layout, start, end)
        span.load_state_dict(span_state_dict(layout, blocks[start:end]), strict=True)
        hidden = span(inputs_embeds=hidden, position_ids=positions, use_cache=False).last_hidden_state
    logits = client.head(hidden)
    expected = model(input_ids=ids, use_cache=False).logits.float()
    error = float((logits - expected).abs().max())
    if not error <= atol * max(1.0, float(expected.abs().max())):
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: split execution differs from the full model by {error:.3g}"
        )
    return error
