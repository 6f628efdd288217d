"""How much of each kind of key lies in AlphaEdit's null space, per edited layer.

AlphaEdit projects its updates onto the span of the eigenvectors of the preserved-knowledge second
moment C = E[k kᵀ] whose eigenvalue is below a threshold. An update then leaves W k unchanged for
every key k orthogonal to that span. This script measures E‖P k‖² / E‖k‖² for:

* the corpus keys C was computed from (from C's own eigenvalues);
* every token of the benchmark's locality prompts (the prompts whose outputs locality scores);
* the edit prompts' tokens.

If the locality prompts put a large share of their energy into the null space, the projection
cannot protect them, whatever the threshold promises for the corpus. Not a test.

    python scripts/nullspace_energy.py --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json --limit 100
"""

from __future__ import annotations

import argparse
import json

import torch

from lmedit.data import load_requests
from lmedit.locate.core import null_space_projector
from lmedit.locate.stats import second_moments
from lmedit.methods.alphaedit import AlphaEditHyperParams
from lmedit.models import load_model
from lmedit.registry import preset_path
from lmedit.spec import ModelSpec


def token_keys(model, tok, spec: ModelSpec, prompts: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """The down-projection inputs at every token of ``prompts`` (one prompt per forward pass), per layer."""
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = []
    for layer in layers:
        module = model.get_submodule(spec.mlp_out(layer))
        hooks.append(module.register_forward_pre_hook(
            lambda _m, args, layer=layer: captured[layer].append(args[0][0].detach().double())))
    try:
        with torch.no_grad():
            for prompt in prompts:
                model(**tok(prompt, return_tensors="pt"))
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: torch.cat(rows) for layer, rows in captured.items()}


def share_in(projector: torch.Tensor, keys: torch.Tensor) -> float:
    """E‖P k‖² / E‖k‖² over the rows of ``keys``."""
    return float((keys @ projector).pow(2).sum() / keys.pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--threshold", type=float, action="append", help="null-space thresholds (repeatable)")
    args = parser.parse_args()

    model, tok = load_model(args.model)
    spec = ModelSpec.from_model(model)
    hparams = AlphaEditHyperParams.from_yaml(preset_path("AlphaEdit", args.model))
    layers = list(hparams.layers)
    thresholds = args.threshold or [hparams.nullspace_threshold]
    covariances = second_moments(model, tok, layers, hparams.stats_config(), progress=False)
    requests = load_requests(args.data, limit=args.limit)
    locality = [p.prompt for r in requests for probes in r.locality.values() for p in probes]
    edits = [r.prompt for r in requests]
    keys = {"locality prompts": token_keys(model, tok, spec, locality, layers),
            "edit prompts": token_keys(model, tok, spec, edits, layers)}
    rows = []
    for threshold in thresholds:
        for layer in layers:
            cov = covariances[layer]
            eigenvalues = torch.linalg.eigvalsh(cov.double())
            projector = null_space_projector(cov, threshold)
            row = {"threshold": threshold, "layer": layer, "null_dims": int((eigenvalues < threshold).sum()),
                   "dims": int(cov.shape[0]),
                   "corpus": float(eigenvalues[eigenvalues < threshold].sum() / eigenvalues.sum())}
            row.update({name: share_in(projector, k[layer]) for name, k in keys.items()})
            rows.append(row)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
