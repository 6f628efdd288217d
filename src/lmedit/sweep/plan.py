"""A sweep file: a grid of methods × models × data × protocols × T × seeds × evaluation modes, expanded into jobs.

Everything a job needs is checked here, before any model loads or any work
starts: unknown keys, methods, presets, hyperparameter names, models and data
files are named in one error. Each job is one run folder under the sweep folder,
the same folder ``lmedit run`` writes for the same settings.

.. code-block:: yaml

    model: smollm2-135m                # or models: [...]
    data: {path: ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json, limit: 50}   # or a list of them
    methods: [FT-L, FT-M, {name: GRACE, set: {n_iter: 50}}, {name: WISE, preset: smollm2-135m}]
    protocol: sequential               # or protocols: [...]
    T: [1, 10]
    seeds: [0]
    eval_mode: teacher                 # or eval_modes: [...]; generation_scored methods add generation with `auto`
    suites: [fluency]                  # metric suites, as `lmedit run --suite` (those the data needs are added)
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

KEYS = {"model", "models", "data", "methods", "protocol", "protocols", "T", "batch_size", "seed", "seeds",
        "eval_mode", "eval_modes", "eval_batch_size", "suites", "out"}
DATA_KEYS = {"path", "offset", "limit", "format"}
METHOD_KEYS = {"name", "preset", "set", "label"}
PROTOCOLS = ("single", "batch", "sequential")
SWEEP_EVAL_MODES = ("teacher", "generate", "both", "auto")


class SweepError(ValueError):
    """A sweep file that cannot run as written; the message names what and where."""


@dataclass(frozen=True)
class Job:
    """One cell of the grid: one ``lmedit run``."""

    method: str
    model: str
    data: str
    protocol: str = "single"
    T: int | None = None
    batch_size: int = 1
    seed: int = 0
    eval_mode: str = "teacher"
    eval_batch_size: int = 128
    offset: int = 0
    limit: int | None = None
    data_format: str | None = None
    preset: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    folder: str = ""
    suites: tuple[str, ...] = ()
    """Metric suites asked for (``lmedit run --suite``); the worker adds those the data needs, as ``run`` does."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "suites", tuple(self.suites))  # a list after a JSON or Ray round trip

    @property
    def name(self) -> str:
        """The run folder's name (set by :func:`expand` from the settings that vary in the grid)."""
        return self.folder or self.full_name()

    def full_name(self) -> str:
        """Every setting that can tell this job from another, readable and stable."""
        return folder_name(self, ("model", "data", "protocol", "T", "seed", "eval_mode"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overrides": dict(self.overrides), "name": self.name}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Job":
        return cls(**{k: v for k, v in values.items() if k != "name"})


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _pick(raw: Mapping[str, Any], single: str, plural: str, default: Any) -> list[Any]:
    if single in raw and plural in raw:
        raise SweepError(f"give either {single!r} or {plural!r}, not both")
    if plural in raw:
        values = _as_list(raw[plural])
    elif single in raw:
        values = _as_list(raw[single])
    else:
        values = [default]
    if not values:
        raise SweepError(f"{plural!r} is empty")
    return values


def read_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep file's mapping (YAML or JSON); unknown keys are an error naming them."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"sweep file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path} must hold a mapping of settings (model, data, methods, ...)")
    _check_keys(raw, KEYS, f"sweep file {path}")
    return raw


def _check_keys(mapping: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _entry(entry: Any, main: str, known: set[str], what: str) -> dict[str, Any]:
    """A grid entry given as its ``main`` value alone or as a mapping with it, its keys checked."""
    if isinstance(entry, str):
        entry = {main: entry}
    if not isinstance(entry, dict) or main not in entry:
        raise SweepError(f"a {what} entry must be a {main} or a mapping with {main!r}, got {entry!r}")
    _check_keys(entry, known, f"{what} entry {entry[main]!r}")
    return entry


def expand(raw: Mapping[str, Any], *, check_models: bool = True) -> list[Job]:
    """All jobs of the grid, in a fixed order (methods outermost), each checked."""
    if "methods" not in raw:
        raise SweepError("the sweep file names no methods (methods: [FT-M, ROME, ...])")
    methods = [_method_entry(m) for m in _as_list(raw["methods"])]
    models = [str(m) for m in _pick(raw, "model", "models", "smollm2-135m")]
    data = [_data_entry(d) for d in _as_list(raw.get("data"))]
    protocols = [str(p) for p in _pick(raw, "protocol", "protocols", "single")]
    T_values = _as_list(raw.get("T", [None]))
    seeds = [int(s) for s in _pick(raw, "seed", "seeds", 0)]
    modes = [str(m) for m in _pick(raw, "eval_mode", "eval_modes", "teacher")]
    batch_size = int(raw.get("batch_size", 1))
    eval_batch_size = int(raw.get("eval_batch_size", 128))
    suites = _suites(raw.get("suites", []))
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise SweepError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    for mode in modes:
        if mode not in SWEEP_EVAL_MODES:
            raise SweepError(f"unknown eval mode {mode!r}; use one of {', '.join(SWEEP_EVAL_MODES)}")
    if check_models:
        for model in models:
            _check_model(model)
    jobs: list[Job] = []
    for (method, preset, overrides, label), model, d, protocol, T, seed, mode in itertools.product(
            methods, models, data, protocols, T_values, seeds, modes):
        if protocol != "sequential" and T is not None:
            if len(T_values) > 1:
                raise SweepError(f"T is for the sequential protocol; {protocol!r} cannot take T={T}")
            T = None
        jobs.append(Job(method=method, model=model, data=d["path"], protocol=protocol,
                        T=int(T) if T is not None else None, batch_size=batch_size, seed=seed,
                        eval_mode=_eval_mode(method, mode), eval_batch_size=eval_batch_size, offset=d["offset"],
                        limit=d["limit"], data_format=d["format"], preset=_preset(method, preset, model),
                        overrides=overrides, label=label, suites=suites))
    varying = [axis for axis, values in (("model", models), ("data", data), ("protocol", protocols), ("T", T_values),
                                         ("seed", seeds), ("eval_mode", modes)) if len(values) > 1]
    jobs = [dataclasses.replace(job, folder=folder_name(job, varying)) for job in jobs]
    names = [job.name for job in jobs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SweepError(f"two jobs would share the run folder {repeated[0]}; give the methods distinct labels "
                         "(methods: [{name: FT-M, label: FT-M-a}, ...])")
    return jobs


def folder_name(job: Job, axes: Sequence[str]) -> str:
    """The method (or its label) and the settings named by ``axes``, e.g. ``WISE-T10`` or ``FT-M-T1-s2``."""
    parts = [job.label or job.method]
    for axis in axes:
        if axis == "model":
            parts.append(Path(job.model).name)
        elif axis == "data":
            parts.append(f"{Path(job.data).stem}-o{job.offset}" + (f"n{job.limit}" if job.limit is not None else ""))
        elif axis == "protocol":
            parts.append(job.protocol)
        elif axis == "T":
            parts.append(f"T{job.T}" if job.T else "T-")
        elif axis == "seed":
            parts.append(f"s{job.seed}")
        elif axis == "eval_mode":
            parts.append(job.eval_mode)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(parts))


def _suites(value: Any) -> tuple[str, ...]:
    from lmedit.evaluation.suites import build_suites

    suites = tuple(str(s) for s in _as_list(value))
    try:
        build_suites(suites)
    except ValueError as exc:
        raise SweepError(f"suites: {exc}") from None
    return suites


def _method_entry(entry: Any) -> tuple[str, str | None, dict[str, Any], str]:
    from lmedit.registry import MethodError, get_method

    entry = _entry(entry, "name", METHOD_KEYS, "method")
    try:
        info = get_method(str(entry["name"]))
    except MethodError as exc:
        raise SweepError(str(exc)) from None
    overrides = dict(entry.get("set") or {})
    try:  # the names (and values) of the overrides, checked against the method's defaults, no model needed
        info.load_hparams(None, None, overrides)
    except ValueError as exc:
        raise SweepError(f"method {info.name}: {exc}") from None
    return info.name, entry.get("preset"), overrides, str(entry.get("label") or "")


def _preset(method: str, preset: str | None, model: str) -> str | None:
    """The preset asked for (checked), else the method's preset for the model when it has one (as lmedit run)."""
    from lmedit.registry import list_presets

    known = list_presets(method)
    if preset is not None:
        if preset not in known:
            raise SweepError(f"{method} has no preset {preset!r}; known: {', '.join(known) or 'none'}")
        return preset
    return model if model in known else None


def _eval_mode(method: str, mode: str) -> str:
    """``auto``: teacher forcing, plus generation for methods registered as generation-scored (the WISE table's rule)."""
    from lmedit.registry import get_method

    if mode != "auto":
        return mode
    return "both" if get_method(method).generation_scored else "teacher"


def _data_entry(entry: Any) -> dict[str, Any]:
    from lmedit.data import DataError, load_requests

    if entry is None:
        return {"path": "demo", "offset": 0, "limit": None, "format": None}
    entry = _entry(entry, "path", DATA_KEYS, "data")
    path = str(entry["path"])
    offset, limit = int(entry.get("offset", 0)), entry.get("limit")
    try:
        requests = load_requests(None if path == "demo" else path, limit=limit, offset=offset, format=entry.get("format"))
    except (DataError, OSError) as exc:
        raise SweepError(f"data {path}: {exc}") from None
    if not requests:
        raise SweepError(f"data {path} has no records from offset {offset}")
    return {"path": path, "offset": offset, "limit": None if limit is None else int(limit), "format": entry.get("format")}


def _check_model(model: str) -> None:
    """A model preset, a local folder, or a hub id (owner/name); anything else is named before any work."""
    from lmedit.models import PRESETS

    if model in PRESETS or Path(model).is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return
    raise SweepError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}), a folder, or a hub id owner/name")
