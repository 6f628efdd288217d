"""UltraEdit (Gu et al., 2025): training-free lifelong editing with lifelong normalisation.

Each call (one "turn" of the lifelong protocol) edits a batch of facts in
closed form, with no optimisation loop and no memory of earlier edits
beyond running statistics:

1. in sub-batches of ``grad_batch_size`` requests, one teacher-forced pass of
   ``prompt + answer`` and one backward pass of the mean answer-token
   cross-entropy give, at every edited linear module and every position that
   predicts an answer token, the module's input k and the gradient g of the
   loss with respect to its output;
2. running mean and standard deviation of ``[k, g]`` are kept per weight
   shape (modules of one shape share them) over the whole lifetime of the
   model and updated with this turn's rows first (*lifelong
   normalisation*); k̂ and ĝ are the normalised rows;
3. each row asks for the output change ``v = -lr · ‖k̂‖² · ĝ`` (a gradient
   step in normalised space) and the weight absorbs all rows at once by
   ridge regression on the raw keys, ``ΔW = (KᵀK + ρ I)⁻¹ Kᵀ V`` (MEMIT's
   closed form with the identity for C, :func:`lmedit.locate.core.memit_update`).

This follows the authors' code (XiaojieGu/UltraEdit): the value changes are
not de-normalised, the regression uses the raw keys, ρ = 1, and the running
variance uses their update ``var += B·var_batch + n·B·δ²/(n+B)`` with
``std = sqrt(var / (n + B − 1))``. One deliberate difference: a sub-batch of a
single row (one request with a one-token answer) gets a batch variance of 0
where the reference's unbiased variance would be NaN.

The statistics live in the session state of the model object; an edit's
handle puts them back as they were before it, so restoring edits newest
first (as :func:`lmedit.handles.restore_all` does) is exact.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lmedit.adapters import frozen_model, module_path
from lmedit.forward import left_pad, pad_id_of, tokenize_pair
from lmedit.checkpoint import register_session_codec
from lmedit.handles import WeightSnapshotHandle
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.locate.core import add_to_weight, memit_update, session_state
from lmedit.registry import register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, _is_conv1d, get_module, in_out_features

_STATE_KEY = "ultraedit"
MODULE_ROLES = ("mlp_in", "mlp_out")


@dataclass
class UltraEditHyperParams(HyperParams):
    layers: list[int] = field(default_factory=lambda: [18, 19, 20, 21, 22, 23, 24])
    module: str = "mlp_in"
    """``mlp_in``: the MLP's input projections (gate and up for Llama); ``mlp_out``: its down-projection."""
    inner_params: list[str] = field(default_factory=list)
    """EasyEdit's list of edited weights (e.g. ``model.layers.11.mlp.gate_proj.weight``); overrides layers/module."""
    lr: float = 1e-6
    ridge: float = 1.0
    grad_batch_size: int = 10
    token: str = "answer"
    """``answer``: rows at the positions that predict answer tokens (the authors'); ``all``: every position of
    prompt + answer (EasyEdit's ``token: mask``)."""

    def validate(self) -> None:
        if self.module not in MODULE_ROLES:
            raise HyperParamsError(f"module must be one of {', '.join(MODULE_ROLES)}, got {self.module!r}")
        if not self.inner_params and not self.layers:
            raise HyperParamsError("name the edited modules: layers (with module) or inner_params")
        if self.lr <= 0 or self.ridge <= 0:
            raise HyperParamsError("lr and ridge must be positive")
        if self.grad_batch_size < 1:
            raise HyperParamsError("grad_batch_size must be at least 1")
        if self.token not in ("answer", "all"):
            raise HyperParamsError(f"token must be 'answer' or 'all', got {self.token!r}")

    def module_names(self, model: torch.nn.Module) -> list[str]:
        """The dotted paths of the edited linear modules in ``model``."""
        if self.inner_params:
            names = [module_path(p) for p in self.inner_params]
        else:
            spec = ModelSpec.from_model(model)
            try:
                names = [n for layer in self.layers for n in (spec.mlp_in(layer) if self.module == "mlp_in" else (spec.mlp_out(layer),))]
            except IndexError as exc:
                raise HyperParamsError(f"layers {self.layers}: {exc}; this model has {spec.num_layers} layers") from None
        for name in names:
            try:
                in_out_features(get_module(model, name))
            except (AttributeError, ValueError, TypeError) as exc:
                raise HyperParamsError(f"{name} is not a linear module of this model ({exc})") from None
        return list(dict.fromkeys(names))


@dataclass
class RunningStats:
    """Running mean and spread of rows ``[k, g]`` (the authors' update, see the module docstring)."""

    n: float
    mean: torch.Tensor
    var: torch.Tensor

    @classmethod
    def empty(cls, width: int) -> "RunningStats":
        return cls(0.0, torch.zeros(width, dtype=torch.float32), torch.zeros(width, dtype=torch.float32))

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.float().cpu()
        count = rows.shape[0]
        total = self.n + count
        delta = rows.mean(0) - self.mean
        self.mean = self.mean + count * delta / total
        self.var = self.var + count * rows.var(0, unbiased=count > 1) + self.n * count * delta**2 / total
        self.n = total

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.var / (self.n - 1 + _EPS))

    def normalise(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.float() - self.mean.to(rows.device)) / (self.std.to(rows.device) + _EPS)

    def copy(self) -> "RunningStats":
        return RunningStats(self.n, self.mean.clone(), self.var.clone())


_EPS = torch.finfo(torch.float32).eps


def ultraedit_stats(model: torch.nn.Module) -> dict[tuple[int, int], RunningStats]:
    """The lifelong statistics of this model object, by (d_in, d_out) of the edited weights."""
    return session_state(model).setdefault(_STATE_KEY, {})


def _dump_stats(stats: dict[tuple[int, int], RunningStats]) -> tuple[dict[str, torch.Tensor], list[list[Any]]]:
    tensors = {}
    for n, s in enumerate(stats.values()):
        tensors[f"{n}/mean"], tensors[f"{n}/var"] = s.mean, s.var
    return tensors, [[list(shape), s.n] for shape, s in stats.items()]


def _load_stats(tensors: dict[str, torch.Tensor], entries: list[list[Any]]) -> dict[tuple[int, int], RunningStats]:
    return {tuple(shape): RunningStats(float(count), tensors[f"{n}/mean"], tensors[f"{n}/var"])
            for n, (shape, count) in enumerate(entries)}


register_session_codec(_STATE_KEY, _dump_stats, _load_stats)


class UltraEditHandle(WeightSnapshotHandle):
    """Restores the weights and the lifelong statistics as they were before this edit."""

    def __init__(self, model: torch.nn.Module, param_names: Sequence[str]) -> None:
        super().__init__("UltraEdit", model, param_names)
        self._stats_before = {shape: s.copy() for shape, s in ultraedit_stats(model).items()}

    def _restore(self) -> None:
        super()._restore()
        stats = ultraedit_stats(self.model)
        stats.clear()
        stats.update({shape: s.copy() for shape, s in self._stats_before.items()})
        if not stats:
            session_state(self.model).pop(_STATE_KEY, None)


def _tiny_setup(model: torch.nn.Module, tok: Any, workdir: Any) -> dict[str, Any]:
    """Every layer's down-projection, rows at every position: one request with a one-token answer has a
    single answer row, whose normalised value is 0 in a fresh session (its own mean, no spread)."""
    layers = ModelSpec.from_model(model).num_layers
    return {"layers": list(range(layers)), "module": "mlp_out", "lr": 1.0, "grad_batch_size": 2, "token": "all"}


@register("UltraEdit", hparams=UltraEditHyperParams, batch=True, tiny_setup=_tiny_setup)
def apply_ultraedit(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                    hparams: UltraEditHyperParams) -> UltraEditHandle:
    """UltraEdit: closed-form lifelong editing from one gradient pass and running normalisation."""
    started = time.perf_counter()
    names = hparams.module_names(model)
    modules = {name: get_module(model, name) for name in names}
    handle = UltraEditHandle(model, [f"{name}.weight" for name in names])
    stats = ultraedit_stats(model)
    keys: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    losses = []
    for start in range(0, len(requests), hparams.grad_batch_size):
        sub = requests[start : start + hparams.grad_batch_size]
        loss, rows = _keys_and_grads(model, tok, modules, sub, hparams.token)
        losses.append(loss)
        for name, (k, g) in rows.items():
            keys[name].append(k)
            grads[name].append(g)
            shape = (k.shape[1], g.shape[1])
            stats.setdefault(shape, RunningStats.empty(sum(shape))).update(torch.cat([k, g], dim=1))
    norms = {}
    for name, module in modules.items():
        K, G = torch.cat(keys[name]), torch.cat(grads[name])
        normalised = stats[(K.shape[1], G.shape[1])].normalise(torch.cat([K, G], dim=1))
        k_hat, g_hat = normalised[:, : K.shape[1]], normalised[:, K.shape[1] :]
        values = -hparams.lr * (k_hat**2).sum(dim=1, keepdim=True) * g_hat
        # ridge regression ΔW = (KᵀK + ρI)⁻¹KᵀV is MEMIT's closed form with C = I and λ = ρ, in (d_out, d_in)
        identity = torch.eye(K.shape[1], dtype=torch.float64, device=K.device)
        delta = memit_update(K.T, values.T, identity, hparams.ridge)
        add_to_weight(model, name, delta, _is_conv1d(module))
        norms[name] = float(delta.norm())
    handle.info = {"modules": names, "update_norms": norms, "loss_before": sum(losses) / len(losses),
                   "rows": sum(t.shape[0] for t in keys[names[0]]), "seconds": time.perf_counter() - started}
    return handle


def _keys_and_grads(model: torch.nn.Module, tok: Any, modules: dict[str, torch.nn.Module],
                    requests: Sequence[EditRequest], token: str) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One teacher-forced forward and backward pass: (loss, {module: (inputs, output gradients)}) at the chosen rows."""
    pairs = [tokenize_pair(tok, r.prompt, r.target_new) for r in requests]
    ids, mask, positions = left_pad([p.ids for p in pairs], pad_id_of(tok))
    device = next(model.parameters()).device
    width = ids.shape[1]
    predicting = torch.zeros_like(mask, dtype=torch.bool)  # positions whose next token is an answer token
    labels = torch.full_like(ids, -100)
    for row, pair in enumerate(pairs):
        pad = width - len(pair.ids)
        predicting[row, pad + pair.prompt_len - 1 : width - 1] = True
        labels[row, pad + pair.prompt_len - 1 : width - 1] = torch.tensor(pair.target_ids)
    rows = predicting if token == "answer" else mask.bool()
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    with ExitStack() as stack, frozen_model(model), torch.enable_grad():
        for name, module in modules.items():
            stack.enter_context(_capturing(module, name, inputs, outputs))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False).logits
        select = predicting.to(device)
        loss = torch.nn.functional.cross_entropy(logits[select].float(), labels.to(device)[select])
        loss.backward()
    chosen = rows.to(device)
    captured = {name: (inputs[name][chosen].detach().float(), outputs[name].grad[chosen].float()) for name in modules}
    return float(loss.detach()), captured


class _capturing:
    """Forward hook: keep the module's input, and make its output a leaf whose gradient backward fills in."""

    def __init__(self, module: torch.nn.Module, name: str, inputs: dict[str, torch.Tensor],
                 outputs: dict[str, torch.Tensor]) -> None:
        self.module, self.name, self.inputs, self.outputs = module, name, inputs, outputs

    def __enter__(self) -> "_capturing":
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            self.inputs[self.name] = args[0].detach()
            leaf = output.detach().requires_grad_(True)
            self.outputs[self.name] = leaf
            return leaf

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
