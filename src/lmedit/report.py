"""Side-by-side tables of finished runs (markdown and JSON), read from their run folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lmedit.runner import CONFIG_FILE, RESULTS_FILE, SUMMARY_FILE, read_records, summarize

COLUMNS = ("rewrite_acc", "rephrase_acc", "locality", "portability")


class ReportError(ValueError):
    """A folder given to the report is not a finished run folder."""


def load_run(folder: str | Path) -> dict[str, Any]:
    """A run's config and summary; a run still in progress is summarised from the chunks written so far."""
    folder = Path(folder)
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


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """One table row: the run's identity, pre and post means, and the edit time per request."""
    config, summary = run["config"], run["summary"]
    row: dict[str, Any] = {
        "method": config["method"], "protocol": config["protocol"], "T": config.get("T"),
        "batch_size": config.get("batch_size", 1), "n": summary["n"], "complete": summary.get("complete", True),
        "eval_mode": config.get("eval", {}).get("mode", "teacher"),
        "seconds_per_edit": summary.get("timing", {}).get("edit_seconds_per_request"),
    }
    for metric in COLUMNS:
        row[f"{metric}_pre"] = summary.get("pre", {}).get(metric)
        row[f"{metric}_post"] = summary.get("post", {}).get(metric)
    return row


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Pre → post per metric (locality is post only: it is defined against the pre-edit model)."""
    header = "| method | protocol | n | rewrite | rephrase | locality | portability | s / edit |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        protocol = row["protocol"] + (f" T={row['T']}" if row["T"] else "")
        if row["protocol"] == "batch" or row["batch_size"] > 1:
            protocol += f" (batch {row['batch_size']})"
        cells = [
            _pre_post(row, "rewrite_acc"), _pre_post(row, "rephrase_acc"),
            _num(row["locality_post"]), _pre_post(row, "portability"),
        ]
        seconds = "—" if row["seconds_per_edit"] is None else f"{row['seconds_per_edit']:.1f}"
        flag = "" if row["complete"] else " (incomplete)"
        lines.append(f"| {row['method']}{flag} | {protocol} | {row['n']} | " + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines) + "\n"


def _pre_post(row: dict[str, Any], metric: str) -> str:
    pre, post = row[f"{metric}_pre"], row[f"{metric}_post"]
    if post is None:
        return "—"
    return f"{_num(pre)} → {_num(post)}" if pre is not None else _num(post)


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"
