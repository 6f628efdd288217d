"""Figures of the reports: one figure helper, the WISE table's plots, and a run's retention curves.

Every figure is drawn on its own Agg canvas (no pyplot state, safe in any
process); without matplotlib (the ``plot`` extra) a plot is skipped with a
warning and its function returns None. Causal-tracing heatmaps belong to the
analysis and live in :mod:`lmedit.analysis.plots`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from lmedit.reports.wise_table import WiseTable

LOG = logging.getLogger(__name__)


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot state), or None with a warning when matplotlib is missing."""
    from lmedit.analysis.plots import PlotDependencyError, require_matplotlib

    try:
        require_matplotlib()
    except PlotDependencyError as exc:
        LOG.warning("%s; skipping the plot", exc)
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def style_axis(axis: Any, metric: str, xlabel: str, title: str) -> None:
    """Perplexities on a log scale, accuracies on [0, 1]."""
    if metric.endswith("_ppl"):
        axis.set_yscale("log")
    else:
        axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)


def row_colors(methods: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per method (its (gen) row shares it, dashed), grey for the unedited row: the same method has
    the same colour in every panel, however many rows there are."""
    import matplotlib

    from lmedit.reports.wise_table import UNEDITED

    tab10 = matplotlib.colormaps["tab10"]
    palette = [tab10(i) for i in range(10) if i != 7]  # tab10's 8th colour is the unedited row's grey
    if len(methods) > len(palette):
        tab20 = matplotlib.colormaps["tab20"]
        palette = [tab20(i) for i in range(20) if i not in (14, 15)]  # tab20's greys
    colors: dict[str, Any] = {UNEDITED: "0.45"}
    colors.update({method: palette[i % len(palette)] for i, method in enumerate(methods)})
    return colors


# --------------------------------------------------------------------------- the WISE table


def plot_table(table: "WiseTable", collected: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric (Rel., Gen., Loc.): value against T for each method row."""
    from lmedit.reports.wise_table import UNEDITED, base_method, ordered_rows

    figure = new_figure(12, 3.8)
    if figure is None:
        return None
    axes = figure.subplots(1, len(table.columns))
    colors = row_colors(table.methods)
    legend: dict[str, Any] = {}
    for axis, (label, metric, _) in zip(axes, table.columns):
        for row_label, by_T in ordered_rows(collected["rows"], table.methods):
            points = [(T, by_T[str(T)].get(label)) for T in table.Ts
                      if str(T) in by_T and by_T[str(T)].get(label) is not None]
            if points:
                (line,) = axis.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=4,
                                    color=colors[base_method(row_label)], label=row_label,
                                    linestyle=":" if row_label == UNEDITED else "--" if row_label.endswith("(gen)") else "-")
                legend.setdefault(row_label, line)
        axis.set_xscale("log")
        axis.set_xticks(list(table.Ts), [str(T) for T in table.Ts])
        style_axis(axis, metric, "T (edits before evaluation)", label)
    axes[0].set_ylabel("score")
    if legend:  # one legend for all panels: a row missing from one panel (unedited has no Loc.) must not shift colours
        axes[-1].legend(list(legend.values()), list(legend.keys()), fontsize=7, loc="best")
    figure.suptitle(f"{table.model}: sequential editing on {table.data_name} ({table.limit} items)")
    return _save(figure, path)


def plot_cost(table: "WiseTable", cost: dict[str, Any], path: Path) -> Path | None:
    """Seconds per edit against the edit's position in the chunk (running mean over 5), one line per method."""
    figure = new_figure(7, 4)
    if figure is None or not cost:
        return None
    axis = figure.subplots(1, 1)
    colors = row_colors(table.methods)
    for method, entry in cost.items():
        curve = entry["curve"]
        smooth = [sum(curve[max(0, i - 4): i + 1]) / len(curve[max(0, i - 4): i + 1]) for i in range(len(curve))]
        axis.plot(range(1, len(curve) + 1), smooth, color=colors[method], label=f"{method} (T={entry['T']})")
    axis.set_xlabel("edit number in the chunk")
    axis.set_ylabel("seconds per edit (running mean of 5)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    axis.set_title(f"{table.model}: cost of each edit as edits accumulate")
    return _save(figure, path)


def plot_retention(table: "WiseTable", curves: dict[str, Any], path: Path) -> Path | None:
    """ERR (left) and TRR (right) against the number of edits, one line per method."""
    from lmedit.reports.wise_table import RETENTION_CURVES

    figure = new_figure(11, 4)
    if figure is None or not curves:
        return None
    axes = figure.subplots(1, len(RETENTION_CURVES[table.layout]))
    colors = row_colors(table.methods)
    for axis, (metric, title) in zip(axes, RETENTION_CURVES[table.layout]):
        for method, entry in curves.items():
            points = [(t, v) for t, v in zip(entry["edits"], entry[metric]) if v is not None]
            axis.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=3,
                      color=colors[method], label=f"{method} (T={entry['T']})")
        style_axis(axis, metric, "edits made (t)", title)
    axes[-1].legend(fontsize=7, loc="best")
    figure.suptitle(f"{table.model}: retention as edits accumulate ({table.data_name})")
    return _save(figure, path)


# --------------------------------------------------------------------------- one run's retention curves


def plot_curves(curves: dict[str, Any], metrics: Mapping[str, tuple[str, bool]], path: str | Path,
                title: str = "") -> Path | None:
    """Accuracies (left) and perplexities (right, log scale) against the number of edits.

    ``metrics`` maps each curve in ``curves`` to (its label, whether it is a perplexity).
    """
    figure = new_figure(10, 4)
    if figure is None:
        return None
    accuracy, perplexity = figure.subplots(1, 2)
    edits = curves["edits"]
    for metric, (label, is_ppl) in metrics.items():
        points = [(t, v) for t, v in zip(edits, curves.get(metric, [])) if v is not None]
        if points:
            axis = perplexity if is_ppl else accuracy
            axis.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=3, label=label)
    accuracy.set_ylim(-0.02, 1.02)
    accuracy.set_ylabel("accuracy")
    perplexity.set_yscale("log")
    perplexity.set_ylabel("perplexity")
    for axis in (accuracy, perplexity):
        axis.set_xlabel("number of edits")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _save(figure: Any, path: str | Path) -> Path:
    figure.tight_layout()
    figure.savefig(str(path))
    return Path(path)
