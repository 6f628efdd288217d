"""Teacher-forced and realistic scores side by side (``lmedit report --layout qa RUN...``).

One row per run (post-edit means): EasyEdit's teacher-forced rewrite / rephrase / locality / portability, then
the ``qa`` suite's free-generation scores of the same probes (containment, exact match, F1; locality as agreement
with the model's own pre-edit answer). The gap between the two halves is what "The Mirage of Model Editing" is
about. Runs without ``--suite qa`` show dashes in the second half.
"""

from __future__ import annotations

from typing import Any, Sequence

from lmedit.reports import register_layout
from lmedit.reports.cells import number

TEACHER_COLUMNS = (("rewrite", "rewrite_acc"), ("rephrase", "rephrase_acc"), ("locality", "locality"),
                   ("portability", "portability"))
QA_COLUMNS = (
    ("QA rewrite contains", "rewrite_qa_contains"), ("QA rewrite EM", "rewrite_qa_em"), ("QA rewrite F1", "rewrite_qa_f1"),
    ("QA rephrase contains", "rephrase_qa_contains"), ("QA portability contains", "portability_qa_contains"),
    ("QA locality EM", "locality_qa_em"),
)


@register_layout("qa")
class RealisticLayout:
    """Teacher-forced scores beside the qa suite's free-generation scores, one row per run (post-edit)."""

    def rows(self, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return realistic_rows(runs)

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        return realistic_table(rows)


def realistic_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        config, summary = run["config"], run["summary"]
        post = summary.get("post", {})
        row: dict[str, Any] = {"method": config["method"], "protocol": config.get("protocol"), "n": summary.get("n"),
                               "complete": summary.get("complete", True), "folder": run.get("folder")}
        row.update({label: post.get(key) for label, key in (*TEACHER_COLUMNS, *QA_COLUMNS)})
        rows.append(row)
    return rows


def realistic_table(rows: Sequence[dict[str, Any]]) -> str:
    labels = [label for label, _ in (*TEACHER_COLUMNS, *QA_COLUMNS)]
    lines = ["| method | protocol | n | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    for row in rows:
        flag = "" if row["complete"] else " (incomplete)"
        cells = [number(row.get(label), 3) for label in labels]
        lines.append(f"| {row['method']}{flag} | {row['protocol']} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
