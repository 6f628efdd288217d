"""EMMET (Gupta, Sajnani and Anumanchipalli, 2024): batch editing with equality constraints.

"A Unified Framework for Model Editing" casts ROME and MEMIT as one
preservation-memorisation objective: keep the outputs for the preserved
keys (their second moment C), and make the edited keys produce their
targets. MEMIT memorises in the least-squares sense; ROME and EMMET as
equalities. EMMET solves the equality-constrained problem for a whole batch:

``Δ = R (Kᵀ C'⁻¹ K + ρ I)⁻¹ Kᵀ C'⁻¹``,  ``C' = w C + ν I``

with K the batch's keys, R the residuals to the targets, w =
``mom2_update_weight``, ρ = ``emmet_lambda`` (added only for batches of two or
more, as in the authors' code: one key is ROME's exact update) and ν =
``update_norm_lambda``. Targets z* and the spreading of the residual over
``layers`` are MEMIT's (:func:`lmedit.methods.memit.plan_edit`), so EMMET
on one layer with one request is ROME with MEMIT's target vector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from lmedit.handles import WeightSnapshotHandle
from lmedit.hparams import HyperParamsError
import torch

from lmedit.locate.core import emmet_update, tiny_setup
from lmedit.methods.memit import MEMITHyperParams, plan_edit, spread_plan
from lmedit.registry import register
from lmedit.requests import EditRequest


@dataclass
class EMMETHyperParams(MEMITHyperParams):
    mom2_update_weight: float = 1.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not self.mom2_adjustment:
            raise HyperParamsError("EMMET's constraints are weighted by the key statistics; set mom2_adjustment: true")
        if self.mom2_update_weight <= 0:
            raise HyperParamsError("mom2_update_weight must be positive: it scales C, which EMMET inverts")
        if self.emmet_lambda < 0 or self.update_norm_lambda < 0:
            raise HyperParamsError("emmet_lambda and update_norm_lambda must be non-negative")


@register("EMMET", hparams=EMMETHyperParams, batch=True, needs_subject=True,
          tiny_setup=lambda model, tok, workdir: {**tiny_setup(model, tok, workdir), "update_norm_lambda": 1e-3})
def apply_emmet(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: EMMETHyperParams) -> WeightSnapshotHandle:
    """EMMET: equality-constrained mass editing over MEMIT's layers and targets."""
    started = time.perf_counter()
    plan = plan_edit(model, tok, requests, hparams, covariances=True)
    spec = plan.spec
    handle = WeightSnapshotHandle("EMMET", model, [f"{spec.mlp_out(layer)}.weight" for layer in hparams.layers])
    ridge = hparams.emmet_lambda if len(requests) > 1 else 0.0

    def solve(layer: int, _module: str, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return emmet_update(keys, residual, plan.covariances[layer], hparams.mom2_update_weight, ridge,
                            hparams.update_norm_lambda)

    norms = spread_plan(model, tok, plan, requests, hparams, solve)
    handle.info = {"layers": list(hparams.layers), "update_norms": norms,
                   "target_nll_final_mean": sum(n[-1] for n in plan.target_nll) / len(plan.target_nll),
                   "target_steps_mean": sum(len(n) for n in plan.target_nll) / len(plan.target_nll),
                   "ridge": ridge, "seconds": time.perf_counter() - started}
    return handle
