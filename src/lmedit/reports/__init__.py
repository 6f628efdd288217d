"""Tables of finished runs, read from their run folders, in named layouts (``lmedit report --layout NAME``).

A layout is registered by name with :func:`register_layout` on a class (made
with no arguments) or an object that has

* ``rows(runs) -> list[dict]``: the table's data, from runs read by :func:`load_run`
  (also what ``lmedit report --out`` writes as JSON);
* ``table(rows) -> str``: the table as markdown;
* optionally ``plot(rows, path)``: a figure of the same rows.

The built-in layouts (``default``, ``knowedit``, ``counterfact``, ``wise-table``)
register themselves when their module is imported; :func:`get_layout` and
:func:`list_layouts` import them on first use, so importing this package is cheap
and changes nothing.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar, runtime_checkable

__all__ = ["Layout", "ReportError", "describe_layout", "expand_run_folders", "get_layout", "list_layouts", "load_run",
           "register_layout"]

from lmedit.reports.easyedit_results import is_easyedit_results, load_easyedit_results  # noqa: E402  (json only)

BUILTIN_MODULES = ("default", "knowedit", "counterfact", "wise_table")


class ReportError(ValueError):
    """Something given to a report cannot be read as asked; the message says what and how to fix it."""


@runtime_checkable
class Layout(Protocol):
    """What ``lmedit report --layout NAME`` needs from a layout."""

    def rows(self, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def table(self, rows: Sequence[dict[str, Any]]) -> str: ...


_LAYOUTS: dict[str, Layout] = {}
_builtins_loaded = False
T = TypeVar("T")


def register_layout(name: str) -> Callable[[T], T]:
    """Decorator: register a layout class (instantiated without arguments) or object under ``name``."""

    def register(target: T) -> T:
        layout = target() if isinstance(target, type) else target
        if not isinstance(layout, Layout):
            raise TypeError(f"layout {name!r} needs rows(runs) and table(rows) methods")
        if name in _LAYOUTS and _qualified(_LAYOUTS[name]) != _qualified(layout):  # a module re-imported is fine
            raise ValueError(f"a layout named {name!r} is already registered ({_qualified(_LAYOUTS[name])}); "
                             "choose another name")
        _LAYOUTS[name] = layout
        return target

    return register


def _qualified(layout: Layout) -> str:
    return f"{type(layout).__module__}.{type(layout).__qualname__}"


def get_layout(name: str) -> Layout:
    """The layout registered as ``name``; an unknown name is a :class:`ReportError` listing the known ones."""
    _load_builtins()
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise ReportError(f"unknown layout {name!r}; available layouts: {', '.join(list_layouts())}") from None


def list_layouts() -> list[str]:
    """Names of the registered layouts, ``default`` first."""
    _load_builtins()
    return sorted(_LAYOUTS, key=lambda name: (name != "default", name))


def describe_layout(name: str) -> str:
    """The first line of a layout's docstring, for listings."""
    doc = (type(get_layout(name)).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(f"{__name__}.{module}")
        _builtins_loaded = True


def load_run(folder: str | Path) -> dict[str, Any]:
    """A run's config and summary; a run still in progress is summarised from the chunks written so far."""
    from lmedit.runner import CONFIG_FILE, RESULTS_FILE, SUMMARY_FILE, read_records, summarize

    folder = Path(folder)
    if is_easyedit_results(folder):  # an EasyEdit *_results.json, shown beside lmedit runs
        return load_easyedit_results(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ReportError(f"{folder} is not a run folder ({CONFIG_FILE} is missing); pass folders made by lmedit run")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if (folder / SUMMARY_FILE).is_file():
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    else:
        records = read_records(folder / RESULTS_FILE) if (folder / RESULTS_FILE).is_file() else []
        if not records:
            raise ReportError(f"{folder} has no finished chunk yet")
        summary = {**summarize(records), "complete": False}
    return {"folder": str(folder), "config": config, "summary": summary}


def expand_run_folders(folders: Sequence[str | Path]) -> list[Path]:
    """Run folders as given, with a folder of run folders (e.g. a reproduction's ``runs/wise-table``) replaced by
    the run folders directly inside it, in name order.

    Plain files are left out, except EasyEdit results files (``*_results.json``, read by
    :mod:`lmedit.reports.easyedit_results`): a shell glob over a reproduction (``runs/wise-table/*``) also passes its table and
    plan files. A path that does not exist is kept, so that :func:`load_run` names it.
    """
    from lmedit.runner import CONFIG_FILE

    expanded: list[Path] = []
    for folder in map(Path, folders):
        if folder.is_file():
            if is_easyedit_results(folder):
                expanded.append(folder)
            continue
        inner = sorted(p for p in folder.iterdir() if (p / CONFIG_FILE).is_file()) if folder.is_dir() else []
        expanded.extend(inner if inner and not (folder / CONFIG_FILE).is_file() else [folder])
    if folders and not expanded:
        raise ReportError(f"no run folders among {', '.join(map(str, folders))}; pass folders made by lmedit run")
    return expanded
