"""The default report: finished runs side by side, pre → post per core metric and the edit time."""

from __future__ import annotations

from typing import Any, Sequence

from lmedit.reports import register_layout
from lmedit.reports.cells import number

COLUMNS = ("rewrite_acc", "rephrase_acc", "locality", "portability")


@register_layout("default")
class DefaultLayout:
    """Any runs side by side: pre → post of rewrite, rephrase, portability; post locality; seconds per edit."""

    def rows(self, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [run_row(run) for run in runs]

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        return markdown_table(rows)


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """One table row: the run's identity, pre and post means, and the edit time per request."""
    config, summary = run["config"], run["summary"]
    row: dict[str, Any] = {
        "method": config["method"], "protocol": config["protocol"], "T": config.get("T"),
        "batch_size": config.get("batch_size", 1), "n": summary["n"], "complete": summary.get("complete", True),
        "eval_mode": config.get("eval", {}).get("mode", "teacher"),
        "seconds_per_edit": summary.get("timing", {}).get("edit_seconds_per_request"),
        "dtype": config.get("dtype", "float32"),
        "peak_memory_mib": peak_memory_mib(summary),
    }
    for metric in COLUMNS:
        row[f"{metric}_pre"] = summary.get("pre", {}).get(metric)
        row[f"{metric}_post"] = summary.get("post", {}).get(metric)
    return row


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Pre → post per metric (locality is post only: it is defined against the pre-edit model)."""
    header = "| method | protocol | n | rewrite | rephrase | locality | portability | s / edit | dtype | peak MiB |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        protocol = row["protocol"] + (f" T={row['T']}" if row["T"] else "")
        if row["protocol"] == "batch" or row["batch_size"] > 1:
            protocol += f" (batch {row['batch_size']})"
        cells = [
            _pre_post(row, "rewrite_acc"), _pre_post(row, "rephrase_acc"),
            number(row["locality_post"], 3), _pre_post(row, "portability"),
        ]
        flag = "" if row["complete"] else " (incomplete)"
        seconds = number(row["seconds_per_edit"], 1)
        memory = number(row["peak_memory_mib"], 0)
        lines.append(f"| {row['method']}{flag} | {protocol} | {row['n']} | " + " | ".join(cells)
                     + f" | {seconds} | {row['dtype']} | {memory} |")
    return "\n".join(lines) + "\n"


def peak_memory_mib(summary: dict[str, Any]) -> float | None:
    """The run's peak memory in MiB: the CUDA allocator's peak when it ran on GPUs, else the process's peak RSS."""
    memory = summary.get("memory") or {}
    peak = memory.get("cuda_peak_allocated_bytes", memory.get("cpu_peak_rss_bytes"))
    return None if peak is None else peak / 2**20


def _pre_post(row: dict[str, Any], metric: str) -> str:
    pre, post = row[f"{metric}_pre"], row[f"{metric}_post"]
    if post is None:
        return "—"
    return f"{number(pre, 3)} → {number(post, 3)}" if pre is not None else number(post, 3)
