"""MEMIT (Meng et al., 2023): many edits at once, spread over a range of layers.

For every request a target hidden state z* is optimised at the output of
the last edited block. Then, layer by layer (lowest first), the keys of all
requests are read at that layer, the remaining residual z* − z (read at the
last block on the model as edited so far) is divided by the number of
layers still to edit, and the layer absorbs its share with
``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹``, where C is the key second moment and
λ = ``mom2_update_weight``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch

from lmedit.handles import WeightSnapshotHandle
from lmedit.locate.core import (
    LayerSolve,
    LocateHyperParams,
    context_templates,
    memit_update,
    optimize_targets,
    spread_over_layers,
    tiny_setup,
)
from lmedit.registry import register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec


@dataclass
class MEMITHyperParams(LocateHyperParams):
    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    clamp_norm_factor: float = 0.75
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    mom2_update_weight: float = 15000.0
    target_batch_size: int = 8
    """Requests whose target values are optimised together (speed only: each keeps its own delta)."""


@dataclass
class PlannedEdit:
    """What the closed-form step of MEMIT-like methods needs, computed before any weight changes."""

    spec: ModelSpec
    templates: list[str]
    targets: torch.Tensor  # (d_hidden, n): z* at the last edited block
    covariances: dict[int, torch.Tensor]
    target_nll: list[list[float]]


def plan_edit(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: LocateHyperParams,
              covariances: bool) -> PlannedEdit:
    """Statistics (of the unedited model) and the target hidden state of every request."""
    spec, templates, stats = edit_inputs(model, tok, hparams, covariances)
    site = spec.block(hparams.layers[-1])
    values = in_target_batches(requests, hparams, lambda group: optimize_targets(
        model, tok, group, site=site, templates=templates, hparams=hparams))
    return PlannedEdit(spec, templates, torch.stack([v.target for v in values], dim=1), stats, [v.nll for v in values])


def edit_inputs(model: Any, tok: Any, hparams: LocateHyperParams,
                covariances: bool) -> tuple[ModelSpec, list[str], dict[int, torch.Tensor]]:
    """What every MEMIT-like edit reads before changing a weight: the layout, the context prefixes, the statistics."""
    spec = ModelSpec.from_model(model)
    stats: dict[int, torch.Tensor] = {}
    if covariances:
        from lmedit.locate.stats import second_moments

        stats = second_moments(model, tok, hparams.layers, hparams.stats_config(), progress=False)
    templates = context_templates(model, tok, hparams.context_template_length_params, hparams.context_template_seed)
    return spec, templates, stats


T = TypeVar("T")


def in_target_batches(requests: Sequence[EditRequest], hparams: MEMITHyperParams,
                      optimise: Callable[[Sequence[EditRequest]], list[T]]) -> list[T]:
    """``optimise`` over groups of ``target_batch_size`` requests, results in request order."""
    group = max(hparams.target_batch_size, 1)
    return [result for start in range(0, len(requests), group) for result in optimise(requests[start : start + group])]


def memit_solve(covariances: dict[int, torch.Tensor], cov_weight: float) -> LayerSolve:
    """MEMIT's closed form per layer, with the identity for C where no statistics were taken."""
    def solve(layer: int, _module: str, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        cov = covariances.get(layer)
        if cov is None:
            cov = torch.eye(keys.shape[0], dtype=torch.float64)
        return memit_update(keys, residual, cov, cov_weight)

    return solve


def spread_plan(model: Any, tok: Any, plan: PlannedEdit, requests: Sequence[EditRequest], hparams: LocateHyperParams,
                solve: LayerSolve) -> dict[int, float]:
    """MEMIT's layer loop towards the plan's targets at the last edited block (shared by EMMET and AlphaEdit)."""
    return spread_over_layers(model, tok, plan.spec, requests, hparams.layers, plan.templates, hparams.fact_token,
                              plan.targets, plan.spec.block(hparams.layers[-1]), solve)


@register("MEMIT", hparams=MEMITHyperParams, batch=True, needs_subject=True,
          tiny_setup=lambda model, tok, workdir: {**tiny_setup(model, tok, workdir), "mom2_update_weight": 1.0})
def apply_memit(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: MEMITHyperParams) -> WeightSnapshotHandle:
    """Mass-editing memory in a transformer (MEMIT): batch edits over a range of MLP layers."""
    started = time.perf_counter()
    plan = plan_edit(model, tok, requests, hparams, covariances=hparams.mom2_adjustment)
    spec = plan.spec
    handle = WeightSnapshotHandle("MEMIT", model, [f"{spec.mlp_out(layer)}.weight" for layer in hparams.layers])
    norms = spread_plan(model, tok, plan, requests, hparams, memit_solve(plan.covariances, hparams.mom2_update_weight))
    handle.info = {"layers": list(hparams.layers), "update_norms": norms, "target_nll_final_mean": sum(n[-1] for n in plan.target_nll) / len(plan.target_nll),
                   "target_steps_mean": sum(len(n) for n in plan.target_nll) / len(plan.target_nll),
                   "seconds": time.perf_counter() - started}
    return handle
