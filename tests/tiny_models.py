"""Tiny random decoder LMs from transformers configs: one per architecture family we support."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4)

CONFIGS = {
    "tiny-llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny-mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=8),
    "tiny-qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "tiny-gpt2": lambda: GPT2Config(vocab_size=211, n_embd=64, n_layer=6, n_head=4, n_positions=128),
    "tiny-phi3": lambda: Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0),
    "tiny-gptneox": lambda: GPTNeoXConfig(**COMMON, max_position_embeddings=128),
}


def save_tiny_models(root: Path, seed_offset: int = 0, names: list[str] | None = None) -> dict[str, Path]:
    paths = {}
    for name, make in CONFIGS.items():
        if names is not None and name not in names:
            continue
        torch.manual_seed(len(name) + seed_offset)
        config = make()
        config.eos_token_id = None  # generate exactly max_new_tokens
        model = AutoModelForCausalLM.from_config(config).eval()
        path = root / name
        model.save_pretrained(path)
        paths[name] = path
    return paths
