"""Graph factories: how a planner, a server and a client all rebuild the *same* model and inputs.

A factory is named ``MODULE:FUNCTION`` (``MODULE`` importable, e.g. ``swarmshard.examples.graphs``)
and called with no arguments -- or with ``input_shape=(...)`` when the user overrides the example
input shape and the function declares that parameter. It returns ``(model, args)`` or
``(model, args, kwargs)``: an ``nn.Module`` and example inputs such that ``model(*args, **kwargs)``
is the computation to shard. Tensors anywhere in ``args``/``kwargs`` (also inside dicts, lists,
tuples) become the graph's inputs; other leaves are fixed at trace time.

It must be deterministic: every process that calls it must get the same weights (seed it, or load
a checkpoint), because servers check their stage's weight digest against the plan's.

Without an ``input_shape`` parameter, ``--input-shape`` still works when the example inputs hold
exactly one floating-point tensor: it is replaced by a seeded standard-normal tensor of the new
shape. Anything else is refused, since guessing how to resize integer ids or several inputs would
silently plan the wrong computation.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["FactoryError", "GraphExample", "load_factory", "make_example", "parse_shape"]

_FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class FactoryError(ValueError):
    """A factory that cannot be imported or called, or returned something unusable; names why."""


@dataclass
class GraphExample:
    """A model in eval mode plus the example inputs it is traced with."""

    factory: str
    input_shape: tuple[int, ...] | None
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def tensor_inputs(self) -> list[torch.Tensor]:
        return [x for x in tree_flatten((self.args, self.kwargs))[0] if isinstance(x, torch.Tensor)]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` (or ``1x3x32x32``) -> ``(1, 3, 32, 32)``; every size must be >= 1."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise FactoryError(f"input shape {text!r} must be integers separated by commas, e.g. 1,3,32,32") from None
    if not shape or any(d < 1 for d in shape):
        raise FactoryError(f"input shape {text!r} needs at least one size, each >= 1")
    return shape


def load_factory(spec: str) -> Any:
    """Import ``MODULE:FUNCTION`` and return the callable."""
    if not _FACTORY_PATTERN.match(spec):
        raise FactoryError(f"graph factory {spec!r} must look like MODULE:FUNCTION, e.g. swarmshard.examples.graphs:unet")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FactoryError(f"cannot import {module_name!r} for graph factory {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FactoryError(f"{module_name!r} has no callable {attr!r}")
    return factory


def _takes_input_shape(factory: Any) -> bool:
    try:
        return "input_shape" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _resize_single_input(args: tuple[Any, ...], kwargs: dict[str, Any], shape: tuple[int, ...],
                         spec: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    leaves, tree = tree_flatten((args, kwargs))
    tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    if len(tensors) != 1 or not leaves[tensors[0]].is_floating_point():
        raise FactoryError(
            f"{spec} takes no input_shape parameter and its example inputs are not a single floating-point "
            f"tensor ({len(tensors)} tensor inputs): give the factory an input_shape parameter"
        )
    old = leaves[tensors[0]]
    generator = torch.Generator().manual_seed(0)
    leaves[tensors[0]] = torch.randn(shape, generator=generator, dtype=torch.float32).to(old.dtype)
    new_args, new_kwargs = tree_unflatten(leaves, tree)
    return tuple(new_args), dict(new_kwargs)


def make_example(spec: str, input_shape: Sequence[int] | None = None) -> GraphExample:
    """Call factory ``spec`` (with ``input_shape`` if given) and check what it returned."""
    factory = load_factory(spec)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    pass_shape = shape is not None and _takes_input_shape(factory)
    try:
        result = factory(input_shape=shape) if pass_shape else factory()
    except FactoryError:
        raise
    except Exception as exc:
        raise FactoryError(f"graph factory {spec} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise FactoryError(f"graph factory {spec} must return (model, args) or (model, args, kwargs), "
                           f"got {type(result).__name__}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(model, nn.Module):
        raise FactoryError(f"graph factory {spec} returned {type(model).__name__} as the model, not an nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise FactoryError(f"graph factory {spec} must return args as a tuple and kwargs as a dict")
    args = tuple(args)
    if shape is not None and not pass_shape:
        args, kwargs = _resize_single_input(args, kwargs, shape, spec)
    model.eval()
    example = GraphExample(spec, shape, model, args, dict(kwargs))
    if not example.tensor_inputs():
        raise FactoryError(f"graph factory {spec} gave no tensor inputs to trace with")
    return example
