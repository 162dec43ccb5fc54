"""A loaded span of blocks: validated forward passes with or without a per-session KV cache."""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from swarmshard.core.layout import trimmed_config
from swarmshard.core.shard import Shard
from swarmshard.core.store import Manifest, ModelStore
from swarmshard.server.quant import quantize_span


class BadRequest(ValueError):
    """Input that does not fit this span (shape, dtype, positions); the text names the problem."""


class SpanBackend:
    """Executes blocks ``[start, end)`` of a stored model on hidden states."""

    def __init__(self, store: ModelStore, manifest: Manifest, start: int, end: int, quant: str = "none") -> None:
        self.shard = Shard(manifest.model_id, start, end, manifest.n_blocks)
        self.manifest = manifest
        self.config = trimmed_config(store.load_config(manifest), start, end)
        self.module = store.load_span(manifest, start, end)
        self.quant = quant
        self.dtype = manifest.torch_dtype
        self.hidden_size = manifest.hidden_size
        self.max_positions = getattr(self.config, "max_position_embeddings", None) or 1_000_000
        # After the digests were checked; the probe lets layers that share an input share a matmul.
        self.quantized_layers = quantize_span(self.module, quant, probe=self.probe)

    def probe(self) -> None:
        """One small forward on random hidden states (to see which layers read the same input)."""
        generator = torch.Generator().manual_seed(0)
        cache = self.new_cache()
        self.forward(torch.randn(1, 2, self.hidden_size, generator=generator), 0, cache)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.manifest.kv_bytes_per_token(self.shard.start, self.shard.end)

    def check_hidden(self, hidden: torch.Tensor, batch_size: int | None = None) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size or hidden.shape[1] < 1:
            raise BadRequest(
                f"hidden states must have shape (batch, seq_len >= 1, {self.hidden_size}), got {tuple(hidden.shape)}"
            )
        if batch_size is not None and hidden.shape[0] != batch_size:
            raise BadRequest(f"session was opened for batch {batch_size}, got batch {hidden.shape[0]}")
        if not torch.isfinite(hidden).all():
            raise BadRequest("hidden states contain NaN or infinite values")

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, position: int, cache: DynamicCache | None) -> torch.Tensor:
        """Run the span on ``hidden`` occupying positions ``[position, position + seq_len)``."""
        batch, seq_len, _ = hidden.shape
        if position + seq_len > self.max_positions:
            raise BadRequest(f"positions up to {position + seq_len} exceed the model's {self.max_positions}")
        if cache is not None:
            cached = cache.get_seq_length()
            if position > cached:
                raise BadRequest(f"step starts at position {position} but the session holds {cached} tokens")
            if position < cached:  # a replayed or rewritten suffix replaces what was there
                try:
                    cache.crop(position - cached)
                except ValueError as exc:  # e.g. sliding-window layers past their window
                    raise BadRequest(f"cannot rewind this session to position {position}: {exc}") from None
        elif position != 0:
            raise BadRequest("a stateless forward must start at position 0")
        positions = torch.arange(position, position + seq_len).unsqueeze(0).expand(batch, -1)
        out = self.module(
            inputs_embeds=hidden.to(self.dtype),
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def measure_throughput(self, steps: int = 8, prefix: int = 16) -> float:
        """Decode tokens/s of the whole span, measured on this machine (announced for routing)."""
        generator = torch.Generator().manual_seed(0)
        cache = self.new_cache()
        self.forward(torch.randn(1, prefix, self.hidden_size, generator=generator), 0, cache)
        token = torch.randn(1, 1, self.hidden_size, generator=generator)
        self.forward(token, prefix, cache)  # warm-up
        begin = time.perf_counter()
        for i in range(steps):
            self.forward(token, prefix + 1 + i, cache)
        return steps / max(time.perf_counter() - begin, 1e-9)
