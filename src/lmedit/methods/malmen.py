"""MALMEN (Tan et al., ICLR 2024): a MEND-style hypernetwork whose per-token shifts are joined by least squares.

MEND sums the pseudo-gradients of many edits, so edits that share keys
cancel or overshoot each other. MALMEN keeps MEND's reading of the gradient
factors and changes how they are combined:

1. for every edited token ``t`` of every edit, a hypernetwork maps the
   standardised ``[u_t; δ_t]`` (the layer input and the loss gradient at its
   output) to ``[ũ_t; δ̃_t]``; its value shift is
   ``d_t = −η_l (u_t · ũ_t) δ̃_t`` (what MEND's update ``−η_l δ̃_t ũ_tᵀ`` does
   to ``u_t`` alone);
2. the weight shift that best realises all of them at once is the ridge
   solution ``S = argmin ‖U S − D‖² + e^{λ_l} ‖S‖²
   = (UᵀU + e^{λ_l} I)⁻¹ Uᵀ D`` (keys ``U``, shifts ``D``, one row per token),
   and the layer computes ``y = W u + Sᵀ u``.

The blocks are ``y + s_l ⊙ relu(y A B + b) + o_l`` (``B = 0`` at the start,
so the network starts as the identity), shared by the edited weights of one
shape, with a per-weight scale, shift, step ``η_l`` and log-ridge ``λ_l``.

Training (``lmedit train malmen``) edits a batch of edits at once and
minimises ``NLL(rephrase targets | edited) + loc_coef · KL(base ‖ edited)``.
The meta-gradient is taken in two stages, so memory does not grow with the
number of edits through the model: the loss gradient ``G`` with respect to
each weight shift ``S``, then, through the normal equation,
``∂L/∂D = U (UᵀU + e^λ I)⁻¹ G`` and ``∂L/∂λ = −e^λ ⟨(UᵀU + e^λ I)⁻¹ G, S⟩``,
which are pushed through the hypernetwork.

Editing is an in-place weight edit (bit-exact restore); every request of a
call joins one least-squares solve, which is the method's point.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from lmedit.training.shared import CheckpointCache, scored_sequence, split_rows

METHOD = "MALMEN"
TRAIN_COMMAND = "lmedit train malmen"


@dataclass
class MALMENHyperParams(HyperParams):
    """Editing with a trained MALMEN network; the network's own settings come from its checkpoint."""

    archive: str = "{lmedit_home}/checkpoints/MALMEN/smollm2-135m"


@dataclass
class MALMENTrainingParams(EditorTrainingParams):
    """What ``lmedit train malmen`` trains; ``batch_size`` is the number of edits joined in one step (``n_edits``)."""

    layers: list[int] = field(default_factory=lambda: [-6, -5, -4, -3, -2, -1])
    modules: list[Literal["mlp_out", "mlp_in"]] = field(default_factory=lambda: ["mlp_out"])
    rank: int = 1920
    n_blocks: int = 2
    edit_lr: float = 1e-6
    lr: float = 1e-5
    loc_coef: float = 1.0
    token: Literal["answer", "reached"] = "answer"
    grad_clip: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.layers:
            raise HyperParamsError("layers must name at least one layer")
        if self.rank < 1 or self.n_blocks < 1:
            raise HyperParamsError("rank and n_blocks must be at least 1")
        for name in ("lr", "edit_lr"):
            if getattr(self, name) <= 0:
                raise HyperParamsError(f"{name} must be positive")
        if self.loc_coef < 0:
            raise HyperParamsError("loc_coef must be zero or positive")

    def network_settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "n_blocks": self.n_blocks, "edit_lr": self.edit_lr, "token": self.token}


# --------------------------------------------------------------------------- the network


class ShiftBlock(nn.Module):
    """``y + s_mode ⊙ relu(y A B + b) + o_mode``; ``B = 0`` at the start, so the block is the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.A = nn.Parameter(torch.randn(dim, rank))
        self.B = nn.Parameter(torch.zeros(rank, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, y: torch.Tensor, mode: int) -> torch.Tensor:
        # clamp, not relu: at the start ``y A B + b`` is exactly 0, where relu passes no gradient and A, B, b would
        # never train (the reference uses clamp for this reason)
        return y + self.scale[mode] * ((y @ self.A) @ self.B + self.bias).clamp(min=0) + self.shift[mode]


class ShiftPredictor(nn.Module):
    """Value shifts ``d_t`` for the edited weights of one shape (``mode`` = which of them)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, n_blocks: int, n_modes: int, edit_lr: float) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        dim = in_dim + out_dim
        self.blocks = nn.ModuleList(ShiftBlock(dim, rank, n_modes) for _ in range(n_blocks))
        self.edit_lr = nn.Parameter(torch.full((n_modes,), float(edit_lr)))
        self.log_ridge = nn.Parameter(torch.zeros(n_modes))
        # one set of moments per shape, as the reference keeps them
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, torch.cat([u, delta], -1))

    def value_shifts(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> torch.Tensor:
        z = standardise(torch.cat([u, delta], -1), self.count, self.mean, self.m2, METHOD)
        for block in self.blocks:
            z = block(z, mode)
        pseudo_u, pseudo_delta = z[:, : self.in_dim], z[:, self.in_dim :]
        return -self.edit_lr[mode] * (u * pseudo_u).sum(-1, keepdim=True) * pseudo_delta


class MALMENNetwork(nn.Module):
    """One :class:`ShiftPredictor` per weight shape; ``index`` numbers the edited weights."""

    def __init__(self, weights: Sequence[EditedWeight], rank: int, n_blocks: int, edit_lr: float,
                 token: str = "answer") -> None:
        super().__init__()
        self.weights = list(weights)
        self.token = token
        shapes: dict[str, list[int]] = {}
        for index, weight in enumerate(self.weights):
            shapes.setdefault(weight.shape_key, []).append(index)
        self.modes = {index: (key, members.index(index)) for key, members in shapes.items() for index in members}
        self.predictors = nn.ModuleDict({
            key: ShiftPredictor(self.weights[m[0]].in_dim, self.weights[m[0]].out_dim, rank, n_blocks, len(m), edit_lr)
            for key, m in shapes.items()
        })

    def predictor(self, index: int) -> tuple[ShiftPredictor, int]:
        key, mode = self.modes[index]
        return self.predictors[key], mode


class RidgeSystem:
    """``A = UᵀU + e^λ I`` for keys ``U`` (tokens × in), solved in float64 in whichever size is smaller.

    With fewer tokens than key dimensions (every single edit) the push-through
    identity ``(UᵀU + cI)⁻¹Uᵀ = Uᵀ(UUᵀ + cI)⁻¹`` turns an ``in × in`` solve
    into a ``tokens × tokens`` one; both give the same shift.
    """

    def __init__(self, keys: torch.Tensor, log_ridge: torch.Tensor) -> None:
        self.keys = keys.double()
        self.ridge = float(log_ridge.detach().exp())
        n, k = self.keys.shape
        self.small = n < k
        gram = self.keys @ self.keys.T if self.small else self.keys.T @ self.keys
        gram.diagonal().add_(self.ridge)
        self.factor = torch.linalg.cholesky(gram)

    def shift(self, value_shifts: torch.Tensor) -> torch.Tensor:
        """``S = A⁻¹ Uᵀ D``, shape (in, out)."""
        d = value_shifts.double()
        if self.small:
            return self.keys.T @ torch.cholesky_solve(d, self.factor)
        return torch.cholesky_solve(self.keys.T @ d, self.factor)

    def inverse_times(self, matrix: torch.Tensor) -> torch.Tensor:
        """``A⁻¹ M`` for M of shape (in, m); in the small form ``(M − Uᵀ(UUᵀ + cI)⁻¹ U M) / c``."""
        m = matrix.double()
        if self.small:
            return (m - self.keys.T @ torch.cholesky_solve(self.keys @ m, self.factor)) / self.ridge
        return torch.cholesky_solve(m, self.factor)


def weight_shifts(network: MALMENNetwork, factors: Factors) -> list[tuple[RidgeSystem, torch.Tensor]]:
    """Per edited weight, the ridge system of its keys and the shift ``S`` (in × out, float64), without gradients."""
    out = []
    for index in range(len(network.weights)):
        predictor, mode = network.predictor(index)
        u, d = torch.cat(factors.u[index]), torch.cat(factors.delta[index])
        with torch.no_grad():
            system = RidgeSystem(u, predictor.log_ridge[mode])
            out.append((system, system.shift(predictor.value_shifts(u, d, mode))))
    return out


@contextmanager
def shifted_outputs(model: nn.Module, weights: Sequence[EditedWeight], shifts: Sequence[torch.Tensor]) -> Iterator[None]:
    """Make each edited module compute ``W u + Sᵀ u`` (``S`` may require grad), without touching ``W``."""
    hooks = []
    for weight, shift in zip(weights, shifts):
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, shift=shift) -> torch.Tensor:
            return output + (args[0].to(shift.dtype) @ shift).to(output.dtype)

        hooks.append(get_module(model, weight.module).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in hooks:
            handle.remove()


def meta_surrogate(network: MALMENNetwork, factors: Factors, solved: Sequence[tuple[RidgeSystem, torch.Tensor]],
                   grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A scalar whose gradient is the meta-gradient through the normal equation (the reference's second stage).

    Given ``G = ∂L/∂S`` per weight: ``∂L/∂D = U A⁻¹ G`` goes back through the
    recomputed shifts ``D``, and ``∂L/∂λ = −e^λ ⟨A⁻¹ G, S⟩`` to the log-ridge.
    """
    total: torch.Tensor | int = 0
    for index, ((system, shift), grad) in enumerate(zip(solved, grads)):
        predictor, mode = network.predictor(index)
        solved_grad = system.inverse_times(grad)  # A⁻¹ G, (in, out)
        ridge_grad = -system.ridge * float((solved_grad * shift).sum())
        shifts_grad = (system.keys @ solved_grad).float()  # ∂L/∂D, (tokens, out)
        u, d = torch.cat(factors.u[index]), torch.cat(factors.delta[index])
        shifts = predictor.value_shifts(u, d, mode)
        total = total + ridge_grad * predictor.log_ridge[mode] + (shifts_grad.to(shifts.device) * shifts).sum()
    assert isinstance(total, torch.Tensor)
    return total


# --------------------------------------------------------------------------- editing


_NETWORKS = CheckpointCache()


def load_network(model: nn.Module, archive: str) -> MALMENNetwork:
    """The trained network in ``archive``, checked against ``model`` (architecture and weight shapes)."""
    return load_hypernetwork(model, archive, _NETWORKS, METHOD, TRAIN_COMMAND, MALMENNetwork)


def apply_malmen(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: MALMENHyperParams) -> WeightSnapshotHandle:
    """Edit with a trained MALMEN network: all requests' shifts joined by one least-squares solve per weight."""
    network = load_network(model, hparams.archive)
    started = time.perf_counter()
    handle = WeightSnapshotHandle(METHOD, model, [w.name for w in network.weights])
    factors = request_factors(model, tok, requests, network.weights, network.token)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for weight, (_, shift) in zip(network.weights, weight_shifts(network, factors)):
            param = params[weight.name]
            param.add_((shift if weight.conv1d else shift.T).to(param.device, param.dtype))
    handle.info = {"seconds": time.perf_counter() - started, "tokens": int(factors.u[0][0].shape[0]),
                   "requests": len(requests)}
    return handle


# --------------------------------------------------------------------------- training


class MALMENTask(HypernetworkTask):
    """The training task for :class:`lmedit.training.Trainer`: a batch of edits joined into one shift per weight.

    Validation edits each chunk of ``batch_size`` examples at once, as training does.
    """

    method = METHOD

    def __init__(self, model: nn.Module, tok: Any, params: MALMENTrainingParams) -> None:
        super().__init__(model, tok, params, MALMENNetwork)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.network.parameters()), "lr": self.params.lr}]

    def _edit_batch(self, batch: Sequence[EditExample], *, training: bool) -> tuple[torch.Tensor, dict[str, float]]:
        b = len(batch)
        sequences = ([scored_sequence(self.tok, e.prompt, e.target) for e in batch]
                     + [scored_sequence(self.tok, e.rephrase, e.target) for e in batch]
                     + [scored_sequence(self.tok, e.loc_prompt, e.loc_answer) for e in batch])
        edit_rows = list(range(b))
        with frozen_model(self.model):
            logits_fn = SequenceLogits(self.model, self.weights[0].module, [s.ids for s in sequences],
                                       [s.columns for s in sequences], self.pad_id)
            with torch.no_grad():
                base = split_rows(logits_fn(), sequences)
            factors = gradient_factors(self.model, self.weights, logits_fn, sequences, edit_rows, [edit_rows],
                                       self.params.token)
            if training:
                for index in range(len(self.weights)):
                    predictor, _ = self.network.predictor(index)
                    predictor.observe(factors.u[index][0], factors.delta[index][0])
            solved = weight_shifts(self.network, factors)
            shifts = [shift.float().requires_grad_(training) for _, shift in solved]
            with torch.set_grad_enabled(training), shifted_outputs(self.model, self.weights, shifts):
                post = split_rows(logits_fn(), sequences)
                meta_loss, metrics = self._meta_loss(sequences, base, post, b)
            if not training:
                return meta_loss.detach(), metrics
            grads = torch.autograd.grad(meta_loss, shifts)
        surrogate = meta_surrogate(self.network, factors, solved, grads)
        # the value is the meta-loss; the gradient is the hypernetwork's share of it
        return surrogate + (meta_loss.detach() - surrogate.detach()), metrics

    def _meta_loss(self, sequences: Sequence[Any], base: list[torch.Tensor], post: list[torch.Tensor],
                   b: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Token-mean NLL of the rephrase targets plus ``loc_coef`` × KL(base ‖ edited) over the locality answers."""
        device = post[0].device
        targets = [torch.tensor(s.targets, dtype=torch.long, device=device) for s in sequences]
        rephrase = torch.cat(post[b : 2 * b])
        gen_loss = nn.functional.cross_entropy(rephrase, torch.cat(targets[b : 2 * b]))
        loc_post, loc_base = torch.cat(post[2 * b :]), torch.cat(base[2 * b :])
        loc_loss = nn.functional.kl_div(loc_post.log_softmax(-1), loc_base.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        accuracy = [float((post[r].argmax(-1) == targets[r]).float().mean()) for r in range(2 * b)]
        agreement = [float((post[r].argmax(-1) == base[r].argmax(-1)).float().mean()) for r in range(2 * b, 3 * b)]
        metrics = {"loss_rephrase": float(gen_loss.detach()), "loss_loc": float(loc_loss.detach()),
                   "rewrite_acc": sum(accuracy[:b]) / b, "rephrase_acc": sum(accuracy[b:]) / b,
                   "locality": sum(agreement) / b}
        return gen_loss + self.params.loc_coef * loc_loss, metrics


def train_malmen(
    model: nn.Module, tok: Any, params: MALMENTrainingParams, train: Sequence[EditExample], val: Sequence[EditExample],
    out_dir: str, *, identity: dict[str, Any] | None = None, show_progress: bool = True,
) -> Any:
    """Train a MALMEN network on ``train`` (validated on ``val``) into ``out_dir``; resumes a run found there."""
    from lmedit.training import fit_method_task

    return fit_method_task(MALMENTask(model, tok, params), params, train, val, out_dir, identity=identity,
                           show_progress=show_progress)


def tiny_setup(model: nn.Module, tok: Any, workdir: Any) -> dict[str, Any]:
    """MALMEN on a tiny model: a rank-8 network over the top two layers, trained for 40 steps on vocabulary-word edits."""
    from pathlib import Path

    from lmedit.smoke import edit_examples

    archive = Path(workdir) / "malmen"
    top = ModelSpec.from_model(model).num_layers - 1
    params = MALMENTrainingParams(layers=[max(top - 1, 0), top], rank=8, n_blocks=1, max_steps=40, batch_size=8,
                                  val_every=20, val_examples=16, save_every=10, lr=1e-3, edit_lr=1e-2, patience=10)
    train_malmen(model, tok, params, edit_examples(tok, 200), edit_examples(tok, 16, seed=1), str(archive),
                 show_progress=False)
    return {"archive": str(archive)}


register(METHOD, hparams=MALMENHyperParams, batch=True, tiny_setup=tiny_setup,
         trainer=TrainingEntry(MALMENTrainingParams, train_malmen,
                               "MALMEN's shift-predicting hypernetwork, joined by least squares "
                               "(edited weights: the last 6 MLP down-projections by default)"),
         contract=Contract(effect="output", why="the hypernetwork is trained; a briefly trained one on a tiny random "
                           "model changes the weights without a guarantee that the target becomes likelier"))(apply_malmen)
