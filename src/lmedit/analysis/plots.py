"""Heatmaps of causal traces, drawn like ROME's Figures 1 and 2.

matplotlib is an optional dependency (the ``plot`` extra). It is imported only
inside the functions, through ``matplotlib.figure.Figure`` and the Agg canvas,
so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from lmedit.analysis.tracing import CATEGORIES, CATEGORY_LABELS, FactTrace, KindSummary

__all__ = ["PlotDependencyError", "plot_fact_heatmap", "plot_summary_heatmap", "require_matplotlib"]

COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_NAMES = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}
INSTALL_HINT = 'pip install "lmedit[plot]"  (or: pip install "matplotlib>=3.8")'


class PlotDependencyError(RuntimeError):
    """matplotlib is missing; the message says how to install it."""


def require_matplotlib() -> None:
    """Fail early, with the install command, when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotDependencyError(f"plotting needs matplotlib, which is not installed. Install it with: {INSTALL_HINT}")


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(figure)
    return figure


def _xlabel(kind: str, window: int, model_name: str) -> str:
    if kind == "hidden":
        return f"single restored layer within {model_name}"
    return f"center of interval of {window} restored {KIND_NAMES[kind]} layers"


def _layer_ticks(axis: Any, num_layers: int) -> None:
    step = 5 if num_layers > 12 else 1
    axis.set_xticks([0.5 + i for i in range(0, num_layers, step)])
    axis.set_xticklabels([str(i) for i in range(0, num_layers, step)])


def plot_summary_heatmap(
    summary: KindSummary, path: str | Path, *, window: int = 10, model_name: str = "the model"
) -> Path:
    """Average indirect effect by token category (rows) and layer (columns); empty categories stay blank."""
    import numpy as np

    figure = _figure(6.0, 2.6)
    axis = figure.add_subplot(1, 1, 1)
    values = np.ma.masked_invalid(summary.mean_effect.numpy())
    finite = [float(v) for v in summary.mean_effect.flatten() if not math.isnan(float(v))]
    top = max(finite, default=0.0)
    mesh = axis.pcolor(values, cmap=COLORMAPS[summary.kind], vmin=min(0.0, min(finite, default=0.0)), vmax=max(top, 1e-9))
    axis.invert_yaxis()
    axis.set_yticks([0.5 + i for i in range(len(CATEGORIES))])
    axis.set_yticklabels([f"{CATEGORY_LABELS[c]} ({summary.counts[c]})" for c in CATEGORIES], fontsize=8)
    _layer_ticks(axis, summary.num_layers)
    axis.set_xlabel(_xlabel(summary.kind, window, model_name), fontsize=8)
    name = "hidden states" if summary.kind == "hidden" else f"{KIND_NAMES[summary.kind]} outputs"
    axis.set_title(
        f"Average indirect effect of restoring {name}\n{summary.num_facts} facts; "
        f"p(clean) {summary.mean_p_clean:.3f}, p(corrupted) {summary.mean_p_corrupted:.3f}",
        fontsize=9,
    )
    colorbar = figure.colorbar(mesh, ax=axis)
    colorbar.ax.set_title("AIE", fontsize=8)
    return _save(figure, path)


def plot_fact_heatmap(trace: FactTrace, kind: str, path: str | Path, *, model_name: str = "the model") -> Path:
    """p(answer) after restoring each (token, layer) of one fact; subject tokens are starred (ROME Fig. 1)."""
    figure = _figure(5.5, 0.35 * len(trace.tokens) + 1.4)
    axis = figure.add_subplot(1, 1, 1)
    values = trace.restored[kind].numpy()
    mesh = axis.pcolor(values, cmap=COLORMAPS[kind], vmin=trace.p_corrupted)
    axis.invert_yaxis()
    b, e = trace.subject_range
    labels = [repr(t)[1:-1] + ("*" if b <= i < e else "") for i, t in enumerate(trace.tokens)]
    axis.set_yticks([0.5 + i for i in range(len(labels))])
    axis.set_yticklabels(labels, fontsize=8)
    _layer_ticks(axis, values.shape[1])
    axis.set_xlabel(_xlabel(kind, trace.window, model_name), fontsize=8)
    axis.set_title(f"{trace.prompt!r} -> {trace.answer.strip()!r}", fontsize=8)
    colorbar = figure.colorbar(mesh, ax=axis)
    colorbar.ax.set_title(f"p({trace.answer.strip()})", fontsize=8)
    return _save(figure, path)


def _save(figure: Any, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(target, bbox_inches="tight")
    return target
