"""AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of preserved knowledge.

The projector P spans the eigenvectors of the key second moment C whose
eigenvalue is below ``nullspace_threshold``: an update ΔP leaves the
outputs for (most of) the preserved keys unchanged. The update is
``Δ = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + α I)⁻¹``, where K_p are the keys of the
edits made earlier in the same session (so sequential edits do not undo
each other) and α = ``L2``.

State: P is cached per (model, layer, statistics, threshold) and the
earlier keys are accumulated in the session state of the model object
(:func:`lmedit.locate.core.session_state`), never in a file and never shared
between models. Restoring an edit removes its keys again;
:func:`reset_alphaedit` clears everything.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lmedit.checkpoint import register_session_codec
from lmedit.handles import WeightSnapshotHandle
from lmedit.hparams import HyperParamsError
from lmedit.locate.core import alphaedit_update, average_keys, null_space_projector, session_state, tiny_setup
from lmedit.methods.memit import MEMITHyperParams, plan_edit, spread_plan
from lmedit.registry import register
from lmedit.requests import EditRequest

_STATE_KEY = "alphaedit"
_edit_ids = itertools.count()


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    def validate(self) -> None:
        super().validate()
        if not self.mom2_adjustment:
            raise HyperParamsError("AlphaEdit needs the key statistics for its null space; set mom2_adjustment: true")
        if self.nullspace_threshold <= 0 or self.L2 < 0:
            raise HyperParamsError("nullspace_threshold must be positive and L2 non-negative")


@dataclass
class AlphaEditState:
    """Per model object: projectors by (layer, statistics, threshold) and the keys of earlier edits."""

    projectors: dict[tuple[Any, ...], torch.Tensor]
    keys: dict[int, dict[int, torch.Tensor]]  # edit id -> layer -> keys (d_in, n)

    def previous(self, layer: int) -> torch.Tensor | None:
        blocks = [by_layer[layer] for by_layer in self.keys.values() if layer in by_layer]
        if not blocks:
            return None
        K = torch.cat(blocks, dim=1).double()
        return K @ K.T


def alphaedit_state(model: Any) -> AlphaEditState:
    return session_state(model).setdefault(_STATE_KEY, AlphaEditState({}, {}))


def reset_alphaedit(model: Any) -> None:
    """Forget cached projectors and accumulated keys for this model (e.g. after loading other weights)."""
    session_state(model).pop(_STATE_KEY, None)


def _dump_state(state: AlphaEditState) -> tuple[dict[str, torch.Tensor], list[list[Any]]]:
    """The keys of earlier edits, in the order they were made (their sum is taken in that order);
    the projectors are recomputed from the statistics."""
    tensors = {f"{n}/{layer}": k for n, by_layer in enumerate(state.keys.values()) for layer, k in by_layer.items()}
    return tensors, [list(by_layer) for by_layer in state.keys.values()]


def _load_state(tensors: dict[str, torch.Tensor], layers: list[list[int]]) -> AlphaEditState:
    # fresh edit ids: this process may already have handed out the ones the checkpoint was written with
    return AlphaEditState({}, {next(_edit_ids): {layer: tensors[f"{n}/{layer}"] for layer in by_layer}
                               for n, by_layer in enumerate(layers)})


register_session_codec(_STATE_KEY, _dump_state, _load_state)


class AlphaEditHandle(WeightSnapshotHandle):
    """Restores the weights and takes this edit's keys out of the session's accumulated keys."""

    def __init__(self, model: Any, param_names: Sequence[str], edit_id: int, method: str = "AlphaEdit") -> None:
        super().__init__(method, model, param_names)
        self.edit_id = edit_id

    def _restore(self) -> None:
        super()._restore()
        alphaedit_state(self.model).keys.pop(self.edit_id, None)


UpdateFilter = Callable[[Any, str, torch.Tensor], torch.Tensor]
"""(model, down-projection name, update as (d_out, d_in)) -> the update to write; SPHERE's projection is one."""


@register("AlphaEdit", hparams=AlphaEditHyperParams, batch=True, needs_subject=True,
          tiny_setup=lambda model, tok, workdir: {**tiny_setup(model, tok, workdir), "nullspace_threshold": 1e-2, "L2": 1e-3})
def apply_alphaedit(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: AlphaEditHyperParams) -> AlphaEditHandle:
    """AlphaEdit: null-space constrained MEMIT for sequential editing."""
    return null_space_edit(model, tok, requests, hparams, "AlphaEdit")


def null_space_edit(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: AlphaEditHyperParams,
                    method: str, update_filter: UpdateFilter | None = None) -> AlphaEditHandle:
    """AlphaEdit's edit; ``update_filter`` may reshape each layer's update before it is written."""
    started = time.perf_counter()
    plan = plan_edit(model, tok, requests, hparams, covariances=True)
    spec, state = plan.spec, alphaedit_state(model)
    stats_key = (hparams.stats_config(), hparams.nullspace_threshold)
    projectors = {}
    for layer in hparams.layers:
        key = (layer, *stats_key)
        if key not in state.projectors:
            state.projectors[key] = null_space_projector(plan.covariances[layer], hparams.nullspace_threshold)
        projectors[layer] = state.projectors[key]
    edit_id = next(_edit_ids)
    handle = AlphaEditHandle(model, [f"{spec.mlp_out(layer)}.weight" for layer in hparams.layers], edit_id, method)

    def solve(layer: int, module: str, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        update = alphaedit_update(keys, residual, projectors[layer], state.previous(layer), hparams.L2)
        return update if update_filter is None else update_filter(model, module, update)

    norms = spread_plan(model, tok, plan, requests, hparams, solve)
    # the keys of this edit, read on the edited model, protect it from later edits
    edited_keys = average_keys(model, tok, spec, requests, hparams.layers, plan.templates, hparams.fact_token)
    state.keys[edit_id] = {layer: k.double() for layer, k in edited_keys.items()}
    handle.info = {"layers": list(hparams.layers), "update_norms": norms, "target_nll_final_mean": sum(n[-1] for n in plan.target_nll) / len(plan.target_nll),
                   "target_steps_mean": sum(len(n) for n in plan.target_nll) / len(plan.target_nll),
                   "null_space_dims": {layer: int(round(float(p.trace()))) for layer, p in projectors.items()},
                   "seconds": time.perf_counter() - started}
    return handle
