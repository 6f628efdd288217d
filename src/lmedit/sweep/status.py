"""``lmedit report --sweep DIR``: one table over a sweep's jobs, finished or still running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmedit.sweep.engine import PLAN_FILE
from lmedit.sweep.plan import SweepError

HEADLINE = ("rewrite_acc", "rephrase_acc", "locality")


def sweep_rows(root: str | Path) -> list[dict[str, Any]]:
    """Per job: its settings, chunks written / all, and the mean of the chunk means of the headline scores so far."""
    from lmedit.reports import read_run_records
    from lmedit.runner import RESULTS_FILE, summarize

    root = Path(root)
    plan_path = root / PLAN_FILE
    if not plan_path.is_file():
        raise SweepError(f"{root} is not a sweep folder ({PLAN_FILE} is missing); pass the folder `lmedit sweep` wrote")
    plan = json.loads(plan_path.read_text())
    rows = []
    for job in plan.get("jobs", []):
        records = read_run_records(root / job["name"] / RESULTS_FILE)
        summary = summarize(records) if records else {}
        done = len({r["chunk"] for r in records})
        means = summary.get("chunk_mean", {}).get("post", {})
        rows.append({"job": job["name"], "method": job["label"] or job["method"], "model": job["model"],
                     "data": _data_window(job), "protocol": job.get("protocol"),
                     "T": job["T"], "seed": job["seed"], "eval": job["eval_mode"],
                     "chunks_done": done, "chunks_total": job.get("chunks"),
                     "complete": (root / job["name"] / "summary.json").is_file() and done == job.get("chunks"),
                     **{k: means.get(k) for k in HEADLINE}})
    return rows


def _data_window(job: dict[str, Any]) -> str | None:
    """The job's data file and its items, e.g. ``ZsRE-test-all.json[1000:1020]``: one sweep may cross several."""
    if not job.get("data"):
        return None
    offset, limit = job.get("offset") or 0, job.get("limit")
    return f"{Path(job['data']).name}[{offset}:{'' if limit is None else offset + limit}]"


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The rows as markdown, with totals of chunks written."""
    columns = ["method", "model", "data", "protocol", "T", "seed", "eval", "chunks", *HEADLINE]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        shown = {**row, "chunks": f"{row['chunks_done']}/{row['chunks_total'] or '?'}"}
        cells = [("—" if shown[c] is None else f"{shown[c]:.3f}") if c in HEADLINE
                 else str(shown[c] if shown[c] is not None else "—") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    done = sum(r["chunks_done"] for r in rows)
    total = sum(r["chunks_total"] or 0 for r in rows)
    finished = sum(bool(r["complete"]) for r in rows)
    lines.append("")
    lines.append(f"{finished} of {len(rows)} jobs complete; {done} of {total} chunks written. "
                 "Scores: mean of the chunk means so far (post-edit, teacher-forced).")
    return "\n".join(lines) + "\n"
