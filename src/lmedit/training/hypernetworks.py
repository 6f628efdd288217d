"""What the gradient-editing hypernetworks (MEND, MALMEN) share: edited weights, gradient factors, moments, loading.

For a linear layer ``y = W u`` the gradient of a loss over a sequence is a
sum of rank-1 terms ``Σ_t δ_t u_tᵀ``: ``u_t`` the layer's input and ``δ_t``
the loss gradient at its output, per token. Both hypernetworks read those
per-token factors (never the full gradient matrix), standardised by running
per-coordinate moments gathered while training. Their checkpoints are loaded
and checked against the model the same way, and their training tasks share
the trainer plumbing (:class:`HypernetworkTask`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from lmedit.adapters import SequenceLogits, frozen_model
from lmedit.forward import pad_id_of
from lmedit.hparams import HyperParamsError
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, get_module
from lmedit.training.checkpoint import CheckpointError
from lmedit.training.paths import resolve_archive
from lmedit.training.shared import (
    CheckpointCache,
    ScoredSequence,
    check_signature,
    model_signature,
    scored_sequence,
    split_rows,
    target_tensor,
)

NORM_EPS = 1e-7

#: which token positions give factors: every position the loss reaches (MEND; EasyEdit's ``token: mask``),
#: or only the positions whose predictions are scored, the answer's (MALMEN's ``token: ans``)
Positions = Literal["reached", "answer"]


@dataclass(frozen=True)
class EditedWeight:
    """One weight matrix a hypernetwork edits: its parameter name, module path and (in, out) sizes."""

    name: str
    module: str
    in_dim: int
    out_dim: int
    conv1d: bool

    @property
    def shape_key(self) -> str:
        return f"{self.in_dim}x{self.out_dim}"


def edited_weights(model: nn.Module, layers: Sequence[int], modules: Sequence[str]) -> list[EditedWeight]:
    """The weights of ``modules`` (``mlp_out``/``mlp_in`` roles) in ``layers``, lowest layer first."""
    spec = ModelSpec.from_model(model)
    found = []
    for layer in layers:
        if not -spec.num_layers <= layer < spec.num_layers:
            raise HyperParamsError(f"layer {layer} does not exist; the model has layers 0..{spec.num_layers - 1}")
        for role in modules:
            paths = (spec.mlp_out(layer),) if role == "mlp_out" else spec.mlp_in(layer)
            for path in paths:
                module = get_module(model, path)
                weight = module.weight
                conv1d = not isinstance(module, nn.Linear)
                in_dim, out_dim = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])
                found.append(EditedWeight(f"{path}.weight", path, int(in_dim), int(out_dim), conv1d))
    names = [w.name for w in found]
    if len(set(names)) != len(names):
        raise HyperParamsError(f"layers {list(layers)} name the same layer twice")
    return sorted(found, key=lambda w: _layer_order(spec, w.module))


def _layer_order(spec: ModelSpec, path: str) -> int:
    return next((i for i in range(spec.num_layers) if path.startswith(spec.block(i) + ".")), spec.num_layers)


# --------------------------------------------------------------------------- running moments


def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                  rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s update: (count, mean, sum of squared deviations) after adding ``rows``, in float64."""
    rows = rows.double()
    n_b = rows.shape[0]
    if n_b == 0:
        return count, mean, m2
    mean_b = rows.mean(0)
    m2_b = ((rows - mean_b) ** 2).sum(0)
    total = count + n_b
    delta = mean_b - mean
    return total, mean + delta * (n_b / total), m2 + m2_b + delta**2 * (count * n_b / total)


def standardise(rows: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                owner: str) -> torch.Tensor:
    """``(rows − mean) / (std + ε)`` with the unbiased std of the moments, returned in float32."""
    if float(count) < 2:
        raise CheckpointError(f"the {owner} network has no gradient statistics yet; train it first")
    std = (m2 / (count - 1)).sqrt()
    return ((rows.double() - mean) / (std + NORM_EPS)).float()


# --------------------------------------------------------------------------- capturing factors


@dataclass
class Factors:
    """Per edited weight: the rows (token positions) of ``u`` and ``δ`` of each edit group."""

    u: list[list[torch.Tensor]]  # [weight][group] -> (tokens, in_dim)
    delta: list[list[torch.Tensor]]  # [weight][group] -> (tokens, out_dim)


@contextmanager
def capture_io(model: nn.Module, weights: Sequence[EditedWeight]) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Record each edited module's input and (grad-tracking) output on the next forward pass."""
    records: list[dict[str, torch.Tensor]] = [{} for _ in weights]
    hooks = []
    for record, weight in zip(records, weights):
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, record=record) -> torch.Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            record["u"] = args[0].detach()
            record["out"] = output
            return output

        hooks.append(get_module(model, weight.module).register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in hooks:
            handle.remove()


def gradient_factors(
    model: nn.Module, weights: Sequence[EditedWeight], logits_fn: SequenceLogits, sequences: Sequence[ScoredSequence],
    edit_rows: Sequence[int], groups: Sequence[Sequence[int]], positions: Positions = "reached",
) -> Factors:
    """``u`` and ``δ`` of the edit loss (each edit row's mean target NLL, summed) at every edited weight.

    ``groups`` lists, per independent edit, the rows whose tokens form its
    gradient; rows of different groups never interact (one sequence per row).
    ``positions="reached"`` keeps every real token the loss reaches (non-zero
    ``δ`` and ``u``); ``"answer"`` keeps the positions whose predictions are
    scored, in order.
    """
    with torch.enable_grad(), capture_io(model, weights) as records:
        logits = logits_fn()
        blocks = split_rows(logits, sequences)
        loss = sum(
            nn.functional.cross_entropy(blocks[row], target_tensor(sequences[row], logits.device)) for row in edit_rows
        )
        outputs = [r["out"] for r in records]
        grads = torch.autograd.grad(loss, outputs)
    selectors = [_group_selector(logits_fn, group, positions) for group in groups]
    factors = Factors([], [])
    for record, grad in zip(records, grads):
        u_all = record["u"].reshape(-1, record["u"].shape[-1])
        d_all = grad.reshape(-1, grad.shape[-1])
        u_groups, d_groups = [], []
        for flat in selectors:
            u, d = u_all.index_select(0, flat), d_all.index_select(0, flat)
            if positions == "reached":  # tokens the loss does not reach carry no gradient
                keep = (d != 0).any(-1) & (u != 0).any(-1)
                u, d = u[keep], d[keep]
            u_groups.append(u.float())
            d_groups.append(d.float())
        factors.u.append(u_groups)
        factors.delta.append(d_groups)
    return factors


def _group_selector(logits_fn: SequenceLogits, group: Sequence[int], positions: Positions) -> torch.Tensor:
    """Flat (row · width + column) indices of a group's positions in the padded batch."""
    valid = logits_fn.valid
    width = valid.shape[1]
    rows = torch.tensor(list(group), dtype=torch.long, device=valid.device)
    if positions == "answer":
        read = logits_fn.flat
        return read[torch.isin(torch.div(read, width, rounding_mode="floor"), rows)]
    grid = torch.arange(valid.numel(), device=valid.device).reshape(valid.shape)
    return grid[rows][valid[rows]]


def request_factors(model: nn.Module, tok: Any, requests: Sequence[EditRequest], weights: Sequence[EditedWeight],
                    positions: Positions = "reached") -> Factors:
    """The factors of all ``requests`` as one edit group (the model frozen; only the upper blocks rerun)."""
    sequences = [scored_sequence(tok, r.prompt, r.target_new) for r in requests]
    rows = list(range(len(sequences)))
    with frozen_model(model):
        logits_fn = SequenceLogits(model, weights[0].module, [s.ids for s in sequences], [s.columns for s in sequences],
                                   pad_id_of(tok))
        return gradient_factors(model, weights, logits_fn, sequences, rows, [rows], positions)


# --------------------------------------------------------------------------- checkpoints and training


NetworkFactory = Callable[..., nn.Module]  # (weights, **network settings) -> a network with a ``weights`` list


def load_hypernetwork(model: nn.Module, archive: str, cache: CheckpointCache, method: str, train_command: str,
                      make: NetworkFactory) -> Any:
    """The trained network in ``archive``, checked against ``model`` (signature, and every edited weight's shape)."""
    folder = resolve_archive(str(archive))

    def build(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        network = make([EditedWeight(**w) for w in config["weights"]], **config["network"])
        try:
            network.load_state_dict(tensors)
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: the weights do not fit the network its config describes ({exc})") from None
        return network.eval().requires_grad_(False), config

    network, config = cache.get(folder, method, train_command, build)
    check_signature(model, config.get("model", {}), folder, train_command)
    params = dict(model.named_parameters())
    for weight in network.weights:
        shape = (weight.in_dim, weight.out_dim) if weight.conv1d else (weight.out_dim, weight.in_dim)
        if weight.name not in params or tuple(params[weight.name].shape) != shape:
            raise CheckpointError(
                f"the {method} checkpoint at {folder} edits {weight.name} of shape {shape}, which this model does not "
                f"have; train one for this model with `{train_command}`"
            )
    return network


class HypernetworkTask:
    """A :class:`lmedit.training.TrainingTask` for a network over the edited weights ``params.layers × params.modules``.

    Subclasses set ``method`` and implement ``param_groups`` and
    ``_edit_batch(batch, training=...) -> (loss, metrics)``; validation runs
    ``_edit_batch`` on chunks of ``batch_size`` and scores the mean of rewrite,
    rephrase and locality.
    """

    method = ""

    def __init__(self, model: nn.Module, tok: Any, params: Any, make: NetworkFactory) -> None:
        self.model, self.tok, self.params = model, tok, params
        self.weights = edited_weights(model, params.layers, params.modules)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            self.network = make(self.weights, **params.network_settings())
        self.pad_id = pad_id_of(tok)

    def module(self) -> nn.Module:
        return self.network

    def checkpoint_config(self) -> dict[str, Any]:
        return {"weights": [w.__dict__ for w in self.weights], "network": self.params.network_settings(),
                "model": model_signature(self.model)}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.network.state_dict())

    def train_step(self, batch: Sequence[Any], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self._edit_batch(batch, training=True)

    def validate(self, examples: Sequence[Any]) -> dict[str, float]:
        totals: dict[str, float] = {}
        size = self.params.batch_size
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            with torch.no_grad():
                _, metrics = self._edit_batch(chunk, training=False)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk)
        means = {key: value / len(examples) for key, value in totals.items()}
        means["score"] = (means["rewrite_acc"] + means["rephrase_acc"] + means["locality"]) / 3
        return means

    def _edit_batch(self, batch: Sequence[Any], *, training: bool) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
