"""Stateful adapters: edits that wrap one linear module and keep their own memory.

GRACE, DEFER and WISE do not change weights in place. They replace one
module (an MLP down-projection: ``layer`` and ``module`` of :class:`AdapterSite`) with an adapter
that holds the original module plus the method's state, and that state
grows with every sequential edit. This module gives them one base so that
the framework's contract holds for all of them:

* the first edit inserts the adapter, later edits find it and add to it;
* every edit returns a handle whose ``restore()`` undoes exactly that edit;
  undoing the last edit puts the original module object back in place;
* ``handle.save(path)`` writes the adapter's state as safetensors plus a
  JSON sidecar (no pickle), and :func:`lmedit.registry.load_edit` re-inserts
  it into a fresh copy of the model;
* an evaluation forward pass never changes the state: training behaviour is
  switched on only inside the method's own edit context, never by
  ``module.train()``, and nothing is merged, counted or cached on a forward.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmedit.handles import EDIT_FORMAT_VERSION, EditHandle, EditHandleError
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.forward import UpperForward, block_of, build_inputs
from lmedit.spec import ModelSpec, ModelSpecError, get_module, in_out_features, is_linear_like, set_module
from lmedit.forward.head_loss import head_weighted_nll, weighted_nll

ADAPTER_FORMAT = "lmedit-adapter"

A = TypeVar("A", bound="AdapterLayer")


class AdapterError(ValueError):
    """An adapter was asked for something it cannot do; the message says what to do instead."""


# --------------------------------------------------------------------------- module paths


def module_path(inner_param: str) -> str:
    """The dotted module path of an ``inner_params`` entry.

    Accepts EasyEdit's spelling ``model.layers[27].mlp.down_proj.weight`` as
    well as ``model.layers.27.mlp.down_proj(.weight)``.
    """
    path = re.sub(r"\[(\d+)\]", r".\1", inner_param.strip())
    for suffix in (".weight", ".bias"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return path.strip(".")


# Module roles an adapter can wrap, resolved per architecture by ModelSpec.
ADAPTER_ROLES: dict[str, Callable[[ModelSpec, int], str]] = {
    "mlp_out": ModelSpec.mlp_out,  # the MLP down-projection (intermediate -> hidden)
    "attn_out": ModelSpec.attn_out,  # the attention output projection
}


@dataclass
class AdapterSite(HyperParams):
    """Where an adapter method edits: a layer and a module role, resolved through :class:`ModelSpec`.

    ``layer: 27`` with ``module: mlp_out`` names Llama's ``model.layers.27.mlp.down_proj``
    and GPT-2's ``transformer.h.27.mlp.c_proj`` alike; a negative layer counts from
    the top. EasyEdit's ``inner_params`` (one parameter path) is accepted as an
    alias and, when given, overrides ``layer``/``module``.
    """

    layer: int | None = None
    module: str = "mlp_out"
    inner_params: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.module not in ADAPTER_ROLES:
            raise HyperParamsError(f"module must be one of {', '.join(ADAPTER_ROLES)}, got {self.module!r}")
        if self.inner_params:
            if len(self.inner_params) != 1:
                raise HyperParamsError(f"inner_params must name exactly one module, got {self.inner_params}")
            self.layer = None  # the alias wins; the config then shows what was edited

    def site_path(self, model: nn.Module) -> str:
        """The dotted path of the module to wrap in ``model`` (asked before any model time is spent)."""
        if self.inner_params:
            return module_path(self.inner_params[0])
        if self.layer is None:
            raise HyperParamsError(
                "say which layer to edit: layer: 27 (with module: mlp_out, the MLP down-projection), "
                "or EasyEdit's inner_params: [model.layers[27].mlp.down_proj.weight]"
            )
        spec = ModelSpec.from_model(model)  # adapters already in the model are read through
        try:
            return ADAPTER_ROLES[self.module](spec, int(self.layer))
        except IndexError as exc:
            raise AdapterError(f"layer {self.layer}: {exc}; choose a layer in 0..{spec.num_layers - 1} "
                               "(or a negative index from the top)") from None


def site_layer(model: nn.Module, site: AdapterSite) -> tuple[str, nn.Module]:
    """The path and the original linear layer an adapter method edits (seen through an adapter already there)."""
    path = site.site_path(model)
    module = get_module(model, path)
    return path, getattr(module, "original", module) if isinstance(module, AdapterLayer) else module


def site_sizes(model: nn.Module, site: AdapterSite) -> tuple[str, int, int, int]:
    """``(path, in_features, out_features, bytes per weight value)`` of the layer ``site`` names (for memory estimates)."""
    path, layer = site_layer(model, site)
    d_in, d_out = in_out_features(layer)
    return path, d_in, d_out, layer.weight.element_size()


# --------------------------------------------------------------------------- the adapter base


class AdapterLayer(nn.Module):
    """A linear-like module wrapped with a method's state; subclasses define ``forward`` and the state.

    ``edit_log`` lists the ids of the edits the adapter currently holds,
    oldest first; an adapter whose log is empty is removed from the model.
    """

    kind: ClassVar[str] = ""

    def __init__(self, original: nn.Module, path: str) -> None:
        super().__init__()
        if not is_linear_like(original):
            raise AdapterError(
                f"{self.kind} wraps a linear layer, but {path!r} is a {type(original).__name__}; "
                "choose module: mlp_out (or point inner_params at a projection such as model.layers[27].mlp.down_proj.weight)"
            )
        self.original = original
        self.path = path
        self.in_features, self.out_features = in_out_features(original)
        self.edit_log: list[str] = []
        self.edits_made = 0

    @property
    def wrapped_module(self) -> nn.Module:
        """The layer this adapter stands in for (how `ModelSpec` reads the model's own layout)."""
        return self.original

    @property
    def weight_device(self) -> torch.device:
        return self.original.weight.device

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.original.weight.dtype

    def new_edit_id(self, case_id: str | None) -> str:
        """The request's case id when it is still free in this adapter, else ``edit-<n>``."""
        self.edits_made += 1
        if case_id is not None and case_id not in self.edit_log:
            return str(case_id)
        candidate = f"edit-{self.edits_made}"
        while candidate in self.edit_log:
            self.edits_made += 1
            candidate = f"edit-{self.edits_made}"
        return candidate

    def require_newest(self, edit_ids: Sequence[str]) -> None:
        """Undo records are exact only newest first: refuse anything else with a way out."""
        live = [e for e in edit_ids if e in self.edit_log]
        if live and self.edit_log[-len(live):] != live:
            raise EditHandleError(
                f"{self.kind} edit(s) {live} are not the newest in the adapter (newest: {self.edit_log[-1]!r}); "
                "restore handles newest first (restore_all does), or remove one edit with its method's rollback"
            )

    # ---- what subclasses provide

    def undo(self, record: Any) -> None:  # pragma: no cover - abstract
        """Undo one edit from its record (taken by the method while editing)."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_meta(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def on_insert(self, model: nn.Module) -> None:
        """Called once the adapter sits in ``model`` (e.g. to watch the model's inputs); default: nothing."""

    def on_remove(self, model: nn.Module) -> None:
        """Called when the adapter leaves ``model``; undo whatever ``on_insert`` did."""

    def extra_repr(self) -> str:
        return f"path={self.path!r}, edits={len(self.edit_log)}"


_ADAPTER_KINDS: dict[str, type[AdapterLayer]] = {}


def register_adapter_kind(cls: type[A]) -> type[A]:
    """Class decorator: lets saved adapters of ``cls.kind`` be loaded."""
    if not cls.kind:
        raise AdapterError(f"{cls.__name__} must set a non-empty kind")
    _ADAPTER_KINDS[cls.kind] = cls
    return cls


def find_adapter(model: nn.Module, path: str) -> AdapterLayer | None:
    """The adapter sitting at ``path``, or None when the module there is a plain layer."""
    module = get_module(model, path)
    return module if isinstance(module, AdapterLayer) else None


def carries_adapter(model: nn.Module) -> bool:
    """Whether any lifelong-memory adapter (GRACE, DEFER, WISE, MELO, ...) is installed in ``model``."""
    return any(isinstance(module, AdapterLayer) for module in model.modules())


def adapters_of(model: nn.Module, kind: type[A]) -> list[A]:
    return [m for m in model.modules() if isinstance(m, kind)]


def ensure_adapter(model: nn.Module, path: str, kind: type[A], build: Callable[[nn.Module], A]) -> A:
    """Return the ``kind`` adapter at ``path``, inserting ``build(original)`` there on first use."""
    try:
        module = get_module(model, path)
    except ModelSpecError as exc:
        raise AdapterError(f"{kind.kind}: the model has no module {path!r} ({exc}); check layer/module or inner_params") from None
    if isinstance(module, kind):
        return module
    if isinstance(module, AdapterLayer):
        raise AdapterError(
            f"{path!r} already holds a {module.kind} adapter; restore those edits before editing the same module with {kind.kind}"
        )
    adapter = build(module)
    set_module(model, path, adapter)
    adapter.on_insert(model)
    return adapter


def remove_adapter(model: nn.Module, adapter: AdapterLayer) -> None:
    """Put the original module object back where the adapter was."""
    if find_adapter(model, adapter.path) is not adapter:
        raise EditHandleError(f"the {adapter.kind} adapter is no longer at {adapter.path!r}; nothing to remove")
    set_module(model, adapter.path, adapter.original)
    adapter.on_remove(model)


# --------------------------------------------------------------------------- handles


class AdapterEditHandle(EditHandle):
    """Undoes one apply call on an adapter (its records, newest first); removes the adapter when it is empty."""

    def __init__(self, method: str, model: nn.Module, adapter: AdapterLayer, edit_ids: list[str], records: list[Any]) -> None:
        super().__init__(method)
        self.model = model
        self.adapter = adapter
        self.edit_ids = list(edit_ids)
        self._records = list(records)

    def _restore(self) -> None:
        adapter = self.adapter
        if find_adapter(self.model, adapter.path) is not adapter:
            if any(e in adapter.edit_log for e in self.edit_ids):
                raise EditHandleError(f"the {adapter.kind} adapter holding {self.edit_ids} is no longer in the model")
            return  # already rolled back and removed
        adapter.require_newest(self.edit_ids)
        for record in reversed(self._records):
            adapter.undo(record)
        if not adapter.edit_log:
            remove_adapter(self.model, adapter)

    def save(self, path: str | Path) -> Path:
        """Write the adapter as it is now (every edit it holds) for :func:`lmedit.registry.load_edit`."""
        return save_adapter(self.adapter, path, self.method, self.info)


class LoadedAdapterHandle(EditHandle):
    """The handle of an adapter read from disk: restoring removes the whole adapter."""

    def __init__(self, method: str, model: nn.Module, adapter: AdapterLayer) -> None:
        super().__init__(method)
        self.model = model
        self.adapter = adapter
        self.edit_ids = list(adapter.edit_log)

    def _restore(self) -> None:
        if find_adapter(self.model, self.adapter.path) is self.adapter:
            remove_adapter(self.model, self.adapter)

    def save(self, path: str | Path) -> Path:
        return save_adapter(self.adapter, path, self.method, self.info)


# --------------------------------------------------------------------------- save / load


def save_adapter(adapter: AdapterLayer, path: str | Path, method: str, info: dict[str, Any] | None = None) -> Path:
    """``edit.safetensors`` (the state tensors) and ``edit.json`` (everything else), no pickle."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in adapter.state_tensors().items()}
    save_file(tensors, str(path / "edit.safetensors"))
    meta = {
        "format": ADAPTER_FORMAT,
        "version": EDIT_FORMAT_VERSION,
        "method": method,
        "kind": adapter.kind,
        "module_path": adapter.path,
        "in_features": adapter.in_features,
        "out_features": adapter.out_features,
        "edit_log": list(adapter.edit_log),
        "edits_made": adapter.edits_made,
        "state": adapter.state_meta(),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "info": _jsonable(info or {}),
    }
    (path / "edit.json").write_text(json.dumps(meta, indent=2))
    return path


def load_adapter_edit(model: nn.Module, path: Path, meta: dict[str, Any]) -> LoadedAdapterHandle:
    """Re-insert a saved adapter into ``model`` (GRACE, DEFER and WISE register it as their ``load_edit``)."""
    kind = _ADAPTER_KINDS.get(meta.get("kind", ""))
    if kind is None:
        raise EditHandleError(f"{path}: unknown adapter kind {meta.get('kind')!r}; known: {sorted(_ADAPTER_KINDS)}")
    target = meta["module_path"]
    try:
        module = get_module(model, target)
    except ModelSpecError:
        raise EditHandleError(f"saved {kind.kind} edit wraps {target!r}, which this model does not have; "
                              "load it onto the same model it was made on") from None
    if isinstance(module, AdapterLayer):
        raise EditHandleError(f"{target!r} already holds a {module.kind} adapter; restore it before loading another")
    if not is_linear_like(module) or in_out_features(module) != (meta["in_features"], meta["out_features"]):
        raise EditHandleError(
            f"saved {kind.kind} edit wraps a {meta['in_features']} -> {meta['out_features']} layer at {target!r}, "
            "which this model does not have; load it onto the same model it was made on"
        )
    tensors = load_file(str(path / "edit.safetensors"))
    adapter = kind(module, target)
    adapter.load_state(tensors, meta["state"])
    adapter.edit_log = list(meta["edit_log"])
    adapter.edits_made = int(meta["edits_made"])
    set_module(model, target, adapter)
    adapter.on_insert(model)
    handle = LoadedAdapterHandle(meta["method"], model, adapter)
    handle.info = dict(meta.get("info", {}))
    return handle




def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


# --------------------------------------------------------------------------- training helpers


@contextmanager
def frozen_model(model: nn.Module) -> Iterator[None]:
    """No model parameter collects gradients while an adapter trains; flags and .grad come back as they were."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


class SequenceLogits:
    """Logits of a few token sequences at chosen columns, for an adapter's training loop.

    The sequences are left-padded into one batch (position ids restart
    after the padding, as in evaluation). The blocks below the adapter do not
    depend on what the adapter learns, so after one full pass only the
    blocks from the adapter's block upward are rerun (a tenth of the model
    for layer 27 of 30), and the LM head runs only at the columns read. That
    shortcut is checked against the full forward once and dropped if the two
    differ (a model that does something the shortcut misses).
    """

    def __init__(
        self, model: nn.Module, adapter_path: str, sequences: Sequence[Sequence[int]],
        columns: Sequence[Sequence[int]], pad_id: int = 0,
    ) -> None:
        self.model = model
        device = next(model.parameters()).device
        inputs = build_inputs([[i] for i in range(len(sequences))], sequences, pad_id, torch.float32)
        self.input_ids = inputs.input_ids.to(device)
        self.attention_mask = inputs.attention_mask.to(device)
        self.position_ids = inputs.position_ids.to(device)
        width = self.input_ids.shape[1]
        flat = [row * width + inputs.starts[row][1] + c for row, cols in enumerate(columns) for c in cols]
        self.flat = torch.tensor(flat, dtype=torch.long, device=device)
        self._tail: Callable[[], torch.Tensor] | None = None
        try:
            self._tail = self._prepare_tail(adapter_path)
        except (ModelSpecError, AttributeError, TypeError, IndexError, RuntimeError, ValueError):
            self._tail = None

    @property
    def valid(self) -> torch.Tensor:
        """(rows, width) bool: which columns hold real tokens (not left padding)."""
        return self.attention_mask.bool()

    def __call__(self) -> torch.Tensor:
        """Float logits, shape (number of columns read, vocab), rows in order."""
        if self._tail is not None:
            return self._tail()
        return self._full()

    def weighted_nll(self, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights_i * NLL of ``targets_i`` at the i-th column read.

        With the shortcut the LM head is streamed (:mod:`lmedit.forward.head_loss`):
        no (columns, vocab) logit matrix is built, which is most of a step's
        cost when the loop reruns only the top blocks.
        """
        if self._tail is not None:
            return head_weighted_nll(self._tail.head_input(), self._tail.head, targets, weights)
        return weighted_nll(self._full(), targets, weights)

    def run_adapter_block(self) -> None:
        """Run the rows through the adapter's block and no further, for what the adapter records on the way
        (WISE's Δ of a row whose logits are never read); the whole model without the shortcut."""
        if self._tail is not None:
            self._tail.run_blocks(1)
        else:
            self._full()

    @property
    def uses_shortcut(self) -> bool:
        return self._tail is not None

    def _full(self) -> torch.Tensor:
        logits = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask,
                            position_ids=self.position_ids, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, self.flat).float()

    def _prepare_tail(self, adapter_path: str) -> Callable[[], torch.Tensor] | None:
        spec = ModelSpec.from_model(self.model)
        block = block_of(spec, adapter_path)
        if block is None:
            return None
        return UpperForward.prepare(self.model, spec, block, self.flat, input_ids=self.input_ids,
                                    attention_mask=self.attention_mask, position_ids=self.position_ids)


def target_nll(logits: torch.Tensor, target_ids: Sequence[int]) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens; row i of ``logits`` predicts ``target_ids[i]``."""
    target = torch.tensor(list(target_ids), dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits, target)
