"""The one method contract, and the registry that maps names to methods.

A method is a function ``apply(model, tok, requests, hparams) -> EditHandle``
registered under a name together with everything the framework needs to know
about it: its hyperparameter dataclass, its capabilities, how it is scored,
how a saved edit of it is loaded, how its networks are trained (if it has
any), and which points of the method contract it cannot meet. The editor,
the protocols, the commands and the contract test only ever read these
facts from here, so adding a method is one new module under
``lmedit.methods`` (docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from lmedit.handles import EditHandle, EditHandleError, WEIGHT_EDIT_FORMAT, check_saved_edit, load_weight_edit
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.requests import EditRequest

ApplyFn = Callable[[Any, Any, Sequence[EditRequest], Any], EditHandle]
EditLoader = Callable[[Any, Path, dict[str, Any]], EditHandle]
"""``loader(model, folder, meta)``: re-apply a saved edit (``meta`` is its ``edit.json``) and return its handle."""


class MethodError(ValueError):
    """A method name, capability or preset is wrong; the message says how to fix it."""


class Method(Protocol):
    def __call__(self, model: Any, tok: Any, requests: Sequence[EditRequest], hparams: Any) -> EditHandle: ...


@dataclass(frozen=True)
class TrainingEntry:
    """How ``lmedit train <method>`` trains a method's networks (MEND's hypernetwork, SERAC's classifier).

    ``train(model, tok, params, train_examples, val_examples, out_dir, identity=..., show_progress=...)``
    trains (or resumes) into ``out_dir`` and returns a result with ``curve``, ``best_step``,
    ``best_metric``, ``status``, ``steps``, ``seconds`` and ``out_dir``. ``params`` is a
    :class:`HyperParams` dataclass of training settings (``--set`` overrides its fields).
    """

    params: type[HyperParams]
    train: Callable[..., Any]
    summary: str
    train_data: str = "counterfact/counterfact-train.json"  # default files, relative to the shared data folder
    val_data: str = "counterfact/counterfact-val.json"


@dataclass(frozen=True)
class Contract:
    """The points of the method contract a method cannot meet, declared so the contract test checks the declaration.

    ``effect``: what "the edit takes effect" means for this method: ``"target"`` (the target's
    log-probability after the edit prompt rises), ``"output"`` (the model's outputs change, but on an
    untrained tiny model the target need not become likelier: a method that steers by a learned
    network or by context) or ``"none"``. ``save_load``: a saved edit re-applied to a fresh model
    gives the same outputs. ``no_tiny_effect_on``: model types (``config.model_type``) on which the
    edit does not take effect on a tiny random model (the contract test then checks only that it
    runs and restores there). ``why`` says why any point is declared off.
    """

    effect: str = "target"
    save_load: bool = True
    no_tiny_effect_on: tuple[str, ...] = ()
    why: str = ""

    def __post_init__(self) -> None:
        if self.effect not in ("target", "output", "none"):
            raise MethodError(f"Contract.effect must be 'target', 'output' or 'none', got {self.effect!r}")
        if (self.effect != "target" or not self.save_load or self.no_tiny_effect_on) and not self.why:
            raise MethodError("a Contract that declares a point off must say why (why=...)")


KeptState = Callable[[Any, Any, int], tuple[int, str, str]]
"""``kept(model, hparams, edits) -> (bytes, what, fix)``: the memory a method keeps for ``edits`` sequential
edits in one chunk (undo records, memories, codebook rows), what it is, and what setting lowers it. The
protocol checks it against the free memory before the first edit (:mod:`lmedit.limits`)."""

TinySetup = Callable[[Any, Any, Path], dict[str, Any]]
"""``setup(model, tok, workdir) -> overrides``: hyperparameters that make the method run on a tiny random
model of any layout (a layer that exists, few steps, a tiny trained checkpoint written under ``workdir``).
The contract test calls it for every registered method."""


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
    generation_scored: bool = False
    load_edit: EditLoader = load_weight_edit
    trainer: TrainingEntry | None = None
    contract: Contract = Contract()
    tiny_setup: TinySetup | None = None
    kept_state: KeptState | None = None

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
        model: Any = None,
    ) -> HyperParams:
        """Hyperparameters from a YAML file, else a packaged preset, else the dataclass defaults.

        An EasyEdit file (recognised by its keys) is translated by :mod:`lmedit.compat.easyedit_hparams`;
        ``model``, when given, is what its module templates are checked against.
        """
        if path is not None and preset is not None:
            raise MethodError("give either a hyperparameter file or a preset name, not both")
        if path is not None:
            from lmedit.compat.easyedit_hparams import read_if_easyedit

            easyedit = read_if_easyedit(path, model=model, overrides=overrides)
            if easyedit is not None and easyedit.method != self.name:
                raise MethodError(f"{path} is an EasyEdit file for {easyedit.method}, not {self.name}; "
                                  f"use method {easyedit.method} or a file for {self.name}")
            if easyedit is not None:
                return easyedit.hparams
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
    generation_scored: bool = False,
    load_edit: EditLoader | None = None,
    trainer: TrainingEntry | None = None,
    contract: Contract | None = None,
    tiny_setup: TinySetup | None = None,
    kept_state: KeptState | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply`` under ``name``; its docstring's first line becomes the summary.

    ``packed_evaluation=False`` is for methods whose edited model must see
    one sequence per row (adapters that act on "the last token" of the
    input or pool over it): their evaluation uses left-padded batches.
    ``cached_generation=False`` is for methods whose output at a position
    depends on the whole input of the call (a routing or gating decision
    per sequence): they are scored by generation without the KV cache, as
    EasyEdit's ``vanilla_generation`` does, so each step sees the whole text.
    ``generation_scored=True``: benchmark tables also score the method by
    greedy generation (its teacher-forced number alone would mislead).
    ``load_edit`` re-applies a saved edit (default: the weight-snapshot
    format of :class:`lmedit.handles.WeightSnapshotHandle`); ``trainer``
    makes ``lmedit train <name>`` exist; ``contract`` declares contract
    points the method cannot meet; ``tiny_setup`` gives the contract test
    settings for a tiny model. ``kept_state`` estimates the memory the method keeps per chunk of
    sequential edits beyond weight copies (which the protocol keeps once per parameter).
    """

    def decorator(apply: ApplyFn) -> ApplyFn:
        if name in _REGISTRY and _REGISTRY[name].apply is not apply:
            raise MethodError(f"method name {name!r} is registered twice")
        summary = (apply.__doc__ or "").strip().splitlines()[0] if apply.__doc__ else ""
        _REGISTRY[name] = MethodInfo(
            name, apply, hparams, batch, needs_subject, summary, packed_evaluation, cached_generation,
            generation_scored, load_edit or load_weight_edit, trainer, contract or Contract(), tiny_setup, kept_state,
        )
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


def with_hparam_defaults(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A stored run identity (config.json, a checkpoint) in JSON form, its ``hparams`` completed with defaults.

    A field added to a method after a run was written did not exist for that run, which therefore ran as the
    field's default does (new fields default to the behaviour from before them: docs/adding-a-method.md). Filling
    it in keeps such a run resumable; a field the run did record is never changed.
    """
    completed = json.loads(json.dumps(dict(identity)))
    stored = completed.get("hparams")
    if not isinstance(stored, dict):
        return completed
    _import_builtin_methods()
    key = _canonical(str(completed.get("method", "")))
    if key is not None:
        defaults = json.loads(json.dumps(_REGISTRY[key].hparams_class.defaults()))
        completed["hparams"] = {**defaults, **stored}
    return completed


def _canonical(name: str) -> str | None:
    if name in _REGISTRY:
        return name
    folded = {k.lower().replace("_", "-"): k for k in _REGISTRY}
    return folded.get(name.lower().replace("_", "-"))


def list_methods() -> list[MethodInfo]:
    _import_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def trainable_methods() -> list[MethodInfo]:
    """Methods with networks to train (``lmedit train <name>``)."""
    return [info for info in list_methods() if info.trainer is not None]


def load_edit(model: Any, path: str | Path) -> EditHandle:
    """Apply an edit saved with ``handle.save(path)`` to ``model``; the returned handle undoes it.

    The saved ``edit.json`` names its method, whose registered loader re-applies it. A saved edit is
    untrusted input: one made on another model, with a changed or truncated tensor file, or whose
    tensors do not match what ``edit.json`` declares is refused (:func:`lmedit.handles.check_saved_edit`)
    before the model is touched, and a loader that trips over a malformed file reports an
    :class:`EditHandleError`, never a raw KeyError.
    """
    path = Path(path)
    meta_path = path / "edit.json"
    if not meta_path.is_file():
        raise EditHandleError(f"{path} holds no saved edit (edit.json is missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise EditHandleError(f"{meta_path} is not valid JSON ({exc}); save the edit again") from None
    if not isinstance(meta, dict):
        raise EditHandleError(f"{meta_path} does not hold a saved lmedit edit")
    if meta.get("format") == WEIGHT_EDIT_FORMAT:
        loader: EditLoader = load_weight_edit
    else:
        try:
            loader = get_method(str(meta.get("method"))).load_edit
        except MethodError:
            raise EditHandleError(
                f"{meta_path} is not an lmedit edit this version can read (format {meta.get('format')!r}, "
                f"method {meta.get('method')!r}; known methods: {', '.join(sorted(_REGISTRY))})"
            ) from None
    check_saved_edit(model, path, meta)
    try:
        return loader(model, path, meta)
    except EditHandleError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EditHandleError(f"{meta_path} is not a valid saved {meta.get('method')} edit "
                              f"({type(exc).__name__}: {exc}); save the edit again") from None


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
