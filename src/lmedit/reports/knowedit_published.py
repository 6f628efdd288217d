"""KnowEdit's published Table 4 (LLaMA-2-7B) and how a reproduction's rows compare with it.

The values are those of EasyEdit's README "Editing Performance" table (zjunlp/EasyEdit at commit 14cea82,
2026-07-14), which the authors updated on 2024-11-19 after fixing ROME/MEMIT bugs; arXiv v1-v3 of the KnowEdit
paper (Zhang et al., 2024, arXiv:2401.01286) print older numbers. Single edits, LLaMA-2-7B, × 100.

For each (dataset, metric) row the comparison takes the methods that have both a reproduced and a published
value and reports Kendall's τ between the two orderings (ties count as neither concordant nor discordant) and
whether the two orders are the same. ConvSent's locality is left out: lmedit reports a KL divergence (lower is
better) and the scale of KnowEdit's published ConvSent locality is not documented.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Mapping, Sequence

PUBLISHED_METHODS = ("SERAC", "ICE", "AdaLoRA", "MEND", "ROME", "MEMIT", "FT-L", "FT-M")


def _row(*values: float) -> dict[str, float]:
    return dict(zip(PUBLISHED_METHODS, values))


PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "WikiData_recent": {
        "Edit Succ.": _row(98.68, 60.74, 100.00, 95.75, 97.18, 97.05, 55.75, 100.00),
        "Portability": _row(63.52, 36.93, 64.69, 55.88, 55.25, 56.37, 40.86, 65.44),
        "Locality": _row(100.00, 33.34, 56.42, 94.76, 54.77, 52.15, 43.70, 64.33),
        "Fluency": _row(553.19, 531.01, 579.57, 557.11, 579.66, 573.89, 529.24, 574.32),
    },
    "ZsRE": {
        "Edit Succ.": _row(99.67, 66.01, 100.00, 96.74, 96.77, 95.37, 53.93, 99.98),
        "Portability": _row(56.48, 63.94, 58.03, 60.41, 52.63, 52.67, 45.64, 60.31),
        "Locality": _row(30.23, 23.14, 75.76, 92.79, 53.67, 48.32, 73.42, 89.78),
        "Fluency": _row(410.89, 541.14, 563.56, 524.33, 573.75, 563.31, 493.01, 552.26),
    },
    "WikiBio": {
        "Edit Succ.": _row(99.69, 95.53, 100.00, 93.66, 96.08, 94.40, 66.33, 100.00),
        "Locality": _row(69.79, 47.90, 81.28, 69.51, 62.74, 61.51, 79.86, 93.38),
        "Fluency": _row(606.95, 632.92, 618.45, 609.39, 617.69, 616.65, 606.95, 612.69),
    },
    "WikiData_counterfact": {
        "Edit Succ.": _row(99.99, 69.83, 100.00, 80.03, 98.57, 98.05, 45.15, 100.00),
        "Portability": _row(76.07, 45.32, 69.89, 52.01, 55.92, 58.56, 33.60, 74.36),
        "Locality": _row(98.96, 32.38, 70.31, 94.38, 51.97, 46.62, 50.48, 76.76),
        "Fluency": _row(549.91, 547.22, 580.29, 555.72, 584.04, 575.96, 528.26, 575.62),
    },
    "ConvSent": {
        "Edit Succ.": _row(62.75, 52.78, 44.89, 50.76, 45.79, 44.75, 49.50, 46.10),
        "Fluency": _row(458.21, 621.45, 606.42, 379.43, 606.32, 602.62, 607.86, 592.52),
    },
    "Sanitation": {
        "Edit Succ.": _row(0.00, 72.50, 2.50, 0.00, 85.00, 48.75, 0.00, 75.00),
        "Locality": _row(100.00, 56.58, 65.50, 5.29, 50.31, 67.47, 14.78, 47.07),
        "Fluency": _row(416.29, 794.15, 330.44, 407.18, 465.12, 466.10, 439.10, 416.29),
    },
}


# lmedit's name for a method the published table names otherwise. KnowEdit's "ICE" is EasyEdit's in-context editor,
# `models/ike` (the same code serves `--editing_method IKE`), which is lmedit's IKE. Its "AdaLoRA" column is EasyEdit's
# LoRA with `lora_type: adalora`, which is lmedit's AdaLoRA; lmedit's LoRA (plain LoRA) has no published column.
PUBLISHED_NAME = {"IKE": "ICE"}


# lmedit's rows of EasyEdit's own Sanitation protocol, where the published Sanitation values come from
PUBLISHED_ROW = {"Sanitation-EasyEdit": "Sanitation", "Sanitation (EasyEdit)": "Sanitation"}


def published_value(dataset: str, metric: str, method: str) -> float | None:
    """The published value of lmedit's ``method`` (its name, or the published one) on that row; None if none."""
    row = PUBLISHED.get(PUBLISHED_ROW.get(dataset, dataset), {})
    return row.get(metric, {}).get(PUBLISHED_NAME.get(method, method))


def kendall_tau(ours: Sequence[float], theirs: Sequence[float]) -> float | None:
    """Kendall's τ-a over the pairs (ties in either list count as neither); None for fewer than two items."""
    pairs = list(combinations(range(len(ours)), 2))
    if not pairs:
        return None
    score = 0
    for i, j in pairs:
        a, b = ours[i] - ours[j], theirs[i] - theirs[j]
        score += (a * b > 0) - (a * b < 0)
    return score / len(pairs)


def same_order(ours: Sequence[float], theirs: Sequence[float]) -> bool:
    """Every pair of methods compares the same way in both (a tie in one must be a tie in the other)."""
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    return all(sign(ours[i] - ours[j]) == sign(theirs[i] - theirs[j]) for i, j in combinations(range(len(ours)), 2))


def ranking(values: Mapping[str, float]) -> str:
    """Methods best first, ties joined by '='."""
    groups: dict[float, list[str]] = {}
    for method, value in values.items():
        groups.setdefault(value, []).append(method)
    return " > ".join(" = ".join(groups[v]) for v in sorted(groups, reverse=True))


def ordering_comparison(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per (dataset, metric): the shared methods, both rankings (best first, ties as '='), Kendall's τ and whether
    every pair of methods compares the same way in both."""
    comparisons = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for metric in metrics:
            ours = {r["method"]: r.get(metric) for r in rows if r["dataset"] == dataset and r.get(metric) is not None}
            shared = [m for m in ours if published_value(dataset, metric, m) is not None]
            if len(shared) < 2:
                continue
            our_values = [float(ours[m]) for m in shared]
            their_values = [published_value(dataset, metric, m) for m in shared]
            tau = kendall_tau(our_values, their_values)  # type: ignore[arg-type]
            comparisons.append({"dataset": dataset, "metric": metric, "methods": shared,
                                "ours": ranking(dict(zip(shared, our_values))),
                                "published": ranking(dict(zip(shared, their_values))),  # type: ignore[arg-type]
                                "kendall_tau": tau, "same_order": same_order(our_values, their_values)})
    return comparisons


def comparison_table(comparisons: Sequence[Mapping[str, Any]]) -> str:
    """The ordering comparison as markdown, one line per (dataset, metric)."""
    lines = ["| Dataset | Metric | methods | lmedit order (best first) | published order | Kendall τ | same order |",
             "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        tau = "—" if c["kendall_tau"] is None else f"{c['kendall_tau']:+.2f}"
        lines.append(f"| {c['dataset']} | {c['metric']} | {len(c['methods'])} | {c['ours']} | {c['published']} | "
                     f"{tau} | {'yes' if c['same_order'] else 'no'} |")
    return "\n".join(lines) + "\n"
