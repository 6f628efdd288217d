"""Edit handles: what ``apply`` returns, and the only way an edit is undone.

Every method returns an :class:`EditHandle`. Restoring it must give back the
model bit for bit; for in-place weight edits that is guaranteed by keeping
exact copies of the parameters the method touched (never by re-deriving
them, which would accumulate rounding error across sequential edits).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmedit.safe_files import atomic_write_json, file_sha256
from lmedit.spec import held_by_wrapper

LOG = logging.getLogger(__name__)

EDIT_FORMAT_VERSION = 1
WEIGHT_EDIT_FORMAT = "lmedit-weight-edit"


def _stamping(save: Callable[..., Any]) -> Callable[..., Any]:
    """``save`` followed by :func:`stamp_saved_edit` on the folder it wrote (the handle's ``model`` recorded)."""

    @functools.wraps(save)
    def save_and_stamp(self: EditHandle, path: str | Path) -> Any:
        written = save(self, path)
        model = getattr(self, "model", None)
        if model is not None:
            stamp_saved_edit(Path(written if written is not None else path), model)
        return written

    save_and_stamp._stamps_model = True  # type: ignore[attr-defined]
    return save_and_stamp


class EditHandleError(RuntimeError):
    """An edit handle was used wrongly (restored twice, loaded onto the wrong model, ...)."""


class EditHandle:
    """Base class. ``info`` carries what a method wants to report (losses, steps, seconds).

    ``touches_model`` False: the handle restores state kept beside the model, never its weights or modules
    (a chunk checkpoint's session state), so it does not stop a chain from sharing weight copies.
    """

    touches_model = True

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every ``save`` a handle class defines also records the model and the bytes it wrote (see stamp_saved_edit).

        Done here, once, so that no method's saved edit can skip the record that
        :func:`check_saved_edit` relies on to refuse a wrong or damaged edit.
        """
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("save")
        if own is not None and not getattr(own, "_stamps_model", False):
            cls.save = _stamping(own)  # type: ignore[method-assign]


class WeightSnapshotHandle(EditHandle):
    """For methods that change parameters in place: keeps exact copies of the originals."""

    def __init__(self, method: str, model: torch.nn.Module, param_names: Iterable[str]) -> None:
        super().__init__(method)
        self.model = model
        params = dict(model.named_parameters())
        names = list(dict.fromkeys(param_names))
        missing = [n for n in names if n not in params]
        if missing:
            held = [n for n in missing if held_by_wrapper(model, n)]
            if held:
                raise EditHandleError(f"{method}: {held} sit inside an adapter edit already applied (GRACE, DEFER, WISE or "
                                      "similar); restore that edit first, or edit another layer")
            raise EditHandleError(f"{method}: the model has no parameter(s) {missing}")
        self._originals = {n: params[n].detach().clone() for n in names}
        self._released: set[str] = set()

    @property
    def param_names(self) -> list[str]:
        return list(self._originals)

    def _restore(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self._originals.items():
                params[name].copy_(original)

    @property
    def released_names(self) -> list[str]:
        """Parameters whose copies :meth:`release_copies` dropped (an older handle of the chain holds them)."""
        return sorted(self._released)

    def release_copies(self, names: Iterable[str]) -> None:
        """Drop the stored copies of ``names``, because an older handle in the same chain holds their originals.

        Only for a chain restored newest first (:func:`restore_all`): this
        handle then restores its other parameters and the older one puts the
        released ones back. A sequential chunk of T edits so keeps one copy of
        each touched weight instead of T. Such a handle restores exactly only as
        part of that chain, and can no longer be saved.
        """
        for name in names:
            if self._originals.pop(name, None) is not None:
                self._released.add(name)

    def _check_complete(self, action: str) -> None:
        if self._released:
            raise EditHandleError(f"this {self.method} edit cannot {action}: its copies of {sorted(self._released)} were "
                                  "released to an older edit of the same chain")

    def originals(self) -> dict[str, torch.Tensor]:
        """The exact values of the touched parameters before this edit (the stored copies: do not modify them).

        Copies given up by :meth:`release_copies` are not here: the older handle of the chain has them.
        """
        return dict(self._originals)

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of the change of each touched parameter (useful for reports)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            return {n: float((params[n] - o).norm()) for n, o in self._originals.items()}

    def save(self, path: str | Path) -> Path:
        """Store the edited values of the touched parameters (safetensors + a JSON sidecar, no pickle)."""
        self._check_complete("be saved")
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


# --------------------------------------------------------------------------- saved edits as untrusted input

EDIT_META = "edit.json"
EDIT_TENSORS = "edit.safetensors"
_PROBE_VALUES = 32


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """What a saved edit records about the model it was made on.

    The architecture (type, layers, widths, vocabulary) and a probe of the input
    embeddings: their norm and a few values at fixed positions. No editing
    method here touches the input embeddings, so the probe is the same before
    and after edits (a full weight hash is not: the edit itself changes the
    weights), and it tells a different model of the same shape apart. Values,
    not bytes, so the same model loaded in another dtype still matches.
    """
    config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings().weight.detach()
    flat = embeddings.reshape(-1)
    last = flat.numel() - 1  # integer positions: float32 linspace rounds past the end of a large table
    positions = torch.tensor([i * last // (_PROBE_VALUES - 1) for i in range(_PROBE_VALUES)], device=flat.device)
    return {
        "type": getattr(config, "model_type", type(model).__name__),
        "name": str(getattr(config, "_name_or_path", "") or ""),
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "embedding_shape": list(embeddings.shape),
        "embedding_norm": float(flat.float().norm()),
        "embedding_probe": [float(v) for v in flat[positions].float().cpu()],
    }


def _describe(identity: dict[str, Any]) -> str:
    name = identity.get("name") or "an unnamed model"
    return f"{name} ({identity.get('type')}, {identity.get('layers')} layers, hidden size {identity.get('hidden_size')})"


def identity_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why ``current`` is not the model ``saved`` describes, or None when it is."""
    for key in ("type", "layers", "hidden_size", "vocab_size", "embedding_shape"):
        if saved.get(key) != current.get(key):
            return f"its {key.replace('_', ' ')} is {current.get(key)}, the edit's model had {saved.get(key)}"
    probe, here = saved.get("embedding_probe", []), current["embedding_probe"]
    scale = max((abs(v) for v in probe), default=0.0) + 1e-12
    close = len(probe) == len(here) and all(abs(a - b) <= 1e-2 * scale for a, b in zip(probe, here))
    norm = float(saved.get("embedding_norm", 0.0))
    if not close or not math.isclose(norm, current["embedding_norm"], rel_tol=1e-3):
        return "its weights differ (the input embeddings do not match)"
    return None



def stamp_saved_edit(folder: Path, model: torch.nn.Module) -> None:
    """Add to ``edit.json`` the model the edit was made on and the sha256 of every tensor file beside it."""
    meta_path = folder / EDIT_META
    meta = json.loads(meta_path.read_text())
    meta["model"] = model_identity(model)
    meta["files"] = {p.name: file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}
    atomic_write_json(meta_path, meta, indent=2)  # a kill leaves the unstamped edit.json, never half of one


def check_saved_edit(model: torch.nn.Module, folder: Path, meta: dict[str, Any]) -> None:
    """Refuse, with one clear line, a saved edit that is damaged or was made on another model.

    Checked before any loader touches the model: the model recorded at save
    time, the sha256 of each tensor file, that ``edit.safetensors`` is readable
    and holds exactly the tensors (names and shapes) that ``edit.json`` declares.
    Edits saved before the record existed are loaded with a warning.
    """
    saved = meta.get("model")
    if isinstance(saved, dict):
        why = identity_mismatch(saved, model_identity(model))
        if why is not None:
            raise EditHandleError(f"the edit in {folder} was made on {_describe(saved)}, not on this model: {why}; "
                                  "load it onto the model it was made on")
    else:
        LOG.warning("%s does not record the model it was made on (saved by an older lmedit); it is not checked", folder)
    for name, digest in (meta.get("files") or {}).items():
        file = folder / name
        if not file.is_file():
            raise EditHandleError(f"{file} is missing; the saved edit is incomplete, save it again")
        if file_sha256(file) != digest:
            raise EditHandleError(f"{file} changed after the edit was saved (truncated or modified: its sha256 "
                                  "differs from edit.json's); save the edit again")
    tensors_file = folder / EDIT_TENSORS
    if tensors_file.is_file():
        _check_declared_shapes(tensors_file, meta)


def _check_declared_shapes(tensors_file: Path, meta: dict[str, Any]) -> None:
    try:
        with safe_open(str(tensors_file), framework="pt") as handle:
            held = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for a torn or foreign file
        raise EditHandleError(f"{tensors_file} is damaged (truncated or not a safetensors file: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); save the edit again") from None
    declared = meta.get("parameters", meta.get("tensors"))
    if isinstance(declared, dict):
        declared = {str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in declared.items()}
        if declared != held:
            differ = sorted(k for k in set(declared) | set(held) if declared.get(k) != held.get(k))
            raise EditHandleError(f"{tensors_file} does not hold what edit.json declares (differs at {', '.join(differ[:3])}: "
                                  f"declared {[declared.get(k) for k in differ[:3]]}, found {[held.get(k) for k in differ[:3]]}); "
                                  "save the edit again")


def keep_first_copies(chain: Iterable[EditHandle], handle: EditHandle) -> None:
    """Before ``handle`` joins ``chain``: release its weight copies that an older handle of the chain holds.

    Restoring the chain newest first ends with each parameter's oldest copy,
    its value before the chunk, so later copies of the same parameter are
    never the last word. Dropping them keeps one copy per touched weight for
    the whole chunk instead of one per edit (T=1000 MEMIT edits of five layers
    would otherwise keep 5,000 layer copies). Only when every handle in the
    chain is a weight snapshot: other handles may rewire the model between.
    """
    chain = [h for h in chain if h.touches_model]
    if not isinstance(handle, WeightSnapshotHandle) or not all(isinstance(h, WeightSnapshotHandle) for h in chain):
        return
    held = {name for older in chain for name in older.param_names} | {
        name for older in chain for name in older.released_names}
    handle.release_copies(held & set(handle.param_names))


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
