"""PMET (Li et al., AAAI 2024): precise mass editing with the attention's share taken out.

"PMET: Precise Model Editing in a Transformer" observes that MEMIT's target,
the whole residual stream after the last edited block, also holds what the
attention writes there, yet MEMIT asks the MLPs alone to produce all of it.
PMET optimises two vectors together at the last edited block: a delta added
to the attention output and one added to the MLP output, each with its own
weight decay and norm ball (:func:`~lmedit.locate.core.optimize_joint_targets`).
Only the MLP's target is written into weights; the attention delta is
discarded, having absorbed the part of the change the MLPs need not carry.

Layer by layer, as in MEMIT, the remaining residual between that target and
the current MLP output of the last edited block is spread over the MLPs still
to edit, but divided by the square root of their number (EasyEdit's PMET),
and solved with MEMIT's ``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.handles import WeightSnapshotHandle
from lmedit.locate.core import optimize_joint_targets, spread_over_layers, tiny_setup
from lmedit.methods.memit import MEMITHyperParams, edit_inputs, in_target_batches, memit_solve
from lmedit.registry import register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec


@dataclass
class PMETHyperParams(MEMITHyperParams):
    clamp_norm_factor: float = 1.0
    v_weight_decay: float = 0.5


@dataclass
class _Targets:
    mlp: torch.Tensor  # (d_hidden, n): the MLP output wanted at the last edited block
    attention_delta_norm: list[float]
    nll: list[list[float]]


def _optimise_targets(model: Any, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest],
                      hparams: PMETHyperParams, templates: list[str]) -> _Targets:
    last = hparams.layers[-1]
    attn_site, mlp_site = spec.attn_out(last), spec.mlp_out(last)
    results = in_target_batches(requests, hparams, lambda group: optimize_joint_targets(
        model, tok, group, sites=[attn_site, mlp_site], templates=templates, hparams=hparams))
    return _Targets(mlp=torch.stack([r[mlp_site].target for r in results], dim=1),
                    attention_delta_norm=[r[attn_site].delta_norm for r in results],
                    nll=[r[mlp_site].nll for r in results])


@register("PMET", hparams=PMETHyperParams, batch=True, needs_subject=True,
          tiny_setup=lambda model, tok, workdir: {**tiny_setup(model, tok, workdir), "mom2_update_weight": 1.0})
def apply_pmet(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: PMETHyperParams) -> WeightSnapshotHandle:
    """PMET: MEMIT's closed form, aimed at an MLP target optimised jointly with an attention delta."""
    started = time.perf_counter()
    spec, templates, covariances = edit_inputs(model, tok, hparams, hparams.mom2_adjustment)
    targets = _optimise_targets(model, tok, spec, requests, hparams, templates)
    handle = WeightSnapshotHandle("PMET", model, [f"{spec.mlp_out(layer)}.weight" for layer in hparams.layers])
    norms = spread_over_layers(model, tok, spec, requests, hparams.layers, templates, hparams.fact_token, targets.mlp,
                               spec.mlp_out(hparams.layers[-1]), memit_solve(covariances, hparams.mom2_update_weight),
                               share=math.sqrt)
    n = len(requests)
    handle.info = {"layers": list(hparams.layers), "update_norms": norms,
                   "target_nll_final_mean": sum(h[-1] for h in targets.nll) / n,
                   "target_steps_mean": sum(len(h) for h in targets.nll) / n,
                   "attention_delta_norm_mean": sum(targets.attention_delta_norm) / n,
                   "seconds": time.perf_counter() - started}
    return handle
