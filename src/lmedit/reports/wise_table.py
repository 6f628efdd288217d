"""The WISE paper's Table 2 layout, from sequential run folders (``lmedit report --layout wise-table RUN...``).

Rows are methods; each T has the columns Rel. (rewrite), Gen. (rephrase), Loc.
(locality) and their average, as in the paper. Runs scored by generation as well
(``eval.mode`` ``both``: GRACE, DEFER and WISE in a reproduction) get an extra
``METHOD (gen)`` row; a first ``unedited`` row holds the items' pre-edit scores.
Data without rephrasings (WISE's hallucination passages) gets the hallucination
table instead: Rel. is the perplexity of the edited passages (lower is better).

``lmedit reproduce wise-table`` writes its table with :func:`write_table`, which adds
the cost of each edit along the longest chunk, the retention curves when they
were recorded, and the plots (:mod:`lmedit.reports.plots`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from lmedit.reports import ReportError, register_layout
from lmedit.reports.cells import number

TABLE_NAME = "wise-table"
UNEDITED = "unedited"  # the first row: the items' pre-edit scores (read from any finished run's summary)
WISE_TABLE_METHODS: tuple[str, ...] = ("FT-L", "FT-M", "ROME", "MEMIT", "AlphaEdit", "GRACE", "DEFER", "WISE")  # paper's rows

# (column label, teacher-forced metric, generation metric) per table layout: the WISE paper's Table 2 (zsRE)
# and its hallucination table (Rel. is the perplexity of the edited passages, lower is better).
TABLE_COLUMNS: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "zsre": (("Rel.", "rewrite_acc", "rewrite_gen_acc"), ("Gen.", "rephrase_acc", "rephrase_gen_acc"),
             ("Loc.", "locality", "locality_gen")),
    "hallucination": (("Rel. (PPL)", "rewrite_ppl", None), ("Loc.", "locality", "locality_gen")),
}
# Curves per table layout: accuracies for zsRE; perplexities for passages (the hallucination table's Rel. and TRR).
RETENTION_CURVES: dict[str, tuple[tuple[str, str], ...]] = {
    "zsre": (("edit_retention", "ERR: edits 1..t still held"), ("test_retention", "TRR: held-out answers kept")),
    "hallucination": (("edit_ppl", "PPL of edits 1..t (lower is better)"), ("held_out_ppl", "PPL of held-out passages")),
}
COST_BINS = 4  # the longest run's chunk is cut into this many equal stretches of edits


@dataclass(frozen=True)
class WiseTable:
    """What one table shows (column layout, method rows in order, T groups) and the runs' common setting, which
    titles the table: everything needed to draw it besides the runs themselves."""

    layout: str
    methods: tuple[str, ...]
    Ts: tuple[int, ...]
    model: str = ""
    data: str = ""
    limit: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.layout not in TABLE_COLUMNS:
            raise ReportError(f"table layout {self.layout!r} is not one of {', '.join(TABLE_COLUMNS)}")

    @property
    def columns(self) -> tuple[tuple[str, str, str | None], ...]:
        return TABLE_COLUMNS[self.layout]

    @property
    def groups(self) -> tuple[str, ...]:
        """Column labels of one T group: the metrics, plus their average for the zsRE layout (as in the paper)."""
        labels = tuple(label for label, _, _ in self.columns)
        return labels + ("Avg.",) if self.layout == "zsre" else labels

    @property
    def data_name(self) -> str:
        return Path(self.data).name

    @classmethod
    def from_runs(cls, runs: Sequence[dict[str, Any]]) -> "WiseTable":
        """The table the given runs fill: their methods (in the paper's order), their T values, and their layout
        (zsRE when the data has rephrasings, the hallucination table otherwise)."""
        if not runs:
            raise ReportError("no runs to tabulate; pass the run folders of a reproduction (e.g. runs/wise-table/*)")
        keys = [_run_key(run) for run in runs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            method, T = repeated[0]
            folders = [run["folder"] for run, key in zip(runs, keys) if key == (method, T)]
            raise ReportError(f"more than one run of {method} at T={T} ({', '.join(folders)}); pass one of them")
        given = list(dict.fromkeys(method for method, _ in keys))
        methods = [m for m in WISE_TABLE_METHODS if m in given] + [m for m in given if m not in WISE_TABLE_METHODS]
        configs = [run["config"] for run in runs]
        return cls(layout=_layout_of(runs), methods=tuple(methods), Ts=tuple(sorted({T for _, T in keys})),
                   model=_common(c.get("model") for c in configs), data=_common(c.get("data") for c in configs),
                   limit=_single(c.get("limit") for c in configs), offset=_single(c.get("offset") for c in configs) or 0)


def _run_key(run: dict[str, Any]) -> tuple[str, int]:
    config = run["config"]
    if config.get("T") is None:
        raise ReportError(
            f"{run['folder']} has no T ({config.get('protocol')} protocol): the wise-table layout compares sequential "
            "runs; make them with `lmedit reproduce wise-table` or `lmedit run --protocol sequential --T N`"
        )
    return config["method"], int(config["T"])


def _layout_of(runs: Sequence[dict[str, Any]]) -> str:
    """zsRE-like data has rephrasings (a Gen. column); WISE's hallucination passages have none."""
    phases = [run["summary"].get(phase, {}) for run in runs for phase in ("pre", "post")]
    return "zsre" if any(key.startswith("rephrase_") for values in phases for key in values) else "hallucination"


def _common(values: Any) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values if v is not None))


def _single(values: Any) -> Any:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


# --------------------------------------------------------------------------- the table


def collect_rows(runs: Sequence[dict[str, Any]], table: WiseTable) -> dict[str, Any]:
    """Per method (and generation row) and T, the Rel./Gen./Loc. means of the runs; the seconds per edit."""
    rows: dict[str, dict[str, Any]] = {}
    timing: dict[str, dict[str, Any]] = {}
    for (method, T), run in _in_table_order(runs, table):
        summary = run["summary"]
        mode = run["config"].get("eval", {}).get("mode", "teacher")
        post = summary.get("post", {})
        cell_base = {"n": summary.get("n"), "complete": summary.get("complete", False)}
        if mode in ("teacher", "both"):
            rows.setdefault(method, {})[str(T)] = {**cell_base, **_cell(table, post, generation=False)}
        if mode in ("generate", "both"):
            label = method if mode == "generate" else f"{method} (gen)"
            rows.setdefault(label, {})[str(T)] = {**cell_base, **_cell(table, post, generation=True)}
        timing.setdefault(method, {})[str(T)] = summary.get("timing", {}).get("edit_seconds_per_request")
        if mode in ("teacher", "both") and str(T) not in rows.get(UNEDITED, {}):
            rows.setdefault(UNEDITED, {})[str(T)] = {**cell_base, **_cell(table, summary.get("pre", {}),
                                                                          generation=False, unedited=True)}
    return {"rows": rows, "seconds_per_edit": timing}


def _in_table_order(runs: Sequence[dict[str, Any]], table: WiseTable) -> list[tuple[tuple[str, int], dict[str, Any]]]:
    """The runs the table has a place for, every method at the smallest T first (a reproduction's plan order)."""
    keyed = {_run_key(run): run for run in runs}
    return [((method, T), keyed[method, T]) for T in table.Ts for method in table.methods if (method, T) in keyed]


def _cell(table: WiseTable, post: dict[str, float], *, generation: bool,
          unedited: bool = False) -> dict[str, float | None]:
    """One (row, T) cell; ``unedited``: the pre-edit scores, where locality (agreement with itself) is left out."""
    cell: dict[str, float | None] = {}
    for label, teacher, generated in table.columns:
        metric = generated if generation else teacher
        cell[label] = None if metric is None or (unedited and metric.startswith("locality")) else post.get(metric)
    if "Avg." in table.groups:
        present = [v for v in cell.values() if v is not None]
        cell["Avg."] = sum(present) / len(present) if len(present) == len(table.columns) else None
    return cell


def markdown_table(table: WiseTable, collected: dict[str, Any]) -> str:
    """The paper's layout: one row per method, a Rel./Gen./Loc./Avg. group per T; then seconds per edit."""
    Ts = [str(T) for T in table.Ts]
    groups = table.groups
    header = "| Method | " + " | ".join(f"T={T} {g}" for T in Ts for g in groups) + " |"
    lines = [header, "|---|" + "---|" * (len(Ts) * len(groups))]
    for label, by_T in ordered_rows(collected["rows"], table.methods):
        cells = []
        for T in Ts:
            cell = by_T.get(T)
            flag = "" if cell is None or cell["complete"] else "*"
            cells.extend(number(None if cell is None else cell.get(g)) + flag for g in groups)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Seconds per edit (edit time only, this machine):")
    lines.append("")
    lines.append("| Method | " + " | ".join(f"T={T}" for T in Ts) + " |")
    lines.append("|---|" + "---|" * len(Ts))
    for method in table.methods:
        seconds = collected["seconds_per_edit"].get(method, {})
        lines.append(f"| {method} | " + " | ".join(number(seconds.get(T), 1) for T in Ts) + " |")
    return "\n".join(lines) + "\n"


def table_note(table: WiseTable) -> str:
    """The line under the table: which model, protocol and items it covers, and what the marks mean."""
    return (f"\n{table.model}, sequential protocol, data {table.data_name} (offset {table.offset}, limit "
            f"{table.limit}); teacher-forced unless marked (gen); * = run not finished yet.\n")


def ordered_rows(rows: dict[str, Any], methods: Sequence[str]) -> list[tuple[str, Any]]:
    """The unedited row, then each method's row followed by its (gen) row."""
    order = [UNEDITED] * (UNEDITED in rows) + [label for m in methods for label in (m, f"{m} (gen)") if label in rows]
    return [(label, rows[label]) for label in order]


def base_method(row_label: str) -> str:
    return row_label.removesuffix(" (gen)")


# --------------------------------------------------------------------------- cost and retention along the chunk


def cost_along_chunk(runs: Sequence[dict[str, Any]], table: WiseTable) -> dict[str, Any]:
    """Per method, at its largest finished T: mean seconds per edit over each quarter of the chunk's edits.

    Whether an edit gets slower as edits accumulate (a growing codebook, stored memories, merges) shows here;
    the chunk-wide average in ``seconds_per_edit`` hides it. Each record's own step time is read
    (``step_seconds``; older runs: the method's own ``edit_info.seconds``).
    """
    from lmedit.reports import read_run_records
    from lmedit.runner import RESULTS_FILE

    cost: dict[str, Any] = {}
    for method in table.methods:
        for T, run in _finished_largest_first(runs, table, method):
            curve = _mean_step_seconds_by_position(read_run_records(Path(run["folder"]) / RESULTS_FILE), T)
            if len(curve) >= COST_BINS:
                cost[method] = {"T": T, "bins": _bin_means(curve, COST_BINS), "curve": curve}
                break
    return cost


def _finished_largest_first(runs: Sequence[dict[str, Any]], table: WiseTable,
                            method: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(T, run) of ``method``'s finished runs, largest T first: the longest chunk there is to read a trend from."""
    keyed = {_run_key(run): run for run in runs}
    for T in sorted(table.Ts, reverse=True):
        run = keyed.get((method, T))
        if run is not None and run["summary"].get("complete"):
            yield T, run


def _mean_step_seconds_by_position(records: Sequence[dict[str, Any]], T: int) -> list[float]:
    """Mean step seconds at each position 1..T of a chunk, over the chunks that reached that position."""
    by_chunk: dict[int, list[float]] = {}
    for record in records:
        seconds = record.get("step_seconds", record.get("edit_info", {}).get("seconds"))
        if seconds is None:
            return []
        by_chunk.setdefault(record["chunk"], []).append(float(seconds))
    curve: list[float] = []
    for position in range(T):
        values = [times[position] for times in by_chunk.values() if len(times) > position]
        if not values:
            break
        curve.append(sum(values) / len(values))
    return curve


def _bin_means(curve: Sequence[float], bins: int) -> list[dict[str, Any]]:
    edges = [round(i * len(curve) / bins) for i in range(bins + 1)]
    return [{"edits": f"{lo + 1}-{hi}", "seconds": sum(curve[lo:hi]) / (hi - lo)} for lo, hi in zip(edges, edges[1:])]


def cost_table(cost: dict[str, Any]) -> str:
    """Markdown: seconds per edit in each quarter of the longest chunk, and last quarter over first."""
    if not cost:
        return ""
    lines = ["Seconds per edit along the longest chunk (mean over each quarter of its edits):", "",
             "| Method | T | " + " | ".join(f"Q{i + 1}" for i in range(COST_BINS)) + " | last / first |",
             "|---|---|" + "---|" * (COST_BINS + 1)]
    for method, entry in cost.items():
        seconds = [b["seconds"] for b in entry["bins"]]
        cells = [f"{s:.1f} (edits {b['edits']})" for s, b in zip(seconds, entry["bins"])]
        ratio = seconds[-1] / seconds[0] if seconds[0] > 0 else float("nan")
        lines.append(f"| {method} | {entry['T']} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def retention_curves(runs: Sequence[dict[str, Any]], table: WiseTable) -> dict[str, Any]:
    """Per method, the retention curves (ERR, TRR against t) of its largest finished T that recorded them."""
    from lmedit.lifelong import CURVES_JSON

    metrics = [metric for metric, _ in RETENTION_CURVES[table.layout]]
    found: dict[str, Any] = {}
    for method in table.methods:
        for T, run in _finished_largest_first(runs, table, method):
            if (Path(run["folder"]) / CURVES_JSON).is_file():
                curves = json.loads((Path(run["folder"]) / CURVES_JSON).read_text())["curves"]
                found[method] = {"T": T, **{k: curves[k] for k in ("edits", *metrics)}}
                break
    return found


def retention_table(table: WiseTable, curves: dict[str, Any]) -> str:
    """Markdown: the layout's two retention curves at a few points along each method's longest chunk."""
    if not curves:
        return ""
    metrics = RETENTION_CURVES[table.layout]
    lines = ["Retention along the longest chunk, after edit t:", "",
             "| Method | T | " + " | ".join(f"{title} at t = 10 / 50 / T" for _, title in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for method, entry in curves.items():
        at = {t: i for i, t in enumerate(entry["edits"])}
        points = [t for t in (10, 50, entry["T"]) if t in at]
        cells = [" / ".join(number(entry[metric][at[t]]) for t in points) for metric, _ in metrics]
        lines.append(f"| {method} | {entry['T']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- a reproduction's files


def write_table(out: Path, runs: Sequence[dict[str, Any]], table: WiseTable,
                unfinished: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``wise-table.md``, ``.json`` and ``.png`` (plus the cost and retention plots) in ``out``; returns the JSON.

    ``unfinished``: the plan's runs not finished yet (:func:`lmedit.reproduce.unfinished_runs`), listed below.
    """
    from lmedit.reports.plots import plot_cost, plot_retention, plot_table
    from lmedit.reports.unfinished import unfinished_section

    collected = collect_rows(runs, table)
    cost = cost_along_chunk(runs, table)
    curves = retention_curves(runs, table)
    text = markdown_table(table, collected)
    if cost:
        text += "\n" + cost_table(cost)
    if curves:
        text += "\n" + retention_table(table, curves)
    (out / f"{TABLE_NAME}.md").write_text(text + table_note(table) + unfinished_section(unfinished))
    payload = {"table": TABLE_NAME, "layout": table.layout, "model": table.model, "data": table.data,
               "limit": table.limit, "offset": table.offset, "T": list(table.Ts), **collected,
               "cost_along_chunk": {m: {"T": e["T"], "bins": e["bins"]} for m, e in cost.items()},
               "retention": curves, "unfinished": list(unfinished)}
    (out / f"{TABLE_NAME}.json").write_text(json.dumps(payload, indent=2))
    if collected["rows"]:
        plot_table(table, collected, out / f"{TABLE_NAME}.png")
    if cost:
        plot_cost(table, cost, out / f"{TABLE_NAME}-cost.png")
    if curves:
        plot_retention(table, curves, out / f"{TABLE_NAME}-retention.png")
    return payload


# --------------------------------------------------------------------------- the registered layout


@register_layout("wise-table")
class WiseTableLayout:
    """The WISE paper's Table 2: a row per method (+ (gen) rows), Rel./Gen./Loc./Avg. per T, from sequential runs."""

    def rows(self, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One record per table row: its cells per T, its method's seconds per edit, and the table's setting."""
        table = WiseTable.from_runs(runs)
        collected = collect_rows(runs, table)
        setting = {"layout": table.layout, "model": table.model, "data": table.data, "limit": table.limit,
                   "offset": table.offset}
        return [{"row": label, "method": None if label == UNEDITED else base_method(label), **setting, "cells": by_T,
                 "seconds_per_edit": {} if label == UNEDITED else collected["seconds_per_edit"][base_method(label)]}
                for label, by_T in ordered_rows(collected["rows"], table.methods)]

    def table(self, rows: Sequence[dict[str, Any]]) -> str:
        table, collected = _from_rows(rows)
        return markdown_table(table, collected) + table_note(table)

    def plot(self, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
        from lmedit.reports.plots import plot_table

        return plot_table(*_from_rows(rows), Path(path))


def _from_rows(rows: Sequence[dict[str, Any]]) -> tuple[WiseTable, dict[str, Any]]:
    """The table and its cells back from :meth:`WiseTableLayout.rows` (e.g. as read from ``--out``'s JSON)."""
    if not rows:
        raise ReportError("no rows to tabulate")
    first = rows[0]
    table = WiseTable(layout=first["layout"], methods=tuple(dict.fromkeys(r["method"] for r in rows if r["method"])),
                      Ts=tuple(sorted({int(T) for r in rows for T in r["cells"]})), model=first["model"],
                      data=first["data"], limit=first["limit"], offset=first["offset"])
    collected = {"rows": {r["row"]: r["cells"] for r in rows},
                 "seconds_per_edit": {r["method"]: r["seconds_per_edit"] for r in rows if r["method"]}}
    return table, collected
