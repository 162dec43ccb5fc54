"""A zoo of structurally different tiny models, traced once per session for the graph/stage tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyUNet(nn.Module):
    """Encoder/decoder with long skips (input to output, encoder to decoder)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.down1 = nn.Conv2d(3, c, 3, padding=1)
        self.down2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.out = nn.Conv2d(2 * c, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = torch.relu(self.down1(x))
        d2 = torch.relu(self.down2(d1))
        m = torch.relu(self.mid(d2)) + d2
        u = self.up(m)
        return self.out(torch.cat([u, d1], dim=1)) + x


class DictIO(nn.Module):
    """Dict in, dict out, plus a non-tensor keyword specialised at trace time."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(6, 12)
        self.enc_b = nn.Linear(5, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, batch: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.enc_a(batch["a"]) + self.enc_b(batch["b"])) * scale
        return {"logits": self.head(h), "hidden": h, "a_sum": batch["a"].sum(-1)}


class TopKMoE(nn.Module):
    """Router + top-2 gating over parallel experts: wide branching that merges again."""

    def __init__(self, d: int = 8, n_experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.softmax(self.router(x), dim=-1)
        top = gates.topk(2, dim=-1)
        values, index = top[0], top[1]
        weights = torch.zeros_like(gates).scatter(-1, index, values / values.sum(-1, keepdim=True))
        out = x
        for e, expert in enumerate(self.experts):
            out = out + weights[..., e: e + 1] * expert(x)
        return out


def _resnet() -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)
    return ResNetModel(cfg), (torch.randn(1, 3, 32, 32),), {}


def _vit() -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    image_size=16, patch_size=8)
    return ViTModel(cfg), (torch.randn(2, 3, 16, 16),), {}


def _bert() -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return BertModel(cfg), (), {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": mask}


def _gpt2() -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg), (torch.randint(0, 50, (1, 8)),), {}


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple[Any, ...], dict[str, Any]]]] = {
    "mlp": lambda: (MLP(), (torch.randn(2, 8),), {}),
    "resnet": _resnet,
    "vit": _vit,
    "bert": _bert,
    "gpt2": _gpt2,
    "unet": lambda: (TinyUNet(), (torch.randn(1, 3, 8, 8),), {}),
    "dict_io": lambda: (DictIO(), ({"a": torch.randn(3, 6), "b": torch.randn(3, 5)},), {"scale": 0.5}),
    "moe": lambda: (TopKMoE(), (torch.randn(2, 5, 8),), {}),
}


@dataclass
class ZooEntry:
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    traced: Any  # swarmshard.core.graph.TracedModel


class Zoo:
    """Builds and traces each model on first use; tracing (torch.export) is the slow part."""

    def __init__(self) -> None:
        self._cache: dict[str, ZooEntry] = {}

    def __getitem__(self, name: str) -> ZooEntry:
        if name not in self._cache:
            from swarmshard.core.graph import trace_model

            torch.manual_seed(sum(map(ord, name)))
            model, args, kwargs = ZOO[name]()
            model.eval()
            self._cache[name] = ZooEntry(model, args, kwargs, trace_model(model, args, kwargs))
        return self._cache[name]


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zoo_name" in metafunc.fixturenames:
        metafunc.parametrize("zoo_name", list(ZOO))
