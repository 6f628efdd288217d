"""Small shims over transformers API changes, so the rest of the code names one spelling.

transformers 5.2x renamed the key/value cache argument and output field from
``past_key_values`` to ``cache`` (the old name warns and goes in 5.40). Both
spellings are supported here: a model's ``forward`` signature says which one
it takes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["cache_keyword", "output_cache", "takes_cache"]


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
