"""Pre-edit captures reused across runs on the same unedited model in one process.

A table (``lmedit reproduce knowedit-table``), a sweep or the web app runs
many methods on one loaded model and one data file, and each run first scores
every probe on the unedited model: the same forward passes and generations
every time (on KnowEdit's Sanitation set a third of a cheap method's run).
The capture depends only on the model's weights and modules, the tokenizer,
the evaluation settings (which a method may change: no packing, no
generation cache) and the requests, so it is kept beside the model object
(:mod:`lmedit.model_state`) under exactly that key and handed to a later run
that asks for the same requests, or some of them (a run resumed in the same process), unchanged.
A model whose weights differ in any bit gets a fresh capture.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Sequence

import torch

from lmedit import model_state
from lmedit.evaluation.evaluator import Evaluator, Snapshot
from lmedit.forward import ProgressFn
from lmedit.requests import EditRequest
from lmedit.routing import router_of

LOG = logging.getLogger(__name__)

_OWNER = "pre-edit captures"
KEPT = 3
"""Captures kept per model: a table alternates between a few evaluation settings (packing on and off)."""


def capture_reusing(evaluator: Evaluator, model: torch.nn.Module, requests: Sequence[EditRequest],
                    progress: ProgressFn | None = None, total: int = 0) -> Snapshot:
    """``evaluator.capture(model, requests)``, or the same capture made earlier in this process.

    ``total``: the progress units a fresh capture would report, reported at once when it is reused.
    """
    key = _settings_key(evaluator, model)
    wanted = [repr(r) for r in requests]
    kept: OrderedDict[tuple[Any, ...], tuple[list[str], Snapshot]] = model_state.slot(model, _OWNER, OrderedDict)
    if key in kept:
        have, snapshot = kept[key]
        position = {text: i for i, text in enumerate(have)}
        # a request asked for twice would take one kept slot twice (Snapshot.subset needs distinct indices)
        if len(set(wanted)) == len(wanted) and all(text in position for text in wanted):
            kept.move_to_end(key)
            LOG.info("pre-edit capture of %d requests reused from an earlier run on the same unedited model", len(wanted))
            if progress and total:
                progress(total)
            return snapshot.subset([position[text] for text in wanted])
    snapshot = evaluator.capture(model, requests, progress)
    kept[key] = (wanted, snapshot)
    kept.move_to_end(key)
    while len(kept) > KEPT:
        kept.popitem(last=False)
    return snapshot.subset(range(len(wanted)))  # the caller's own lists: nothing it does reaches the kept one


def _settings_key(evaluator: Evaluator, model: torch.nn.Module) -> tuple[Any, ...]:
    """Everything besides the requests that a capture depends on."""
    modules = tuple(type(m).__qualname__ for m in model.modules())  # an adapter that holds no weights shows here
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    router = router_of(model)
    return (id(evaluator.tok), len(evaluator.tok), repr(evaluator.config), modules, hooks,
            None if router is None else id(router), model_state.weights_digest(model))
