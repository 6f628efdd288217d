"""Per-model state beside the model: slots per owner, dropped with the model, one reset for everything."""

from __future__ import annotations

import gc
import weakref

import torch

from lmedit import model_state


def test_slots_are_per_object_and_per_owner() -> None:
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert model_state.slot(first, "a") is None  # no default: nothing is created
    assert model_state.owners(first) == []
    made = model_state.slot(first, "a", dict)
    made["k"] = 1
    assert model_state.slot(first, "a") == {"k": 1} and model_state.slot(second, "a") is None
    model_state.put(first, "b", "value")
    assert model_state.owners(first) == ["a", "b"]
    model_state.drop(first, "a")
    assert model_state.owners(first) == ["b"]
    model_state.drop(first, "b")
    model_state.drop(first, "never-set")  # nothing to do
    assert model_state.owners(first) == []


def test_state_dies_with_its_model() -> None:
    model = torch.nn.Linear(2, 2)
    model_state.put(model, "a", [1, 2, 3])
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_reset_clears_one_model_or_everything_and_the_process_caches() -> None:
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model_state.put(first, "a", 1)
    model_state.put(second, "a", 2)
    cache = {"loaded": True}
    model_state.register_process_cache("test-cache", cache.clear)
    model_state.reset(first)
    assert model_state.owners(first) == [] and model_state.owners(second) == ["a"] and cache
    model_state.reset()
    assert model_state.owners(second) == [] and not cache
