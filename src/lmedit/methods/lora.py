"""LoRA editing (EasyEdit's ``models/lora``), through ``peft``.

Low-rank adapters ``W + (alpha / r) · B A`` are injected, in place, into the
chosen modules (``target_modules``) of the chosen layers (``layers``; empty
means every layer) of the given model object, with ``peft``'s
``inject_adapter_in_model``; only A and B are trained, with Adam for
``num_steps`` passes over the requests, on the cross-entropy of the target
tokens of ``prompt + " " + target_new`` with the prompt masked (the mean over
every target token of a batch, as the Hugging Face loss EasyEdit uses). The
adapter is never merged.

Sequential edits keep training the same adapter (as EasyEdit's sequential
mode does, with a fresh optimiser per edit). Each handle keeps a copy of the
adapter's weights from before its edit, so restoring handles newest first is
exact; the last restore removes peft entirely: the original module objects go
back in place, the ``peft_config`` attribute goes, and every parameter's
``requires_grad`` flag is as before, so the model's ``state_dict``, classes
and modules are exactly those of the unedited model.

``lora_type: adalora`` trains what EasyEdit's default LoRA trains (its KnowEdit
"AdaLoRA" column): peft's AdaLoRA layers, an SVD-form adapter ``P Λ Q`` scaled by
``alpha / r``, with AdaLoRA's orthogonality penalty on P and Q added to the loss
(``orth_reg_weight``, peft's 0.5). EasyEdit never calls AdaLoRA's rank
allocation, so the rank stays fixed; lmedit does the same.

Where this differs from EasyEdit (docs/memory-and-peft.md): the adapter's rank
is ``rank`` for both types (EasyEdit's AdaLoRA takes peft's ``init_r``, 12,
whatever its ``rank`` says); the model stays in
eval mode while training (no dropout in the base model; LoRA's own dropout,
0 by default, is the only one switched on); optional early stopping.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmedit.forward import TokenizedPair, block_of, forward_tail, last_columns_logits, pad_id_of, tokenize_pair
from lmedit.handles import EDIT_FORMAT_VERSION, EditHandle, EditHandleError
from lmedit import model_state
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.precision import MasterAdam
from lmedit.registry import register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, ModelSpecError

LORA_FORMAT = "lmedit-lora"
ADAPTER_NAME = "lmedit"


@dataclass
class LoRAHyperParams(HyperParams):
    """EasyEdit's LoRA fields that the algorithm reads; ``orth_reg_weight`` is AdaLoRA's only."""

    lora_type: Literal["lora", "adalora"] = "lora"
    layers: list[int] = field(default_factory=list)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    num_steps: int = 70
    lr: float = 5e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    early_stop_loss: float | None = None
    orth_reg_weight: float = 0.5

    def validate(self) -> None:
        if self.orth_reg_weight < 0:
            raise HyperParamsError("orth_reg_weight must be non-negative (AdaLoRA's penalty weight; peft uses 0.5)")
        if self.rank < 1:
            raise HyperParamsError("rank must be at least 1")
        if not self.target_modules:
            raise HyperParamsError("target_modules must name at least one module, e.g. [q_proj, v_proj]")
        if self.num_steps < 1 or self.batch_size < 1:
            raise HyperParamsError("num_steps and batch_size must be at least 1")
        if self.lr <= 0:
            raise HyperParamsError("lr must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise HyperParamsError("lora_dropout must lie in [0, 1)")
        if any(layer < 0 for layer in self.layers):
            raise HyperParamsError(f"layers must be non-negative block indices, got {self.layers}")

    def adapter_config(self) -> dict[str, Any]:
        """The fields that define the adapter's shape; sequential edits must agree on them."""
        return {"lora_type": self.lora_type, "layers": sorted(self.layers), "target_modules": sorted(self.target_modules),
                "rank": self.rank, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout}


# --------------------------------------------------------------------------- the injected adapter


@dataclass
class LoraSession:
    """What the adapter changed on one model object, to undo it; holds no reference to the model."""

    config: dict[str, Any]
    requires_grad: dict[str, bool]
    had_peft_config: bool
    spec: ModelSpec | None = None  # the architecture map, read before injection (paths only)
    live: list[int] = field(default_factory=list)  # ids of the handles not yet restored, oldest first
    next_id: int = 0


_OWNER = "lora"  # this module's slot in lmedit.model_state


def session_of(model: nn.Module) -> LoraSession | None:
    return model_state.slot(model, _OWNER)


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise HyperParamsError("LoRA editing needs peft; run `pip install 'peft>=0.13'`") from None
    return peft


def inject(model: nn.Module, config: dict[str, Any]) -> LoraSession:
    """Insert freshly initialised LoRA layers into ``model`` in place and remember how to take them out."""
    peft = _peft()
    if hasattr(model, "peft_config"):
        raise HyperParamsError(
            "the model already carries peft adapters of its own; LoRA editing injects and later removes its own "
            "adapter, so merge or unload the existing ones first"
        )
    layers = config["layers"]
    shared = dict(lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                  target_modules=list(config["target_modules"]), layers_to_transform=list(layers) if layers else None,
                  bias="none", fan_in_fan_out=_targets_conv1d(model, config["target_modules"]))
    if config.get("lora_type", "lora") == "adalora":
        # the rank stays at init_r: nothing calls AdaLoRA's update_and_allocate, as in EasyEdit
        lora_config = peft.AdaLoraConfig(init_r=config["rank"], target_r=config["rank"], total_step=1, **shared)
    else:
        lora_config = peft.LoraConfig(r=config["rank"], **shared)
    try:
        spec: ModelSpec | None = ModelSpec.from_model(model)
    except ModelSpecError:
        spec = None  # training then runs full forward passes
    session = LoraSession(dict(config), {n: p.requires_grad for n, p in model.named_parameters()},
                          hasattr(model, "peft_config"), spec)
    try:
        peft.inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        _unload(model, session)
        raise HyperParamsError(
            f"LoRA: target_modules {config['target_modules']} at layers {layers or 'all'} match nothing in this model "
            f"({exc}); name the projection modules, e.g. q_proj/v_proj (Llama) or c_attn (GPT-2)"
        ) from None
    if not lora_parameters(model):
        _unload(model, session)
        raise HyperParamsError(f"LoRA: no module matched target_modules {config['target_modules']} at layers {layers}")
    model_state.put(model, _OWNER, session)
    return session


def _targets_conv1d(model: nn.Module, targets: Sequence[str]) -> bool:
    """GPT-2's projections are ``Conv1D`` (weights stored transposed); peft must be told so."""
    return any(type(m).__name__ == "Conv1D" for name, m in model.named_modules() if name.rpartition(".")[2] in targets)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's trained tensors by their names in ``model``: A and B, and AdaLoRA's singular values E."""
    return {n: p for n, p in model.named_parameters()
            if f".lora_A.{ADAPTER_NAME}" in n or f".lora_B.{ADAPTER_NAME}" in n or f".lora_E.{ADAPTER_NAME}" in n}


def orthogonality_penalty(adapter: nn.Module | dict[str, nn.Parameter]) -> torch.Tensor | None:
    """AdaLoRA's regulariser: the mean over P and Q matrices of ‖P Pᵀ − I‖_F (rows of A) and ‖QᵀQ − I‖_F (columns
    of B); None for plain LoRA, which has no E. Takes the model or its :func:`lora_parameters`."""
    params = lora_parameters(adapter) if isinstance(adapter, nn.Module) else adapter
    if not any(".lora_E." in n for n in params):
        return None
    terms = []
    for name, p in params.items():
        if ".lora_A." in name or ".lora_B." in name:
            gram = p @ p.T if ".lora_A." in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                    device=gram.device)))
    return torch.stack(terms).mean()


def _unload(model: nn.Module, session: LoraSession) -> None:
    """Put every wrapped module's original object back, drop peft's attribute, restore the gradient flags."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if not session.had_peft_config and hasattr(model, "peft_config"):
        del model.peft_config
    for name, param in model.named_parameters():
        if name in session.requires_grad:
            param.requires_grad_(session.requires_grad[name])
    model_state.drop(model, _OWNER)


# --------------------------------------------------------------------------- the method


def apply_lora(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: LoRAHyperParams) -> "LoRAEditHandle":
    """Train a LoRA adapter (peft) on the target tokens with the prompt masked; never merged (EasyEdit's LoRA)."""
    session = session_of(model)
    config = hparams.adapter_config()
    if session is None:
        session = inject(model, config)
        before: dict[str, torch.Tensor] | None = None  # restoring the first edit removes the adapter
    else:
        if session.config != config:
            raise HyperParamsError(
                f"the model already holds a LoRA adapter {session.config}; this edit asks for {config}. "
                "Restore the earlier LoRA edits first, or edit with the same adapter settings"
            )
        before = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    handle = LoRAEditHandle(model, session, before)
    started = time.perf_counter()
    losses = _train(model, tok, requests, hparams, session)
    handle.info = {"losses": losses, "steps": len(losses), "seconds": time.perf_counter() - started,
                   "lora_parameters": sum(p.numel() for p in lora_parameters(model).values())}
    return handle


def _train(
    model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: LoRAHyperParams, session: LoraSession
) -> list[float]:
    examples = [tokenize_pair(tok, r.prompt, r.target_new) for r in requests]
    named = lora_parameters(model)
    params = list(named.values())
    pad_id = pad_id_of(tok)
    spec, first = session.spec, _first_adapted_block(model, session.spec)
    batches = [examples[start : start + hparams.batch_size] for start in range(0, len(examples), hparams.batch_size)]
    was_training = model.training
    model.eval()
    dropouts = [m for n, m in model.named_modules() if n.endswith(f"lora_dropout.{ADAPTER_NAME}")]
    for module in dropouts:
        module.train(True)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = MasterAdam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
    losses: list[float] = []
    try:
        # blocks below the first adapted one never change: computed once per batch (lmedit.forward.partial)
        batch_logits = [_last_columns(model, spec, first, batch, pad_id) for batch in batches]
        for _ in range(hparams.num_steps):
            total, tokens = 0.0, 0
            for batch, logits_of in zip(batches, batch_logits):
                loss, count = target_token_loss(logits_of(), batch)
                penalty = orthogonality_penalty(named)
                if penalty is not None:  # added to the loss, as AdaLoRA's model does; the recorded loss is the NLL
                    nll, loss = loss, loss + hparams.orth_reg_weight * penalty
                else:
                    nll = loss
                optimizer.zero_grad()
                optimizer.backward(loss)
                optimizer.step()
                total, tokens = total + nll.item() * count, tokens + count
            losses.append(total / tokens)
            if hparams.early_stop_loss is not None and losses[-1] < hparams.early_stop_loss:
                break
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
        for module in dropouts:
            module.train(False)
        model.train(was_training)
    return losses


def _first_adapted_block(model: nn.Module, spec: ModelSpec | None) -> int:
    """The lowest block holding a LoRA layer (0 when unknown: full forward passes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if spec is None:
        return 0
    blocks = [block_of(spec, name) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return 0 if not blocks or any(b is None for b in blocks) else min(b for b in blocks if b is not None)


def _last_columns(model: nn.Module, spec: ModelSpec | None, first: int, batch: Sequence[TokenizedPair], pad_id: int) -> Any:
    longest = max(len(e.target_ids) for e in batch)
    sequences = [e.ids for e in batch]
    if spec is None:
        return lambda: forward_tail(model, sequences, pad_id, longest + 1)
    return last_columns_logits(model, spec, first, sequences, pad_id, longest + 1)


def target_token_loss(logits: torch.Tensor, batch: Sequence[TokenizedPair]) -> tuple[torch.Tensor, int]:
    """Mean NLL over every target token of the batch (the prompt masked), and how many tokens that is.

    ``logits`` are the last ``longest target + 1`` columns of the left-padded batch.
    """
    longest = logits.shape[1] - 1
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # column j predicts the token in column j+1
    picked = []
    for row, example in enumerate(batch):
        n = len(example.target_ids)
        target = torch.tensor(example.target_ids, device=logprobs.device)
        picked.append(logprobs[row, longest - n :].gather(1, target[:, None]).squeeze(1))
    values = torch.cat(picked)
    return -values.mean(), int(values.numel())


# --------------------------------------------------------------------------- handles, save and load


class LoRAEditHandle(EditHandle):
    """Puts the adapter back to its weights before this edit; the first edit's restore removes peft entirely."""

    def __init__(self, model: nn.Module, session: LoraSession, before: dict[str, torch.Tensor] | None) -> None:
        super().__init__("LoRA")
        self.model = model
        self.session = session
        self._before = before
        self._id = session.next_id
        session.next_id += 1
        session.live.append(self._id)

    def _restore(self) -> None:
        session = self.session
        if session_of(self.model) is not session:
            raise EditHandleError("the LoRA adapter of this edit is no longer in the model")
        if session.live[-1] != self._id:
            raise EditHandleError(
                "LoRA edits share one adapter and restore exactly only newest first; restore the later LoRA "
                "edits first (restore_all does)"
            )
        session.live.pop()
        if self._before is None:
            if session.live:
                raise EditHandleError("internal: the adapter's first edit was restored while later ones remain")
            _unload(self.model, session)
            return
        params = lora_parameters(self.model)
        with torch.no_grad():
            for name, value in self._before.items():
                params[name].copy_(value)

    def save(self, path: str | Path) -> Path:
        """The adapter as it is now (every LoRA edit it holds): ``edit.safetensors`` + ``edit.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().clone() for n, p in lora_parameters(self.model).items()}
        save_file(tensors, str(path / "edit.safetensors"))
        meta = {
            "format": LORA_FORMAT,
            "version": EDIT_FORMAT_VERSION,
            "method": "LoRA",
            "adapter": self.session.config,
            "tensors": {n: list(t.shape) for n, t in tensors.items()},
            "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }
        (path / "edit.json").write_text(json.dumps(meta, indent=2))
        return path


def load_lora_edit(model: nn.Module, path: Path, meta: dict[str, Any]) -> LoRAEditHandle:
    """Inject the saved adapter into ``model`` and load its weights; restoring the handle removes it."""
    if session_of(model) is not None:
        raise EditHandleError("the model already holds a LoRA adapter; restore its edits before loading another")
    session = inject(model, dict(meta["adapter"]))
    tensors = load_file(str(path / "edit.safetensors"))
    params = lora_parameters(model)
    if set(tensors) != set(params) or any(tuple(params[n].shape) != tuple(t.shape) for n, t in tensors.items()):
        _unload(model, session)
        raise EditHandleError(
            f"{path} holds a LoRA adapter for other modules or shapes than this model gets from {meta['adapter']}; "
            "load it onto the same model it was made on"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    handle = LoRAEditHandle(model, session, None)
    handle.info = dict(meta.get("info", {}))
    return handle


def tiny_setup(model: nn.Module, tok: Any, workdir: Path) -> dict[str, Any]:
    """LoRA on a tiny random model: the top layer's MLP output projection, whatever its layout calls it."""
    spec = ModelSpec.from_model(model)
    top = spec.num_layers - 1
    return {"layers": [top], "target_modules": [spec.mlp_out(top).rsplit(".", 1)[-1]], "rank": 4, "lora_alpha": 8,
            "lr": 5e-2, "num_steps": 40}


register("LoRA", hparams=LoRAHyperParams, batch=True, load_edit=load_lora_edit, tiny_setup=tiny_setup)(apply_lora)


@dataclass
class AdaLoRAHyperParams(LoRAHyperParams):
    """LoRA's fields with ``lora_type: adalora``, EasyEdit's default, under the name KnowEdit's table gives it."""

    lora_type: Literal["lora", "adalora"] = "adalora"


@register("AdaLoRA", hparams=AdaLoRAHyperParams, batch=True, load_edit=load_lora_edit, tiny_setup=tiny_setup)
def apply_adalora(model: nn.Module, tok: Any, requests: Sequence[EditRequest],
                  hparams: AdaLoRAHyperParams) -> "LoRAEditHandle":
    """Train an AdaLoRA adapter (SVD form, orthogonality penalty, fixed rank): EasyEdit's default LoRA."""
    return apply_lora(model, tok, requests, hparams)
