"""Example graph factories: small models whose shapes stress model-agnostic sharding.

Each function follows the factory convention of :mod:`swarmshard.core.factory`: it returns
``(model, args[, kwargs])``, builds the same weights in every process (a private seed), and takes
``input_shape`` where resizing the example input makes sense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SEED = 1234


def _seeded(build: Callable[[], Any]) -> Any:
    """Run ``build`` with a fixed seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


class UNet(nn.Module):
    """Two-level encoder/decoder with long skips (encoder to decoder, input to output)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.down1 = nn.Conv2d(3, c, 3, padding=1)
        self.down2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.down3 = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(4 * c, 4 * c, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.fuse2 = nn.Conv2d(4 * c, 2 * c, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.out = nn.Conv2d(2 * c, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = torch.relu(self.down1(x))
        d2 = torch.relu(self.down2(d1))
        d3 = torch.relu(self.down3(d2))
        m = torch.relu(self.mid(d3)) + d3
        u2 = torch.relu(self.fuse2(torch.cat([self.up2(m), d2], dim=1)))
        u1 = self.up1(u2)
        return self.out(torch.cat([u1, d1], dim=1)) + x


def unet(input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """U-Net on images of ``input_shape`` (default 1,3,32,32; height and width divisible by 4)."""
    shape = tuple(input_shape or (1, 3, 32, 32))
    if len(shape) != 4 or shape[1] != 3 or shape[2] % 4 or shape[3] % 4:
        raise ValueError(f"unet needs an input shape (batch, 3, H, W) with H, W divisible by 4, got {shape}")
    return _seeded(lambda: (UNet(), (torch.randn(shape),)))


class DictModel(nn.Module):
    """Dict in, dict out, and a non-tensor keyword fixed at trace time."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_image = nn.Linear(12, 32)
        self.enc_text = nn.Linear(10, 32)
        self.mix = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, batch: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.enc_image(batch["image"]) + self.enc_text(batch["text"])) * scale
        h = h + self.mix(h)
        return {"logits": self.head(h), "hidden": h, "image_norm": batch["image"].norm(dim=-1)}


def dict_io(input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """Dict-in/dict-out model; ``input_shape`` is (batch,) or (batch, ...) -- only the batch is used."""
    batch = int(input_shape[0]) if input_shape else 4
    return _seeded(lambda: (DictModel(), ({"image": torch.randn(batch, 12), "text": torch.randn(batch, 10)},),
                            {"scale": 0.5}))


class TopKMoE(nn.Module):
    """Router + top-2 gating over parallel experts: wide branches merging again."""

    def __init__(self, d: int = 16, n_experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.softmax(self.router(x), dim=-1)
        values, index = gates.topk(2, dim=-1)
        weights = torch.zeros_like(gates).scatter(-1, index, values / values.sum(-1, keepdim=True))
        out = x
        for e, expert in enumerate(self.experts):
            out = out + weights[..., e: e + 1] * expert(x)
        return out


def moe(input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Top-2 mixture of experts over tokens of ``input_shape`` (default 2,8,16; last size 16)."""
    shape = tuple(input_shape or (2, 8, 16))
    if shape[-1] != 16:
        raise ValueError(f"moe works on 16 features: the last size of the input shape must be 16, got {shape}")
    return _seeded(lambda: (TopKMoE(), (torch.randn(shape),)))


def bert() -> tuple[nn.Module, tuple[()], dict[str, torch.Tensor]]:
    """A tiny random BERT (transformers, traced with torch.export): keyword inputs, ModelOutput out."""
    from transformers import BertConfig, BertModel

    def build() -> tuple[nn.Module, tuple[()], dict[str, torch.Tensor]]:
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        return BertModel(cfg), (), {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": mask}

    return _seeded(build)
