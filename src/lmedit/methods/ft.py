"""Fine-tuning baselines: FT-L and FT-M.

Both fine-tune the weights of chosen modules (by default one layer's MLP
down-projection) with Adam for a few steps.

* FT-L (ROME paper's constrained fine-tuning): the loss reads every target
  token's log-probability at the *last prompt position*
  (``objective: prompt_last``), and after every step the weights are
  clamped to within ``norm_constraint`` of the originals (an L-inf ball).
* FT-M (EasyEdit): cross-entropy on the target tokens of
  ``prompt + " " + target`` with the prompt masked (``objective: target_new``).

As in EasyEdit, a batch whose loss is already below ``early_stop_loss`` is
not stepped, and training stops once the epoch's mean loss is below it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from lmedit.adapters import frozen_model
from lmedit.forward import TokenizedPair, last_columns_logits, pad_id_of, tokenize_pair
from lmedit.handles import WeightSnapshotHandle
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.precision import MasterAdam
from lmedit.registry import register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec

ModuleRole = Literal["mlp_out", "mlp_in", "attn_out"]


@dataclass
class FTHyperParams(HyperParams):
    """Hyperparameters shared by FT-L and FT-M (they differ in objective and constraint defaults)."""

    layers: list[int] = field(default_factory=lambda: [21])
    modules: list[ModuleRole] = field(default_factory=lambda: ["mlp_out"])
    objective: Literal["prompt_last", "target_new"] = "target_new"
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: float | None = None
    batch_size: int = 64
    early_stop_loss: float = 1e-2

    def validate(self) -> None:
        if not self.layers:
            raise HyperParamsError("layers must name at least one layer")
        if self.num_steps < 1 or self.batch_size < 1:
            raise HyperParamsError("num_steps and batch_size must be at least 1")
        if self.lr <= 0:
            raise HyperParamsError("lr must be positive")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise HyperParamsError("norm_constraint must be positive, or null for no constraint")


@dataclass
class FTLHyperParams(FTHyperParams):
    """FT-L defaults: last-prompt-position objective with an L-inf constraint on the change."""

    objective: Literal["prompt_last", "target_new"] = "prompt_last"
    norm_constraint: float | None = 5e-4


def tiny_setup(model: torch.nn.Module, tok: Any, workdir: Path) -> dict[str, Any]:
    """FT on a tiny random model: the top layer's down-projection, a large rate (its weights are small)."""
    return {"layers": [ModelSpec.from_model(model).num_layers - 1], "lr": 5e-2, "num_steps": 40}


@register("FT-M", hparams=FTHyperParams, batch=True, tiny_setup=tiny_setup)
def apply_ft_m(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: FTHyperParams) -> WeightSnapshotHandle:
    """Fine-tune chosen weights on the target tokens with the prompt masked (EasyEdit's FT-M)."""
    return _fine_tune("FT-M", model, tok, requests, hparams)


@register("FT-L", hparams=FTLHyperParams, batch=True,
          tiny_setup=lambda model, tok, workdir: {**tiny_setup(model, tok, workdir), "norm_constraint": 0.5})
def apply_ft_l(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: FTLHyperParams) -> WeightSnapshotHandle:
    """Fine-tune one layer's MLP with the change clamped to a norm ball (ROME's FT-L)."""
    return _fine_tune("FT-L", model, tok, requests, hparams)


def trainable_parameter_names(spec: ModelSpec, hparams: FTHyperParams) -> list[str]:
    """Weight names of the chosen modules at the chosen layers."""
    names: list[str] = []
    for layer in hparams.layers:
        if not 0 <= layer < spec.num_layers:
            raise HyperParamsError(f"layer {layer} does not exist; the model has layers 0..{spec.num_layers - 1}")
        for role in hparams.modules:
            paths = {"mlp_out": (spec.mlp_out(layer),), "mlp_in": spec.mlp_in(layer), "attn_out": (spec.attn_out(layer),)}[role]
            names.extend(f"{path}.weight" for path in paths)
    return names


def _fine_tune(
    method: str, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: FTHyperParams
) -> WeightSnapshotHandle:
    spec = ModelSpec.from_model(model)
    names = trainable_parameter_names(spec, hparams)
    handle = WeightSnapshotHandle(method, model, names)
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    optimizer = MasterAdam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
    # the ball is kept on the float32 masters (the weights themselves in float32)
    originals = [m.detach().clone() for m in optimizer.masters] if hparams.norm_constraint is not None else []
    examples = [tokenize_pair(tok, r.prompt, r.target_new) for r in requests]
    pad_id = pad_id_of(tok)

    started = time.perf_counter()
    batches = [examples[start : start + hparams.batch_size] for start in range(0, len(examples), hparams.batch_size)]
    first_block = min(hparams.layers)
    losses: list[float] = []
    with frozen_model(model):
        for p in params:
            p.requires_grad_(True)
        try:
            batch_losses = [_batch_loss(model, spec, first_block, batch, pad_id, hparams.objective) for batch in batches]
            for _ in range(hparams.num_steps):
                epoch = []
                for loss_of in batch_losses:
                    loss = loss_of()
                    epoch.append(loss.item())
                    if epoch[-1] >= hparams.early_stop_loss:
                        optimizer.zero_grad()
                        optimizer.backward(loss)
                        optimizer.step()
                    if originals:
                        _clamp_to_ball(optimizer.masters, originals, hparams.norm_constraint)
                        optimizer.push()
                losses.append(sum(epoch) / len(epoch))
                if losses[-1] < hparams.early_stop_loss:
                    break
        finally:
            for p in params:
                p.grad = None
    handle.info = {"losses": losses, "steps": len(losses), "seconds": time.perf_counter() - started}
    return handle


def _batch_loss(
    model: torch.nn.Module, spec: ModelSpec, first_block: int, batch: list[TokenizedPair], pad_id: int, objective: str
) -> Callable[[], torch.Tensor]:
    """The loss of one batch as a function of the trained weights.

    Every trained weight sits in block ``first_block`` or above, so the
    blocks below it are computed once for the whole loop
    (:func:`lmedit.forward.partial.last_columns_logits`).
    """
    if objective == "prompt_last":
        logits_of = last_columns_logits(model, spec, first_block, [e.ids[: e.prompt_len] for e in batch], pad_id, 1)
        return lambda: _prompt_last_loss(logits_of(), batch)
    longest = max(len(e.target_ids) for e in batch)
    logits_of = last_columns_logits(model, spec, first_block, [e.ids for e in batch], pad_id, longest + 1)
    return lambda: _masked_target_loss(logits_of(), batch)


def _clamp_to_ball(params: list[torch.Tensor], originals: list[torch.Tensor], eps: float | None) -> None:
    with torch.no_grad():
        for p, o in zip(params, originals):
            p.copy_(torch.clamp(p, min=o - eps, max=o + eps))


def _masked_target_loss(logits: torch.Tensor, batch: list[TokenizedPair]) -> torch.Tensor:
    """Per example, mean NLL of its target tokens given everything before them; then the batch mean.

    ``logits`` are the last ``longest + 1`` columns of the left-padded batch.
    """
    longest = logits.shape[1] - 1
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # column j predicts the token in column j+1
    losses = []
    for row, example in enumerate(batch):
        n = len(example.target_ids)
        rows = logprobs[row, longest - n :]
        target = torch.tensor(example.target_ids, device=rows.device)
        losses.append(-rows.gather(1, target[:, None]).mean())
    return torch.stack(losses).mean()


def _prompt_last_loss(logits: torch.Tensor, batch: list[TokenizedPair]) -> torch.Tensor:
    """ROME's FT-L: every target token scored at the last prompt position (exact for one-token targets)."""
    logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
    losses = [-logprobs[row, list(e.target_ids)].mean() for row, e in enumerate(batch)]
    return torch.stack(losses).mean()
