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
           "read_run_records", "register_layout"]

from lmedit.reports.easyedit_results import is_easyedit_results, load_easyedit_results  # noqa: E402  (json only)

BUILTIN_MODULES = ("default", "knowedit", "counterfact", "wise_table", "realistic")


class ReportError(ValueError):
    """Something given to a report cannot be read as asked; the message says what and how to fix it."""


class RunNotStarted(ReportError):
    """A run folder with no finished chunk yet: nothing of it can be shown, the other folders still can."""


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
    from lmedit.runner import CONFIG_FILE, RESULTS_FILE, SUMMARY_FILE, summarize

    folder = Path(folder)
    if is_easyedit_results(folder):  # an EasyEdit *_results.json, shown beside lmedit runs
        return load_easyedit_results(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ReportError(f"{folder} is not a run folder ({CONFIG_FILE} is missing); pass folders made by lmedit run")
    config = read_json_object(folder / CONFIG_FILE)
    if (folder / SUMMARY_FILE).is_file():
        summary = read_json_object(folder / SUMMARY_FILE)
    else:
        records = read_run_records(folder / RESULTS_FILE)
        if not records:
            raise RunNotStarted(f"{folder} has no finished chunk yet")
        summary = {**summarize(records), "complete": False}
    return {"folder": str(folder), "config": config, "summary": summary}


def read_json_object(path: Path) -> dict[str, Any]:
    """A run folder's JSON file, which must hold one object; a damaged one is a ReportError naming file and line."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is damaged: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); "
                          "run the command that wrote it again, or leave this run folder out") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path} is damaged: it holds a JSON {type(value).__name__}, not a JSON object; "
                          "run the command that wrote it again, or leave this run folder out")
    return value


def read_run_records(path: Path) -> list[dict[str, Any]]:
    """A run's ``results.jsonl`` (newest record per request), checked line by line.

    A torn last line (a run stopped mid-write) is skipped, as the runner does;
    any other line that is not a JSON object with an integer ``index`` is a
    ReportError naming the file and the line number, never an AttributeError.
    """
    from lmedit.runner import read_records

    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if position == len(numbered) - 1:
                continue  # torn by an interrupted write; the runner skips it too
            raise ReportError(f"{path} line {number} is damaged: not valid JSON ({exc.msg}); "
                              "run the command that wrote it again, or leave this run folder out") from None
        if not isinstance(record, dict) or not isinstance(record.get("index"), int):
            kind = "an object without an integer 'index'" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise ReportError(f"{path} line {number} is damaged: {kind}, not a result record; "
                              "run the command that wrote it again, or leave this run folder out")
    return read_records(path)


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
