"""State that lives beside a model object rather than inside it, kept in one table with one reset.

Several parts of lmedit remember things per model object: the locate-then-edit
core its accumulated keys and cached projections, LoRA its peft session, probe
routing the router attached to the model, the statistics service the
fingerprint of the model's original weights. They all keep that state here,
each under its own owner name, in a weak table that lets the state die with
the model. Process-wide caches (statistics loaded from disk, encoded
demonstration pools, sentence encoders) register a clearing function.
:func:`reset` clears it all, for one model or for every model: what a test
or a long-lived process (the web app, a sweep worker) calls between models.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

_PER_OBJECT: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()
_PROCESS_CACHES: dict[str, Callable[[], None]] = {}
_MISSING = object()


def slot(obj: Any, owner: str, default: Callable[[], Any] | None = None) -> Any:
    """The state ``owner`` keeps for ``obj`` (a model or a tokenizer); created by ``default()`` when absent.

    Returns None when there is no state and no ``default``.
    """
    table = _PER_OBJECT.get(obj)
    if table is None:
        if default is None:
            return None
        table = _PER_OBJECT.setdefault(obj, {})
    value = table.get(owner, _MISSING)
    if value is _MISSING:
        if default is None:
            return None
        value = table[owner] = default()
    return value


def put(obj: Any, owner: str, value: Any) -> None:
    """Set ``owner``'s state for ``obj``."""
    _PER_OBJECT.setdefault(obj, {})[owner] = value


def drop(obj: Any, owner: str) -> None:
    """Forget ``owner``'s state for ``obj`` (nothing to do when it has none)."""
    table = _PER_OBJECT.get(obj)
    if table is not None:
        table.pop(owner, None)
        if not table:
            del _PER_OBJECT[obj]


def owners(obj: Any) -> list[str]:
    """Who keeps state for ``obj`` now (for diagnostics and tests)."""
    return sorted(_PER_OBJECT.get(obj, {}))


def weights_digest(model: Any) -> str:
    """sha256 over name, dtype, shape and bytes of every parameter and persistent buffer: equal only for equal weights."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{str(data.dtype)}\0{tuple(data.shape)}\0".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def register_process_cache(name: str, clear: Callable[[], None]) -> None:
    """Let :func:`reset` clear a process-wide cache (called once at import of the module that owns it)."""
    _PROCESS_CACHES[name] = clear


def reset(obj: Any = None) -> None:
    """Forget every owner's state for ``obj``; with no argument, for every object, and clear process caches.

    This never touches a model's weights or modules: edits still in a model
    are undone with their handles.
    """
    if obj is not None:
        _PER_OBJECT.pop(obj, None)
        return
    _PER_OBJECT.clear()
    for clear in _PROCESS_CACHES.values():
        clear()
