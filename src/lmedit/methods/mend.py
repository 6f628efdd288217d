"""MEND (Mitchell et al., ICLR 2022): a hypernetwork that turns one fine-tuning gradient into an edit.

For a linear layer ``y = W u`` the gradient of a loss over a sequence is a
sum of rank-1 terms ``Σ_t δ_t u_tᵀ``: ``u_t`` the layer's input and ``δ_t``
the loss gradient at its output, per token. MEND edits those factors, not
the full gradient matrix:

1. each ``(u_t, δ_t)`` is normalised with running per-coordinate statistics
   collected during training (here one set per edited layer);
2. the concatenation ``[u_t; δ_t]`` goes through a small editor network,
   shared by every edited layer of the same shape: ``n_hidden + 1`` layers
   ``z + relu(s_l ⊙ (U V z + b) + o_l)`` with a low-rank ``U V`` started at
   ``U = 0`` (so the network starts as the identity) and a per-layer scale
   ``s_l`` and shift ``o_l``;
3. the outputs ``ũ_t, δ̃_t`` give the pseudo-gradient ``∇̃W = Σ_t δ̃_t ũ_tᵀ``,
   applied with a learned per-layer step: ``W ← W − α_l ∇̃W``.

Training (``lmedit train mend``) edits the model functionally with that
update and minimises ``cedit · NLL(edit and rephrase targets | edited model)
+ cloc · KL(base ‖ edited)`` on a locality input, through the editor network
and the steps ``α``. Only the blocks from the lowest edited layer upward are
rerun, because the blocks below do not depend on the edit.

Editing with a trained network is an ordinary in-place weight edit
(:class:`~lmedit.handles.WeightSnapshotHandle`, bit-exact restore); a batch
of requests makes one pseudo-gradient from all their tokens.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

from lmedit.adapters import SequenceLogits, frozen_model
from lmedit.handles import WeightSnapshotHandle
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.registry import Contract, TrainingEntry, register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, get_module
from lmedit.training import EditExample, EditorTrainingParams
from lmedit.training.hypernetworks import (
    EditedWeight,
    Factors,
    HypernetworkTask,
    gradient_factors,
    load_hypernetwork,
    merge_moments,
    request_factors,
    standardise,
)
from lmedit.training.shared import CheckpointCache, scored_sequence, split_rows, target_tensor

LOG = logging.getLogger(__name__)

METHOD = "MEND"
TRAIN_COMMAND = "lmedit train mend"


# --------------------------------------------------------------------------- hyperparameters


@dataclass
class MENDHyperParams(HyperParams):
    """Editing with a trained MEND network; the network's own settings come from its checkpoint."""

    archive: str = "{lmedit_home}/checkpoints/MEND/smollm2-135m"
    lr_scale: float = 1.0

    def validate(self) -> None:
        if self.lr_scale <= 0:
            raise HyperParamsError("lr_scale must be positive")


@dataclass
class MENDTrainingParams(EditorTrainingParams):
    """What ``lmedit train mend`` trains: which weights, the editor network, the losses, and the loop."""

    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])
    modules: list[Literal["mlp_out", "mlp_in"]] = field(default_factory=lambda: ["mlp_out"])
    rank: int = 512
    n_hidden: int = 1
    edit_lr: float = 1e-4
    lr: float = 3e-4
    lr_lr: float = 1e-4
    cedit: float = 1.0
    cloc: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.layers:
            raise HyperParamsError("layers must name at least one layer")
        if self.rank < 1 or self.n_hidden < 0:
            raise HyperParamsError("rank must be at least 1 and n_hidden at least 0")
        for name in ("lr", "lr_lr", "edit_lr", "cedit"):
            if getattr(self, name) <= 0:
                raise HyperParamsError(f"{name} must be positive")
        if self.cloc < 0:
            raise HyperParamsError("cloc must be zero or positive")

    def network_settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "n_hidden": self.n_hidden, "edit_lr": self.edit_lr}


# --------------------------------------------------------------------------- the editor network


class EditorLayer(nn.Module):
    """``z + relu(s_mode ⊙ (U V z + b) + o_mode)``; ``U = 0`` at the start, so the layer is the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.randn(rank, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.V.T) @ self.U.T + self.bias
        # clamp, not relu: at the identity start every pre-activation is exactly 0, where relu's gradient is 0 and
        # clamp's is 1. With relu, U, V, the bias, scale and shift never leave their initial values.
        return z + (pre * self.scale[mode] + self.shift[mode]).clamp(min=0)


class GradientEditor(nn.Module):
    """Normalises ``[u; δ]`` per edited layer (``mode``) and maps it through the shared editor layers."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, n_hidden: int, n_modes: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        dim = in_dim + out_dim
        self.layers = nn.ModuleList(EditorLayer(dim, rank, n_modes) for _ in range(n_hidden + 1))
        self.register_buffer("count", torch.zeros(n_modes, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_modes, dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_modes, dim, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, mode: int, rows: torch.Tensor) -> None:
        """Merge a batch of ``[u; δ]`` rows into the running mean and variance of layer ``mode``."""
        count, mean, m2 = merge_moments(self.count[mode], self.mean[mode], self.m2[mode], rows)
        self.count[mode], self.mean[mode], self.m2[mode] = count, mean, m2

    def normalise(self, mode: int, rows: torch.Tensor) -> torch.Tensor:
        return standardise(rows, self.count[mode], self.mean[mode], self.m2[mode], METHOD)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.normalise(mode, torch.cat([u, delta], dim=-1))
        for layer in self.layers:
            z = layer(z, mode)
        return z[:, : self.in_dim], z[:, self.in_dim :]


class MENDNetwork(nn.Module):
    """Editor networks (one per weight shape) plus one learned step size per edited weight."""

    def __init__(self, weights: Sequence[EditedWeight], rank: int, n_hidden: int, edit_lr: float) -> None:
        super().__init__()
        self.weights = list(weights)
        shapes: dict[str, list[int]] = {}
        for index, weight in enumerate(self.weights):
            shapes.setdefault(weight.shape_key, []).append(index)
        self.modes = {index: (key, members.index(index)) for key, members in shapes.items() for index in members}
        self.editors = nn.ModuleDict({
            key: GradientEditor(self.weights[members[0]].in_dim, self.weights[members[0]].out_dim, rank, n_hidden, len(members))
            for key, members in shapes.items()
        })
        self.edit_lrs = nn.Parameter(torch.full((len(self.weights),), float(edit_lr)))

    def transform(self, index: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key, mode = self.modes[index]
        return self.editors[key](u, delta, mode)

    def observe(self, index: int, u: torch.Tensor, delta: torch.Tensor) -> None:
        key, mode = self.modes[index]
        self.editors[key].observe(mode, torch.cat([u, delta], dim=-1))

    def editor_parameters(self) -> list[nn.Parameter]:
        return list(self.editors.parameters())


def pseudo_factors(network: MENDNetwork, factors: Factors) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(ũ, δ̃)`` per edited weight and edit group; in training mode the batch first joins the statistics."""
    if network.training:
        for index in range(len(network.weights)):
            network.observe(index, torch.cat(factors.u[index]), torch.cat(factors.delta[index]))
    out = []
    for index in range(len(network.weights)):
        per_group = []
        for u, d in zip(factors.u[index], factors.delta[index]):
            per_group.append(network.transform(index, u, d))
        out.append(per_group)
    return out


@contextmanager
def functional_edit(
    model: nn.Module, network: MENDNetwork, transformed: list[list[tuple[torch.Tensor, torch.Tensor]]],
    rows_of_group: Sequence[Sequence[int]], n_rows: int,
) -> Iterator[None]:
    """Make the edited modules compute ``(W − α ∇̃W) x`` for the rows of each group, keeping the graph.

    ``∇̃W x = Σ_t δ̃_t (ũ_t · x)`` is applied in factored form, so no
    ``out × in`` matrix is built while training.
    """
    group_of_row = [None] * n_rows
    for group, rows in enumerate(rows_of_group):
        for row in rows:
            group_of_row[row] = group
    hooks = []
    for index, weight in enumerate(network.weights):
        lr = network.edit_lrs[index]

        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, index=index, lr=lr) -> torch.Tensor:
            x = args[0]
            parts = []
            for row in range(x.shape[0]):
                group = group_of_row[row]
                if group is None:
                    parts.append(torch.zeros_like(output[row]))
                    continue
                u_t, d_t = transformed[index][group]
                parts.append((x[row].float() @ u_t.T) @ d_t)  # the network's factors are float32
            return output - (lr * torch.stack(parts)).to(output.dtype)

        hooks.append(get_module(model, weight.module).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in hooks:
            handle.remove()


# --------------------------------------------------------------------------- editing


_NETWORKS = CheckpointCache()


def load_network(model: nn.Module, archive: str | Path) -> MENDNetwork:
    """The trained network in ``archive``, checked against ``model`` (architecture and weight shapes)."""
    return load_hypernetwork(model, str(archive), _NETWORKS, METHOD, TRAIN_COMMAND, MENDNetwork)


def apply_mend(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: MENDHyperParams) -> WeightSnapshotHandle:
    """Edit with a trained MEND hypernetwork: one gradient, transformed, applied in place (needs `lmedit train mend`)."""
    network = load_network(model, hparams.archive)
    started = time.perf_counter()
    handle = WeightSnapshotHandle(METHOD, model, [w.name for w in network.weights])
    factors = request_factors(model, tok, requests, network.weights)
    params = dict(model.named_parameters())
    with torch.no_grad():
        transformed = pseudo_factors(network, factors)
        for index, weight in enumerate(network.weights):
            u_t, d_t = transformed[index][0]
            grad = d_t.T @ u_t  # (out, in)
            if weight.conv1d:
                grad = grad.T
            step = network.edit_lrs[index] * hparams.lr_scale
            param = params[weight.name]
            param.sub_((step * grad).to(param.device, param.dtype))
    handle.info = {"seconds": time.perf_counter() - started, "tokens": int(factors.u[0][0].shape[0]),
                   "edit_lrs": [float(x) for x in network.edit_lrs]}
    return handle


# --------------------------------------------------------------------------- training


class MENDTask(HypernetworkTask):
    """The training task for :class:`lmedit.training.Trainer`: independent single edits, batched."""

    method = METHOD

    def __init__(self, model: nn.Module, tok: Any, params: MENDTrainingParams) -> None:
        super().__init__(model, tok, params, MENDNetwork)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.network.editor_parameters(), "lr": self.params.lr},
                {"params": [self.network.edit_lrs], "lr": self.params.lr_lr}]

    def _edit_batch(self, batch: Sequence[EditExample], *, training: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """Edit each example independently (one row group each), then score edit, rephrase and locality rows."""
        b = len(batch)
        sequences = ([scored_sequence(self.tok, e.prompt, e.target) for e in batch]
                     + [scored_sequence(self.tok, e.rephrase, e.target) for e in batch]
                     + [scored_sequence(self.tok, e.loc_prompt, e.loc_answer) for e in batch])
        groups = [[i, b + i, 2 * b + i] for i in range(b)]
        with frozen_model(self.model):
            logits_fn = SequenceLogits(self.model, self.weights[0].module, [s.ids for s in sequences],
                                       [s.columns for s in sequences], self.pad_id)
            with torch.no_grad():
                base = split_rows(logits_fn(), sequences)
            factors = gradient_factors(self.model, self.weights, logits_fn, sequences, list(range(b)), [[i] for i in range(b)])
            transformed = pseudo_factors(self.network, factors)
            with functional_edit(self.model, self.network, transformed, groups, len(sequences)):
                post = split_rows(logits_fn(), sequences)
        device = post[0].device
        edit_nll = torch.stack([nn.functional.cross_entropy(post[r], target_tensor(sequences[r], device)) for r in range(2 * b)])
        kl = torch.stack([
            nn.functional.kl_div(post[r].log_softmax(-1), base[r].log_softmax(-1), log_target=True, reduction="batchmean")
            for r in range(2 * b, 3 * b)
        ])
        loss = self.params.cedit * edit_nll.mean() + self.params.cloc * kl.mean()
        accuracy = [float((post[r].argmax(-1) == target_tensor(sequences[r], device)).float().mean()) for r in range(2 * b)]
        agreement = [float((post[r].argmax(-1) == base[r].argmax(-1)).float().mean()) for r in range(2 * b, 3 * b)]
        pre_accuracy = [float((base[r].argmax(-1) == target_tensor(sequences[r], device)).float().mean()) for r in range(b)]
        metrics = {
            "loss_edit": float(edit_nll[:b].mean().detach()), "loss_rephrase": float(edit_nll[b:].mean().detach()),
            "loss_loc": float(kl.mean().detach()), "rewrite_acc": sum(accuracy[:b]) / b,
            "rephrase_acc": sum(accuracy[b:]) / b, "locality": sum(agreement) / b, "pre_rewrite_acc": sum(pre_accuracy) / b,
        }
        return loss, metrics


def train_mend(
    model: nn.Module, tok: Any, params: MENDTrainingParams, train: Sequence[EditExample], val: Sequence[EditExample],
    out_dir: str | Path, *, identity: dict[str, Any] | None = None, show_progress: bool = True,
) -> Any:
    """Train a MEND network on ``train`` (validated on ``val``) into ``out_dir``; resumes a run found there."""
    from lmedit.training import fit_method_task

    return fit_method_task(MENDTask(model, tok, params), params, train, val, out_dir, identity=identity,
                           show_progress=show_progress)


def tiny_setup(model: nn.Module, tok: Any, workdir: Path) -> dict[str, Any]:
    """MEND on a tiny model: a rank-8 network over the top two layers, trained for 40 steps on vocabulary-word edits."""
    from lmedit.smoke import edit_examples

    archive = Path(workdir) / "mend"
    top = ModelSpec.from_model(model).num_layers - 1
    params = MENDTrainingParams(layers=[max(top - 1, 0), top], rank=8, max_steps=40, batch_size=8, val_every=20,
                                val_examples=16, save_every=10, lr=1e-3, lr_lr=1e-4, edit_lr=1e-2, cedit=1.0, patience=10)
    train_mend(model, tok, params, edit_examples(tok, 200), edit_examples(tok, 16, seed=1), archive, show_progress=False)
    return {"archive": str(archive)}


register(METHOD, hparams=MENDHyperParams, batch=True, tiny_setup=tiny_setup,
         trainer=TrainingEntry(MENDTrainingParams, train_mend,
                         "MEND's gradient-editing hypernetwork (edited weights: the last 3 MLP down-projections by default)"),
         contract=Contract(effect="output", why="the hypernetwork is trained; a briefly trained one on a tiny random "
                           "model changes the weights without a guarantee that the target becomes likelier"))(apply_mend)
