"""ROME (Meng et al., 2022): a rank-one update of one MLP down-projection.

The left vector is the subject key k* (averaged over context prefixes),
multiplied by the inverse key covariance C⁻¹ when ``mom2_adjustment`` is on
(the published algorithm; EasyEdit's shipped configs turn it off, which is
available here as an explicit option). The right vector makes the edited
layer map the key to the optimised value v*.

``key_mode`` chooses which key the rank-one solve uses:

* ``original``: as the ROME code does, u from the prefix-averaged key but the
  solve (and the current output) from the bare prompt's key;
* ``prefix``: R-ROME's correction (Gupta et al., 2024), the prefix-averaged
  key and output in both places, which avoids the collapse seen in long
  sequential runs;
* ``prompt``: R-ROME's other variant, the bare prompt's key everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from lmedit.handles import WeightSnapshotHandle
from lmedit.hparams import HyperParamsError
from lmedit.locate.core import (
    tiny_setup,
    LocateHyperParams,
    add_to_weight,
    average_keys,
    context_templates,
    lookup,
    optimize_target,
    rank_one_update,
    read_at,
)
from lmedit.registry import register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec

KeyMode = Literal["original", "prefix", "prompt"]


@dataclass
class ROMEHyperParams(LocateHyperParams):
    key_mode: KeyMode = "original"

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            raise HyperParamsError(f"ROME edits exactly one layer; got layers {self.layers}")
        if self.key_mode not in ("original", "prefix", "prompt"):
            raise HyperParamsError(f"key_mode must be original, prefix or prompt; got {self.key_mode!r}")


@register("ROME", hparams=ROMEHyperParams, needs_subject=True, tiny_setup=tiny_setup)
def apply_rome(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: ROMEHyperParams) -> WeightSnapshotHandle:
    """Rank-one model editing of one MLP down-projection (ROME)."""
    started = time.perf_counter()
    request = requests[0]
    spec = ModelSpec.from_model(model)
    layer = hparams.layers[0]
    module = spec.mlp_out(layer)
    templates = context_templates(model, tok, hparams.context_template_length_params, hparams.context_template_seed)
    cov = None
    if hparams.mom2_adjustment:  # before any change: the statistics belong to the unedited model
        from lmedit.locate.stats import second_moments

        cov = second_moments(model, tok, [layer], hparams.stats_config(), progress=False)[layer]
    handle = WeightSnapshotHandle("ROME", model, [f"{module}.weight"])

    key_templates = ["{}"] if hparams.key_mode == "prompt" else templates
    k_star = average_keys(model, tok, spec, [request], [layer], key_templates, hparams.fact_token)[layer][:, 0]
    left = torch.linalg.solve(cov.to(k_star.device).double(), k_star.double()) if cov is not None else k_star.double()
    left = left / left.norm()

    value = optimize_target(model, tok, request, site=module, templates=templates, hparams=hparams)
    solve_templates = templates if hparams.key_mode == "prefix" else ["{}"]
    lookups = [lookup(tok, t, request.prompt, request.subject or "", hparams.fact_token) for t in solve_templates]
    key = read_at(model, tok, lookups, [module], inputs=True)[module].mean(0)
    current = read_at(model, tok, lookups, [module], inputs=False)[module].mean(0)
    update = rank_one_update(left, key, value.target, current)
    add_to_weight(model, module, update, spec.conv1d_weights)
    handle.info = {
        "layer": layer, "key_mode": hparams.key_mode, "mom2_adjustment": hparams.mom2_adjustment,
        "target_nll_final": value.nll[-1], "target_steps": len(value.nll), "delta_norm": value.delta_norm, "update_norm": float(update.norm()),
        "seconds": time.perf_counter() - started,
    }
    return handle
