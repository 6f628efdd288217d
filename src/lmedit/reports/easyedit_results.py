"""EasyEdit's result files (``*_results.json``) read as runs, so one report shows them beside lmedit runs.

EasyEdit's scripts ``json.dump`` the ``metrics`` list that ``BaseEditor.edit`` returns: one dict per
request with ``case_id``, ``requested_rewrite``, ``time`` (edit seconds), and ``pre`` / ``post``
holding ``rewrite_acc`` and ``rephrase_acc`` (each a list of token accuracies or a number),
``locality: {<name>_acc: [...]}`` (post only: agreement with the pre-edit outputs) and
``portability: {<name>_acc: [...]}``. Averaged as EasyEdit's ``summary_metrics`` does (a list
inside a request first, then over requests); the ``locality`` and ``portability`` columns are the
mean over a request's groups, then over requests (lmedit's definition; with one group, EasyEdit's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["EASYEDIT_PROTOCOL", "is_easyedit_results", "load_easyedit_results", "summarize_easyedit_metrics"]

EASYEDIT_PROTOCOL = "easyedit"  # the protocol column of a row read from an EasyEdit file (it does not record its own)
SCALAR_KEYS = ("rewrite_acc", "rephrase_acc", "rewrite_ppl", "ood_acc")
GROUP_SECTIONS = ("locality", "portability")


def is_easyedit_results(path: str | Path) -> bool:
    """True for a JSON file holding EasyEdit's list of per-request metrics (read only when the name ends in .json)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".json":
        return False
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return _is_metrics_list(value)


def _is_metrics_list(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "post" in value[0]
            and ("case_id" in value[0] or "requested_rewrite" in value[0]))


def load_easyedit_results(path: str | Path) -> dict[str, Any]:
    """The file as a run (``folder``, ``config``, ``summary``), like :func:`lmedit.reports.load_run` returns."""
    from lmedit.reports import ReportError

    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path} as an EasyEdit results file: {exc}") from None
    if not _is_metrics_list(records) or not all(isinstance(r, dict) and "post" in r for r in records):
        raise ReportError(f"{path} is not an EasyEdit results file (a JSON list of dicts with 'case_id', "
                          "'requested_rewrite', 'pre' and 'post')")
    method = path.stem[: -len("_results")] if path.stem.endswith("_results") else "EasyEdit"
    config = {"method": f"{method} (EasyEdit file)", "protocol": EASYEDIT_PROTOCOL, "T": None, "batch_size": 1,
              "source": "easyedit", "data": str(path)}
    return {"folder": str(path), "config": config, "summary": summarize_easyedit_metrics(records)}


def summarize_easyedit_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over requests of each phase's metrics, in the shape of an lmedit run summary."""
    summary: dict[str, Any] = {"n": len(records), "complete": True}
    for phase in ("pre", "post"):
        rows = [_request_metrics(r.get(phase)) for r in records if isinstance(r.get(phase), dict)]
        if rows:
            summary[phase] = _means(rows)
    times = [float(r["time"]) for r in records if isinstance(r.get("time"), (int, float))]
    summary["timing"] = {"edit_seconds_total": sum(times),
                         "edit_seconds_per_request": sum(times) / len(times) if times else None}
    return summary


def _request_metrics(phase: dict[str, Any]) -> dict[str, float]:
    """One request's numbers: scalars (a list averaged first), and per group and overall for locality/portability."""
    row: dict[str, float] = {}
    for key in SCALAR_KEYS:
        value = _mean(phase.get(key))
        if value is not None:
            row[key] = value
    for section in GROUP_SECTIONS:
        groups = phase.get(section)
        if not isinstance(groups, dict):
            continue
        means = {name[: -len("_acc")]: _mean(v) for name, v in groups.items() if name.endswith("_acc")}
        means = {name: v for name, v in means.items() if v is not None}
        for name, value in means.items():
            row[f"{section}/{name}"] = value
        if means:
            row[section] = sum(means.values()) / len(means)
    return row


def _mean(value: Any) -> float | None:
    """A number, or the mean of a (nested) list of numbers; None for anything else or an empty list."""
    flat = list(_numbers(value))
    return sum(flat) / len(flat) if flat else None


def _numbers(value: Any) -> Iterable[float]:
    if isinstance(value, bool):
        yield float(value)
    elif isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


def _means(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = sorted({key for row in rows for key in row})
    return {key: sum(r[key] for r in rows if key in r) / sum(1 for r in rows if key in r) for key in keys}
