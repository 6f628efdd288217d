"""Compatibility layers: small shims over transformers API changes (here) and, in submodules, EasyEdit's formats and API.

transformers 5.2x renamed the key/value cache argument and output field from
``past_key_values`` to ``cache`` (the old name warns and goes in 5.40). Both
spellings are supported here: a model's ``forward`` signature says which one
it takes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["build_cache", "cache_keyword", "cache_tensors", "output_cache", "takes_cache"]


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a key/value cache."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def takes_cache(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` accepts a key/value cache under either spelling."""
    return bool({"cache", "past_key_values"} & _forward_parameters(model))


def output_cache(output: Any) -> Any:
    """The key/value cache of a model output (None when it returned none)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    if "cache" in keys:
        return output["cache"]
    if "past_key_values" in keys:
        return output["past_key_values"]
    return None


def cache_tensors(cache: Any, num_layers: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) of a transformers cache, or None when its layout is not the expected one."""
    layers = getattr(cache, "layers", None)
    try:
        if layers is not None:
            kv = [(layer.keys, layer.values) for layer in layers]
        else:
            kv = list(zip(cache.key_cache, cache.value_cache))
    except (AttributeError, TypeError):
        return None
    if len(kv) != num_layers or any(k is None or k.dim() != 4 or k.shape[-2] != length for k, _ in kv):
        return None
    return kv


def build_cache(model: torch.nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A fresh dynamic cache holding ``kv`` (per layer: keys, values), to be extended by one forward pass."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer)
    return cache
