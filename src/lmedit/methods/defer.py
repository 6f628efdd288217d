"""DEFER: the GRACE paper's learned-deferral baseline, as EasyEdit runs it.

One layer (EasyEdit: ``model.layers[27].mlp.down_proj``) is wrapped with a
gate ``g = sigmoid(w . q + b)`` and a value network ``v = W_v q + b_v``, both
reading the query q = the layer's input at the *last token of the forward
pass* (each row is left-padded, so that is the last real token):

* while editing, the output is mixed softly at every position,
  ``g * v + (1 - g) * layer(x)``, and gate and value network are trained
  for ``n_iter`` Adam steps at ``edit_lr`` on the edit's target tokens
  (prompt + " " + target, prompt masked; the training input ends with the
  last target token, so that token's input is the query being trained);
* at inference the gate is hard: every position's output becomes ``v`` when
  ``g >= threshold``, else stays the layer's.

Only the positive example of each edit is seen (no negatives, no replay),
so later edits re-fit the one shared gate and value network, which is why
DEFER forgets in sequential editing. Because the query is the last token
of whatever is fed, DEFER is not causal: under teacher forcing it sees
the answer tokens, under generation it does not. docs/lifelong.md explains
how that gap produced the paper's 0.03 and a user's 0.628 rewrite at T=1000.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lmedit.adapters import (
    AdapterSite,
    load_adapter_edit,
    AdapterEditHandle,
    AdapterError,
    AdapterLayer,
    SequenceLogits,
    ensure_adapter,
    frozen_model,
    register_adapter_kind,
    remove_adapter,
    site_sizes,
    target_nll,
)
from lmedit.forward import tokenize_pair
from lmedit.hparams import HyperParamsError
from lmedit.limits import size
from lmedit.precision import MasterAdam
from lmedit.registry import register
from lmedit.requests import EditRequest


@dataclass
class DeferHyperParams(AdapterSite):
    """EasyEdit's DEFER fields (llama-7b: layer 27's down-projection, lr 7e-5, 100 steps, threshold 0.5)."""

    edit_lr: float = 7e-5
    n_iter: int = 100
    threshold: float = 0.5

    def validate(self) -> None:
        super().validate()
        if self.n_iter < 1 or self.edit_lr <= 0:
            raise HyperParamsError("n_iter must be at least 1 and edit_lr positive")
        if not 0.0 < self.threshold < 1.0:
            raise HyperParamsError("threshold must lie strictly between 0 and 1 (it is compared with a sigmoid)")


@dataclass
class DeferUndo:
    """DEFER re-fits shared parameters, so an edit is undone by putting back their prior values."""

    edit_id: str
    parameters: dict[str, torch.Tensor]


@register_adapter_kind
class DeferAdapter(AdapterLayer):
    """The wrapped layer plus ``gate`` (d_in -> 1) and ``value_net`` (d_in -> d_out)."""

    kind = "DEFER"

    def __init__(self, original: nn.Module, path: str, threshold: float = 0.5) -> None:
        super().__init__(original, path)
        factory = {"device": self.weight_device, "dtype": self.weight_dtype}
        self.gate = nn.Linear(self.in_features, 1, **factory)
        self.value_net = nn.Linear(self.in_features, self.out_features, **factory)
        self.gate.requires_grad_(False)
        self.value_net.requires_grad_(False)
        self.threshold = threshold
        self._soft = False  # True only inside the method's own training loop

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {f"gate.{n}": p for n, p in self.gate.named_parameters()} | {
            f"value_net.{n}": p for n, p in self.value_net.named_parameters()
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)
        if not self.edit_log and not self._soft:
            return out
        squeeze = x.dim() == 2
        if squeeze:
            x, out = x[None], out[None]
        query = x[:, -1]
        gate = torch.sigmoid(self.gate(query))[:, None, :]  # (batch, 1, 1)
        value = self.value_net(query)[:, None, :]  # (batch, 1, d_out), the same for every position
        if self._soft:
            out = gate * value + (1 - gate) * out
        else:
            out = torch.where(gate >= self.threshold, value.expand_as(out), out)
        return out[0] if squeeze else out

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's value per sequence of a (batch, length, d_in) input: for inspection and reports."""
        with torch.no_grad():
            return torch.sigmoid(self.gate(x[:, -1]))[:, 0]

    def undo(self, record: DeferUndo) -> None:
        if record.edit_id not in self.edit_log:
            return
        params = self.adapter_parameters()
        with torch.no_grad():
            for name, tensor in record.parameters.items():
                params[name].copy_(tensor)
        self.edit_log.remove(record.edit_id)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.adapter_parameters())

    def state_meta(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.threshold = float(meta["threshold"])
        params = self.adapter_parameters()
        if set(tensors) != set(params):
            raise AdapterError(f"saved DEFER state holds {sorted(tensors)}, expected {sorted(params)}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name]))


def defer_kept_state(model: nn.Module, hparams: DeferHyperParams, edits: int) -> tuple[int, str, str]:
    """Each edit's undo record holds the gate and value network as they were (DEFER re-fits them every edit)."""
    path, d_in, d_out, value_bytes = site_sizes(model, hparams)
    per_edit = value_bytes * (d_in + 1 + d_in * d_out + d_out)
    return (edits * per_edit, f"a copy of its gate and value network at {path} ({size(per_edit)}) per edit "
            "for its undo record", "run on a machine with more memory")


@register("DEFER", hparams=DeferHyperParams, batch=True, packed_evaluation=False, cached_generation=False,
          generation_scored=True, load_edit=load_adapter_edit, kept_state=defer_kept_state,
          tiny_setup=lambda model, tok, workdir: {"layer": -1, "n_iter": 40, "edit_lr": 1e-2})
def apply_defer(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: DeferHyperParams) -> AdapterEditHandle:
    """DEFER: a learned gate and value network on one layer's last-token input (GRACE's baseline)."""
    path = hparams.site_path(model)
    adapter = ensure_adapter(model, path, DeferAdapter, lambda original: DeferAdapter(original, path, hparams.threshold))
    if adapter.threshold != hparams.threshold:
        raise AdapterError(
            f"the DEFER adapter at {path!r} uses threshold {adapter.threshold}; a later edit cannot change it "
            f"to {hparams.threshold} (restore the earlier edits first)"
        )
    edit_ids, records, losses = [], [], []
    started = time.perf_counter()
    try:
        for request in requests:
            record = DeferUndo(adapter.new_edit_id(request.case_id),
                               {n: p.detach().clone() for n, p in adapter.adapter_parameters().items()})
            adapter.edit_log.append(record.edit_id)
            records.append(record)
            edit_ids.append(record.edit_id)
            losses = _train(model, tok, adapter, request, hparams)
    except BaseException:
        for record in reversed(records):
            adapter.undo(record)
        if not adapter.edit_log:
            remove_adapter(model, adapter)
        raise
    handle = AdapterEditHandle("DEFER", model, adapter, edit_ids, records)
    handle.info = {"seconds": time.perf_counter() - started, "losses": losses, "edit_ids": edit_ids}
    return handle


def _train(model: nn.Module, tok: Any, adapter: DeferAdapter, request: EditRequest, hparams: DeferHyperParams) -> list[float]:
    """``n_iter`` Adam steps of gate and value network on the target tokens, with soft mixing."""
    pair = tokenize_pair(tok, request.prompt, request.target_new)
    params = list(adapter.adapter_parameters().values())
    losses: list[float] = []
    with frozen_model(model):
        for p in params:
            p.requires_grad_(True)
        adapter._soft = True
        try:
            logits_of = SequenceLogits(model, adapter.path, [pair.ids], [range(pair.prompt_len - 1, len(pair.ids) - 1)])
            optimizer = MasterAdam(params, lr=hparams.edit_lr)
            for _ in range(hparams.n_iter):
                loss = target_nll(logits_of(), pair.target_ids)
                optimizer.zero_grad()
                optimizer.backward(loss)
                optimizer.step()
                losses.append(loss.item())
        finally:
            adapter._soft = False
            for p in params:
                p.requires_grad_(False)
                p.grad = None
    return losses
