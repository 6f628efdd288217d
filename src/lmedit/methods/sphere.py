"""SPHERE (2025): AlphaEdit with each update kept off the weight's principal hyperspherical directions.

"Energy-Regularized Sequential Model Editing on Hyperspheres" (PlusLabNLP/SPHERE) reads a weight matrix as a set
of neurons, its rows scaled onto the unit sphere, and finds that sequential editing fails once the edits disturb
how uniformly those neurons are spread (their hyperspherical energy). Its remedy is a projection on top of
AlphaEdit: before an update is written, the share ``alpha`` of its component along the principal directions of the
*current* weight's neurons (those holding ``beta_hse`` of their energy) is removed
(:func:`~lmedit.locate.core.principal_direction_suppressor`). Targets, keys, the null space and the keys of earlier
edits are AlphaEdit's, so with ``alpha`` 0 SPHERE is AlphaEdit.

Chosen as issue 19's null-space lifelong variant because its whole algorithm is this one projection, published
with code; the projection is recomputed from the weight as edited so far, which is what protects a long sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.hparams import HyperParamsError
from lmedit.locate.core import principal_direction_suppressor, tiny_setup
from lmedit.methods.alphaedit import AlphaEditHandle, AlphaEditHyperParams, null_space_edit
from lmedit.registry import register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, get_module


@dataclass
class SPHEREHyperParams(AlphaEditHyperParams):
    beta_hse: float = 0.5
    """Share of the neurons' energy whose principal directions are protected (the authors' --beta_hse)."""
    alpha: float = 0.5
    """How much of the update along those directions is removed: 0 is AlphaEdit, 1 removes all of it."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.beta_hse <= 1.0:
            raise HyperParamsError(f"beta_hse {self.beta_hse}: a share of the energy, in (0, 1]")
        if not 0.0 <= self.alpha <= 1.0:
            raise HyperParamsError(f"alpha {self.alpha}: the share of the update removed, in [0, 1]")


def _suppress_principal_directions(hparams: SPHEREHyperParams, conv1d: bool):
    def project(model: Any, module: str, update: torch.Tensor) -> torch.Tensor:
        weight = get_module(model, module).weight.detach()
        if conv1d:
            weight = weight.T  # GPT-2's Conv1D stores (d_in, d_out)
        P = principal_direction_suppressor(weight.to(update.device), hparams.beta_hse, hparams.alpha)
        return update.double() @ P

    return project


@register("SPHERE", hparams=SPHEREHyperParams, batch=True, needs_subject=True,
          tiny_setup=lambda model, tok, workdir: {**tiny_setup(model, tok, workdir), "nullspace_threshold": 1e-2,
                                                  "L2": 1e-3, "alpha": 0.2})
def apply_sphere(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: SPHEREHyperParams) -> AlphaEditHandle:
    """SPHERE: AlphaEdit's update with its principal-direction component damped by ``alpha``."""
    conv1d = ModelSpec.from_model(model).conv1d_weights
    return null_space_edit(model, tok, requests, hparams, "SPHERE", _suppress_principal_directions(hparams, conv1d))
