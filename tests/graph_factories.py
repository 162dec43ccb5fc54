"""Graph factories over the test zoo (tests/core/conftest.py), importable by server processes.

Server processes run ``python -m swarmshard.cli serve --graph tests.graph_factories:NAME`` from the
repository root, so the zoo's models are served exactly as the core tests trace them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _zoo(name: str) -> tuple[Any, ...]:
    from tests.core.conftest import ZOO

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sum(map(ord, name)))  # the seed the zoo fixture uses
        return ZOO[name]()


def unet() -> tuple[Any, ...]:
    return _zoo("unet")


def dict_io() -> tuple[Any, ...]:
    return _zoo("dict_io")


def moe() -> tuple[Any, ...]:
    return _zoo("moe")


def mlp_plain() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """No ``input_shape`` parameter and one float input: ``--input-shape`` replaces that input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (torch.randn(2, 8),)


def two_inputs() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Two inputs and no ``input_shape`` parameter: an input-shape override must be refused."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Bilinear(8, 8, 4), (torch.randn(2, 8), torch.randn(2, 8))


def unseeded() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Fresh random weights on every call: servers must refuse to serve a plan made with it."""
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), (torch.zeros(2, 8),)


def not_a_model() -> tuple[str, tuple[()]]:
    return "model", ()
