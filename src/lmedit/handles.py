"""Edit handles: what ``apply`` returns, and the only way an edit is undone.

Every method returns an :class:`EditHandle`. Restoring it must give back the
model bit for bit; for in-place weight edits that is guaranteed by keeping
exact copies of the parameters the method touched (never by re-deriving
them, which would accumulate rounding error across sequential edits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

EDIT_FORMAT_VERSION = 1
WEIGHT_EDIT_FORMAT = "lmedit-weight-edit"


class EditHandleError(RuntimeError):
    """An edit handle was used wrongly (restored twice, loaded onto the wrong model, ...)."""


class EditHandle:
    """Base class. ``info`` carries what a method wants to report (losses, steps, seconds)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.info: dict[str, Any] = {}
        self._restored = False

    @property
    def restored(self) -> bool:
        return self._restored

    def restore(self) -> None:
        """Return the model to exactly its state before this edit."""
        if self._restored:
            raise EditHandleError(f"this {self.method} edit was already restored")
        self._restore()
        self._restored = True

    def _restore(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the edit so that :func:`lmedit.registry.load_edit` can re-apply it to a fresh copy of the model."""
        raise NotImplementedError(f"{self.method} edits cannot be saved yet")


class WeightSnapshotHandle(EditHandle):
    """For methods that change parameters in place: keeps exact copies of the originals."""

    def __init__(self, method: str, model: torch.nn.Module, param_names: Iterable[str]) -> None:
        super().__init__(method)
        self.model = model
        params = dict(model.named_parameters())
        names = list(dict.fromkeys(param_names))
        missing = [n for n in names if n not in params]
        if missing:
            raise EditHandleError(f"{method}: the model has no parameter(s) {missing}")
        self._originals = {n: params[n].detach().clone() for n in names}

    @property
    def param_names(self) -> list[str]:
        return list(self._originals)

    def _restore(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self._originals.items():
                params[name].copy_(original)

    def originals(self) -> dict[str, torch.Tensor]:
        """The exact values of the touched parameters before this edit (the stored copies: do not modify them)."""
        return dict(self._originals)

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of the change of each touched parameter (useful for reports)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            return {n: float((params[n] - o).norm()) for n, o in self._originals.items()}

    def save(self, path: str | Path) -> Path:
        """Store the edited values of the touched parameters (safetensors + a JSON sidecar, no pickle)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        params = dict(self.model.named_parameters())
        tensors = {n: params[n].detach().contiguous().clone() for n in self._originals}
        save_file(tensors, str(path / "edit.safetensors"))
        meta = {
            "format": WEIGHT_EDIT_FORMAT,
            "version": EDIT_FORMAT_VERSION,
            "method": self.method,
            "parameters": {n: list(t.shape) for n, t in tensors.items()},
            "info": _jsonable(self.info),
        }
        (path / "edit.json").write_text(json.dumps(meta, indent=2))
        return path


def load_weight_edit(model: torch.nn.Module, path: str | Path, meta: dict[str, Any]) -> EditHandle:
    """Re-apply a saved weight edit (``edit.safetensors``); the handle restores the model's own weights."""
    path = Path(path)
    tensors = load_file(str(path / "edit.safetensors"))
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params or tuple(params[name].shape) != tuple(tensor.shape):
            raise EditHandleError(
                f"saved edit touches {name} with shape {tuple(tensor.shape)}, which this model does not have; "
                "load it onto the same model it was made on"
            )
    handle = WeightSnapshotHandle(meta["method"], model, tensors)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    handle.info = dict(meta.get("info", {}))
    return handle


def restore_all(handles: list[EditHandle]) -> None:
    """Undo a chain of edits, newest first, so each handle sees the state it was created on."""
    for handle in reversed(handles):
        if not handle.restored:
            handle.restore()


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)
