"""ROME's CounterFact table (``lmedit report --layout counterfact RUN...``), numbers × 100 as ROME prints them.

Columns: S (ROME's score, the harmonic mean of ES, PS and NS), efficacy (ES),
paraphrase (PS) and neighborhood (NS) scores, their magnitudes (EM, PM, NM) and
the generation entropy (GE), from the ``counterfact`` metric suite; one row per
run and phase (pre, post).
"""

from __future__ import annotations

from statistics import harmonic_mean
from typing import Any, Sequence

from lmedit.reports import register_layout
from lmedit.reports.cells import number, scaled

COUNTERFACT_COLUMNS = (
    ("ES", "cf_efficacy"), ("PS", "cf_paraphrase"), ("NS", "cf_neighborhood"),
    ("EM", "cf_efficacy_magnitude"), ("PM", "cf_paraphrase_magnitude"), ("NM", "cf_neighborhood_magnitude"),
    ("GE", "cf_generation_entropy"),
)


@register_layout("counterfact")
class CounterFactLayout:
    """ROME's CounterFact table: S, ES, PS, NS, magnitudes and GE (× 100), pre and post, one row each per run."""

    def rows(self, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return counterfact_rows(runs)

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        return counterfact_table(rows)


def counterfact_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pre and post CounterFact numbers (× 100) per run, and ROME's score S = hmean(ES, PS, NS)."""
    rows = []
    for run in runs:
        config, summary = run["config"], run["summary"]
        row: dict[str, Any] = {"method": config["method"], "n": summary.get("n"), "folder": run.get("folder"),
                               "complete": summary.get("complete", True)}
        for phase in ("pre", "post"):
            values = summary.get(phase, {})
            for column, key in COUNTERFACT_COLUMNS:
                row[f"{column}_{phase}"] = scaled(values.get(key))
            parts = [row[f"{c}_{phase}"] for c in ("ES", "PS", "NS")]
            row[f"S_{phase}"] = harmonic_mean(parts) if all(p is not None for p in parts) else None
        rows.append(row)
    return rows


def counterfact_table(rows: Sequence[dict[str, Any]]) -> str:
    """ROME's Table (S, ES, PS, NS, magnitudes, GE), one row per run and phase (pre, post)."""
    columns = ["S"] + [c for c, _ in COUNTERFACT_COLUMNS]
    lines = ["| method | n | phase | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for row in rows:
        flag = "" if row["complete"] else " (incomplete)"
        for phase in ("pre", "post"):
            cells = [number(row.get(f"{c}_{phase}"), 1) for c in columns]
            lines.append(f"| {row['method']}{flag} | {row['n']} | {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
