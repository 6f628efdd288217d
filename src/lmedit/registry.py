"""The one method contract, and the registry that maps names to methods.

A method is a function ``apply(model, tok, requests, hparams) -> EditHandle``
registered under a name together with its hyperparameter dataclass and its
capabilities. The editor and the protocols only ever talk to this contract,
so adding a method is one new module under ``lmedit.methods``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from lmedit.handles import EditHandle
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.requests import EditRequest

ApplyFn = Callable[[Any, Any, Sequence[EditRequest], Any], EditHandle]


class MethodError(ValueError):
    """A method name, capability or preset is wrong; the message says how to fix it."""


class Method(Protocol):
    def __call__(self, model: Any, tok: Any, requests: Sequence[EditRequest], hparams: Any) -> EditHandle: ...


@dataclass(frozen=True)
class MethodInfo:
    """What the framework needs to know about a method, without running it."""

    name: str
    apply: ApplyFn
    hparams_class: type[HyperParams]
    supports_batch: bool
    needs_subject: bool
    summary: str
    packed_evaluation: bool = True
    cached_generation: bool = True

    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        """Fail before any model time is spent when the requests cannot be edited by this method."""
        if len(requests) > 1 and not self.supports_batch:
            raise MethodError(
                f"{self.name} edits one request at a time and cannot take a batch of {len(requests)}; "
                "use the single or sequential protocol"
            )
        if self.needs_subject:
            for request in requests:
                request.require_subject()

    def load_hparams(
        self,
        preset: str | None = None,
        path: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> HyperParams:
        """Hyperparameters from a YAML file, else a packaged preset, else the dataclass defaults."""
        if path is not None and preset is not None:
            raise MethodError("give either a hyperparameter file or a preset name, not both")
        if path is not None:
            return self.hparams_class.from_yaml(path, overrides)
        if preset is not None:
            return self.hparams_class.from_yaml(preset_path(self.name, preset), overrides)
        return self.hparams_class.from_dict(dict(overrides or {}), source=f"{self.name} defaults")


_REGISTRY: dict[str, MethodInfo] = {}


def register(
    name: str,
    *,
    hparams: type[HyperParams],
    batch: bool = False,
    needs_subject: bool = False,
    packed_evaluation: bool = True,
    cached_generation: bool = True,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply`` under ``name``; its docstring's first line becomes the summary.

    ``packed_evaluation=False`` is for methods whose edited model must see
    one sequence per row (adapters that act on "the last token" of the
    input or pool over it): their evaluation uses left-padded batches.
    ``cached_generation=False`` is for methods whose output at a position
    depends on the whole input of the call (a routing or gating decision
    per sequence): they are scored by generation without the KV cache, as
    EasyEdit's ``vanilla_generation`` does, so each step sees the whole text.
    """

    def decorator(apply: ApplyFn) -> ApplyFn:
        if name in _REGISTRY and _REGISTRY[name].apply is not apply:
            raise MethodError(f"method name {name!r} is registered twice")
        summary = (apply.__doc__ or "").strip().splitlines()[0] if apply.__doc__ else ""
        _REGISTRY[name] = MethodInfo(name, apply, hparams, batch, needs_subject, summary, packed_evaluation,
                                     cached_generation)
        return apply

    return decorator


def _import_builtin_methods() -> None:
    """Import every module in lmedit.methods so that its @register calls run (lazily, on first lookup)."""
    import lmedit.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def get_method(name: str) -> MethodInfo:
    _import_builtin_methods()
    key = _canonical(name)
    if key is None:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def _canonical(name: str) -> str | None:
    if name in _REGISTRY:
        return name
    folded = {k.lower().replace("_", "-"): k for k in _REGISTRY}
    return folded.get(name.lower().replace("_", "-"))


def list_methods() -> list[MethodInfo]:
    _import_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def preset_path(method: str, preset: str) -> Path:
    """The packaged YAML preset ``presets/<method>/<preset>.yaml``."""
    folder = resources.files("lmedit") / "presets" / method
    candidate = Path(str(folder / f"{preset}.yaml"))
    if not candidate.is_file():
        available = list_presets(method)
        raise HyperParamsError(
            f"no preset {preset!r} for {method}; available presets: {', '.join(available) or 'none'}. "
            "Pass a YAML file with --hparams instead."
        )
    return candidate


def list_presets(method: str) -> list[str]:
    folder = Path(str(resources.files("lmedit") / "presets" / method))
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
