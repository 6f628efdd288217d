"""KnowEdit's table (``lmedit report --layout knowedit RUN...``), numbers printed as KnowEdit prints them.

KnowEdit (EasyEdit's ``examples/run_knowedit_llama2.py::eval``): per dataset,
rows *Edit Succ.*, *Portability*, *Locality*, *Fluency* and one column per
method, all post-edit, as percentages (× 100; fluency × 100 as well):

* Edit Succ. = mean ``rewrite_acc``;
* Portability = mean over requests that have portability probes of the
  request's mean over its groups (Reasoning, Subject_Aliasing,
  Logical_Generalization) of each group's mean; Locality the same over
  Relation_Specificity and Forgetfulness. These are the core evaluator's
  per-request ``portability`` and ``locality``, averaged over the requests
  that have them;
* Fluency = mean n-gram entropy (``--suite fluency``).

Below Portability and Locality, each KnowEdit group gets its own row
(``· Reasoning``, ``· Relation_Specificity``, ...), as the KnowEdit paper
reports them; Relation_Specificity is same-subject locality (the edited
subject's other facts). Runs with ``--suite qa`` add the realistic
generation scores of the edit prompt, ``Edit Succ. (QA EM)`` and
``Edit Succ. (QA F1)``. Rows no run has are left out.

For ConvSent, Edit Succ. is the edit score ``es`` and Locality is the mean
KL divergence of the ``convsent`` suite (nats, lower is better; it is shown
as is, not × 100, with four decimals).

Runs of EasyEdit's Sanitation protocol (``--format sanitation-easyedit``:
the training file's questions edited, the test file's scored) are the row
*Sanitation (EasyEdit)*: there Edit Succ. is EasyEdit's success, whether the
greedy answer to a *test* question with the edited answer contains "I don't
know" (``rephrase_qa_contains`` of ``--suite qa``), and the row *· edited
questions* is the teacher-forced accuracy on the edited questions themselves.
Its Locality is generated too, as EasyEdit's is: the token F1 of each kept
question's greedy answer against the model's own pre-edit answer
(``locality_qa_f1``); the row *· teacher-forced* is the usual locality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lmedit.reports import register_layout
from lmedit.reports.cells import number, scaled

KNOWEDIT_DATASETS = {
    "zsre-test-all": "ZsRE",
    "wikibio-test-all": "WikiBio",
    "wikibio-train-all": "WikiBio (train)",
    "blender_test": "ConvSent",
    "blender_val": "ConvSent (val)",
    "recent_test": "WikiData_recent",
    "test_cf": "WikiData_counterfact",
    "trivia_qa_test": "Sanitation",
    "trivia_qa_train": "Sanitation (train)",
}
PORTABILITY_GROUPS = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
LOCALITY_GROUPS = ("Relation_Specificity", "Forgetfulness")
# (row label, summary metric) in print order; ConvSent's rows are set apart in knowedit_values
KNOWEDIT_ROWS: tuple[tuple[str, str], ...] = (
    ("Edit Succ.", "rewrite_acc"),
    ("· edited questions", ""),  # only the Sanitation (EasyEdit) row has it (knowedit_values)
    ("Edit Succ. (QA EM)", "rewrite_qa_em"),
    ("Edit Succ. (QA F1)", "rewrite_qa_f1"),
    ("Portability", "portability"),
    *((f"· {g}", f"portability/{g}") for g in PORTABILITY_GROUPS),
    ("Locality", "locality"),
    ("· teacher-forced", ""),  # only the Sanitation (EasyEdit) row has it (knowedit_values)
    *((f"· {g}", f"locality/{g}") for g in LOCALITY_GROUPS),
    ("Fluency", "fluency"),
)
KNOWEDIT_METRICS = tuple(label for label, _ in KNOWEDIT_ROWS)


@register_layout("knowedit")
class KnowEditLayout:
    """KnowEdit's Table 4: per dataset, Edit Succ. / Portability / Locality / Fluency rows, one column per method."""

    def rows(self, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return knowedit_rows(runs)

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        return knowedit_table(rows)


SANITATION_EASYEDIT = "Sanitation (EasyEdit)"


def dataset_label(config: dict[str, Any]) -> str:
    if (config.get("extra") or {}).get("data_format") == "sanitation-easyedit":
        return SANITATION_EASYEDIT
    data = config.get("data") or "demo"
    stem = Path(str(data)).stem
    return KNOWEDIT_DATASETS.get(stem.lower(), KNOWEDIT_DATASETS.get(stem, stem))


def knowedit_values(summary: dict[str, Any], dataset: str = "") -> dict[str, float | None]:
    """The four KnowEdit numbers of one run (post-edit means), scaled as KnowEdit prints them."""
    post = summary.get("post", {})
    if dataset == SANITATION_EASYEDIT:  # EasyEdit's success is on the test questions, by generation
        values = {label: scaled(post.get(metric)) for label, metric in KNOWEDIT_ROWS if metric}
        values.update({"Edit Succ.": scaled(post.get("rephrase_qa_contains")),
                       "· edited questions": scaled(post.get("rewrite_acc")),
                       "Edit Succ. (QA EM)": None, "Edit Succ. (QA F1)": None,
                       "Locality": scaled(post.get("locality_qa_f1")), "· teacher-forced": scaled(post.get("locality"))})
        return values
    if "convsent_es" in post:
        return {
            "Edit Succ.": scaled(post.get("convsent_es")),
            "Portability": None,
            "Locality": scaled(post.get("convsent_kl"), 1.0),
            "Fluency": scaled(post.get("fluency")),
        }
    return {label: scaled(post.get(metric)) if metric else None for label, metric in KNOWEDIT_ROWS}


def knowedit_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per run: dataset, method, n and the four values (the JSON written next to the table)."""
    rows = []
    for run in runs:
        config, summary = run["config"], run["summary"]
        dataset = dataset_label(config)
        rows.append({
            "dataset": dataset, "method": config["method"], "protocol": config.get("protocol"),
            "n": summary.get("n"), "complete": summary.get("complete", True), "folder": run.get("folder"),
            **knowedit_values(summary, dataset), **run_cost(summary),
        })
    return rows


def run_cost(summary: dict[str, Any]) -> dict[str, float | None]:
    """Seconds per edit, and the run's minutes of work: every edit and post-edit score, plus the pre-edit capture.

    Edits and scores are summed from the records, so a run resumed over several sessions counts them all; the
    capture is the last session's (a resumed run captures only what it still needs).
    """
    timing = summary.get("timing", {})
    parts = [timing.get(k) for k in ("edit_seconds_total", "post_eval_seconds_total", "pre_eval_seconds_this_session")]
    minutes = sum(parts) / 60 if all(isinstance(p, (int, float)) for p in parts) else None
    return {"seconds_per_edit": timing.get("edit_seconds_per_request"), "work_minutes": minutes}


def cost_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per dataset and method: seconds per edit and minutes of work (``s/edit · min``), and each dataset's total."""
    methods = list(dict.fromkeys(_method_label(r, rows) for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = ["| Dataset | " + " | ".join(methods) + " | total min |", "|---|" + "---|" * (len(methods) + 1)]
    for dataset in datasets:
        mine = {_method_label(r, rows): r for r in rows if r["dataset"] == dataset}
        cells = [f"{number(mine[m]['seconds_per_edit'], 1)} · {number(mine[m]['work_minutes'], 1)}" if m in mine
                 else "—" for m in methods]
        total = sum(r["work_minutes"] for r in mine.values() if r["work_minutes"] is not None)
        lines.append(f"| {dataset} | " + " | ".join(cells) + f" | {total:.1f} |")
    return "\n".join(lines) + "\n"


def knowedit_table(rows: Sequence[dict[str, Any]], published: bool = False) -> str:
    """KnowEdit's Table 4 layout: dataset × metric rows, one column per method.

    ``published``: each cell also shows KnowEdit's published LLaMA-2-7B value in parentheses, where there is one
    (:mod:`lmedit.reports.knowedit_published`).
    """
    from lmedit.reports.knowedit_published import published_value

    methods: list[str] = []
    for row in rows:
        label = _method_label(row, rows)
        if label not in methods:
            methods.append(label)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    lines = ["| Dataset | Metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for dataset in datasets:
        mine = {(_method_label(r, rows)): r for r in rows if r["dataset"] == dataset}
        n = sorted({r["n"] for r in mine.values()})
        first = True
        for metric in KNOWEDIT_METRICS:
            kl = metric == "Locality" and dataset.startswith("ConvSent")
            # KL is in nats and small: four decimals, so a small nonzero KL never prints as EasyEdit's 0.00
            cells = [number(mine.get(m, {}).get(metric), 4 if kl else 2) for m in methods]
            if all(c == "—" for c in cells):
                continue
            if published:
                reference = [published_value(dataset, metric, mine[m]["method"]) if m in mine else None for m in methods]
                cells = [c if ref is None else f"{c} ({ref:.2f})" for c, ref in zip(cells, reference)]
            name = f"{dataset} (n={'/'.join(map(str, n))})" if first else ""
            first = False
            label = "Locality (KL ↓)" if kl else metric
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _method_label(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    twins = [r for r in rows if r["dataset"] == row["dataset"] and r["method"] == row["method"]]
    label = row["method"] if len(twins) == 1 else f"{row['method']} ({Path(str(row['folder'])).name})"
    return label + ("" if row.get("complete", True) else " (incomplete)")
