"""Reproduce the WISE paper's Table 2 layout on one model: ``lmedit reproduce wise-table``.

Every (method, T) pair is a sequential run (chunks of T edits, all T scored after
the T-th edit, the model restored before the next chunk) in its own run folder
``<out>/<method>-T<T>``. Finished folders are skipped and an unfinished one
resumes through the runner, so an interrupted reproduction continues where it
stopped. After each run the table (markdown + JSON) and the plot are rewritten
from the run folders, so a partial reproduction is readable too.

Rows are methods; each T has the columns Rel. (rewrite), Gen. (rephrase), Loc.
(locality) and their average, as in the paper. GRACE and DEFER are also scored
by greedy generation (issue 4: DEFER's published 0.03 is a generation score), and so
is WISE, whose routing also reads the whole input: extra rows ``GRACE (gen)``,
``DEFER (gen)`` and ``WISE (gen)``.

Optionally each run also records retention curves (:mod:`lmedit.lifelong`):
edit retention (ERR) and test retention (TRR) on held-out probes that the
unedited model answered correctly, chosen once per reproduction from the
records after the edited range and stored in ``<out>/held_out.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lmedit.data.shared import find_shared_file  # noqa: F401  (re-exported for the commands)
from lmedit.evaluation.evaluator import EvalConfig
from lmedit.requests import EditRequest

LOG = logging.getLogger(__name__)

WISE_TABLE_METHODS: tuple[str, ...] = ("FT-L", "FT-M", "ROME", "MEMIT", "AlphaEdit", "GRACE", "DEFER", "WISE")
DEFAULT_TS: tuple[int, ...] = (1, 10, 100)
ZSRE_FILE = Path("zsre") / "zsre_mend_eval_portability_gpt4.json"
WISE_IRRELEVANT_FILE = Path("wise") / "hallucination" / "hallucination-train.json"
TABLE_NAME = "wise-table"
UNEDITED = "unedited"  # the first row: the items' pre-edit scores (read from any finished run's summary)

# (column label, teacher-forced metric, generation metric) per table layout: the WISE paper's Table 2 (zsRE)
# and its hallucination table (Rel. is the perplexity of the edited passages, lower is better).
LAYOUTS: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "zsre": (("Rel.", "rewrite_acc", "rewrite_gen_acc"), ("Gen.", "rephrase_acc", "rephrase_gen_acc"),
             ("Loc.", "locality", "locality_gen")),
    "hallucination": (("Rel. (PPL)", "rewrite_ppl", None), ("Loc.", "locality", "locality_gen")),
}
COLUMNS = LAYOUTS["zsre"]


class ReproduceError(ValueError):
    """A reproduction cannot start or continue; the message says what to change."""


# --------------------------------------------------------------------------- configuration


@dataclass
class WiseTableConfig:
    """What ``lmedit reproduce wise-table`` runs; every field has a command-line option."""

    data: Path
    out: Path = Path("runs") / TABLE_NAME
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = WISE_TABLE_METHODS
    Ts: tuple[int, ...] = DEFAULT_TS
    limit: int = 100
    offset: int = 0
    eval_mode: str = "teacher"
    eval_batch_size: int = 128
    seed: int = 0
    retention_every: int = 0
    retention_items: int = 50
    retention_scan: int = 400
    irrelevant_file: Path | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout: str | None = None  # "zsre" or "hallucination"; None: detected from the data

    def __post_init__(self) -> None:
        from lmedit.evaluation.evaluator import EVAL_MODES
        from lmedit.registry import get_method

        self.data = Path(self.data)
        self.out = Path(self.out)
        if not self.data.is_file():
            raise ReproduceError(f"data file {self.data} does not exist; pass the zsRE file with --data")
        if not self.Ts or any(T < 1 for T in self.Ts):
            raise ReproduceError(f"T values must be positive, got {list(self.Ts)}")
        if self.limit < 1:
            raise ReproduceError("--limit must be at least 1")
        if max(self.Ts) > self.limit:
            raise ReproduceError(
                f"T={max(self.Ts)} is larger than --limit {self.limit}: its one chunk would hold only {self.limit} "
                f"edits; raise --limit to at least {max(self.Ts)} or drop that T"
            )
        if self.eval_mode not in EVAL_MODES:
            raise ReproduceError(f"eval mode {self.eval_mode!r} is not one of {', '.join(EVAL_MODES)}")
        if self.retention_every < 0 or self.retention_items < 1:
            raise ReproduceError("--retention-every must be >= 0 (0: off) and --retention-items >= 1")
        self.methods = tuple(get_method(m).name for m in self.methods)  # canonical names; unknown ones fail here
        self.overrides = {get_method(m).name: dict(v) for m, v in self.overrides.items()}
        self.Ts = tuple(sorted(set(self.Ts)))
        if self.layout is None:
            from lmedit.data import load_requests

            self.layout = detect_layout(load_requests(self.data, limit=self.limit, offset=self.offset))
        if self.layout not in LAYOUTS:
            raise ReproduceError(f"table layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")

    @property
    def columns(self) -> tuple[tuple[str, str, str | None], ...]:
        return LAYOUTS[self.layout]

    @property
    def groups(self) -> tuple[str, ...]:
        """Column labels of one T group: the metrics, plus their average for the zsRE layout (as in the paper)."""
        labels = tuple(label for label, _, _ in self.columns)
        return labels + ("Avg.",) if self.layout == "zsre" else labels

    def eval_mode_for(self, method: str) -> str:
        """Methods registered with ``generation_scored`` (GRACE, DEFER, WISE) are also scored by generation
        (both modes in one run); others use ``eval_mode``."""
        from lmedit.registry import get_method

        if get_method(method).generation_scored and self.eval_mode == "teacher":
            return "both"
        return self.eval_mode

    def folder(self, method: str, T: int) -> Path:
        return self.out / f"{method}-T{T}"

    def plan(self) -> list[tuple[str, int]]:
        """(method, T) runs in order: every method at the smallest T first, so a short budget covers all methods."""
        return [(method, T) for T in self.Ts for method in self.methods]


# --------------------------------------------------------------------------- running


@dataclass
class RunOutcome:
    method: str
    T: int
    folder: Path
    status: str  # "done" (already finished), "ran", "failed"
    seconds: float = 0.0
    error: str | None = None


def run_wise_table(
    config: WiseTableConfig,
    *,
    model: torch.nn.Module | None = None,
    tok: Any = None,
    show_progress: bool = True,
    on_run: Callable[[RunOutcome], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every (method, T) of the plan, then write the table; returns the table payload.

    A run that fails (e.g. a method that cannot edit this model) is logged, marked
    ``failed`` in the returned ``outcomes`` and left out of the table; the others go on.
    """
    from lmedit.data import load_requests

    requests = load_requests(config.data, limit=config.limit, offset=config.offset)
    if not requests:
        raise ReproduceError(f"no requests in {config.data} at offset {config.offset} with limit {config.limit}")
    config.layout = detect_layout(requests)
    config.out.mkdir(parents=True, exist_ok=True)
    _write_plan(config, len(requests))
    if model is None:
        from lmedit.models import load_model

        model, tok = load_model(config.model)
    held_out = _held_out(config, model, tok) if config.retention_every else None
    fingerprint = model_fingerprint(model)
    outcomes = []
    for method, T in config.plan():
        outcome = _run_one(config, method, T, requests, model, tok, held_out, show_progress)
        outcomes.append(outcome)
        if model_fingerprint(model) != fingerprint:
            raise ReproduceError(f"{method} T={T} left the model changed after restoring; later runs would be wrong")
        if on_run:
            on_run(outcome)
        write_table(config)
    payload = write_table(config)
    payload["outcomes"] = [{"method": o.method, "T": o.T, "status": o.status, "seconds": o.seconds, "error": o.error}
                           for o in outcomes]
    return payload


def detect_layout(requests: Sequence[EditRequest]) -> str:
    """zsRE-like data has rephrasings (Gen.); WISE's hallucination passages have none and are scored by perplexity."""
    return "zsre" if any(r.rephrase for r in requests) else "hallucination"


def _write_plan(config: WiseTableConfig, n_requests: int) -> None:
    plan = {
        "table": TABLE_NAME, "data": str(config.data), "model": config.model, "methods": list(config.methods),
        "T": list(config.Ts), "limit": config.limit, "offset": config.offset, "n_requests": n_requests,
        "eval_mode": config.eval_mode, "retention_every": config.retention_every,
        "retention_items": config.retention_items,
        "irrelevant_file": None if config.irrelevant_file is None else str(config.irrelevant_file),
    }
    (config.out / "reproduce.json").write_text(json.dumps(plan, indent=2))


def _run_one(
    config: WiseTableConfig, method: str, T: int, requests: Sequence[EditRequest], model: torch.nn.Module, tok: Any,
    held_out: Any, show_progress: bool,
) -> RunOutcome:
    from lmedit.runner import RunError, SUMMARY_FILE

    folder = config.folder(method, T)
    if _finished(folder / SUMMARY_FILE):
        return RunOutcome(method, T, folder, "done")
    started = time.perf_counter()
    try:
        _run_method(config, method, T, requests, model, tok, held_out, show_progress)
    except RunError as exc:  # a folder of another configuration: the user must decide
        raise ReproduceError(f"{method} T={T}: {exc}") from None
    except (ValueError, RuntimeError) as exc:
        LOG.error("%s T=%d failed: %s", method, T, exc)
        return RunOutcome(method, T, folder, "failed", time.perf_counter() - started, str(exc))
    return RunOutcome(method, T, folder, "ran", time.perf_counter() - started)


def _finished(summary_path: Path) -> bool:
    if not summary_path.is_file():
        return False
    try:
        return bool(json.loads(summary_path.read_text()).get("complete"))
    except json.JSONDecodeError:
        return False


def _run_method(
    config: WiseTableConfig, method: str, T: int, requests: Sequence[EditRequest], model: torch.nn.Module, tok: Any,
    held_out: Any, show_progress: bool,
) -> None:
    from lmedit.editor import Editor
    from lmedit.registry import get_method, list_presets
    from lmedit.runner import RunSpec, file_sha256, run_benchmark

    if config.model not in list_presets(method):
        raise ValueError(f"{method} has no preset for {config.model}; add presets/{method}/{config.model}.yaml")
    overrides = dict(config.overrides.get(method, {}))
    if config.irrelevant_file is not None and "irrelevant_file" in get_method(method).hparams_class.field_names():
        overrides.setdefault("irrelevant_file", str(config.irrelevant_file))  # methods that train against unrelated prompts
    eval_config = EvalConfig(mode=config.eval_mode_for(method), batch_size=config.eval_batch_size)
    editor = Editor(model, tok, method, preset=config.model, overrides=overrides, eval_config=eval_config,
                    model_name=config.model)
    folder = config.folder(method, T)
    spec = RunSpec(
        method=method, model=config.model, protocol="sequential", hparams=editor.hparams.to_dict(),
        eval=dict(editor.evaluator.config.__dict__), T=T, seed=config.seed, data=str(config.data),
        data_sha256=file_sha256(config.data), offset=config.offset, limit=config.limit, n_requests=len(requests),
        preset=config.model, extra={"reproduce": TABLE_NAME},
    )
    tracker = None
    if held_out is not None:
        from lmedit.lifelong import RetentionTracker

        tracker = RetentionTracker(model, editor.evaluator, requests, folder, held_out, config.retention_every)
    run_benchmark(editor.session(seed=config.seed), requests, spec, folder, show_progress=show_progress, after_step=tracker)
    if tracker is not None:
        from lmedit.lifelong import write_curves

        write_curves(folder, held_out, title=f"{method}, sequential T={T}, {config.model}",
                     meta={"every": config.retention_every, "tracking_seconds_this_session": tracker.seconds})


def _held_out(config: WiseTableConfig, model: torch.nn.Module, tok: Any) -> Any:
    """Held-out probes from the records after the edited range, chosen once and kept in ``<out>/held_out.json``."""
    from lmedit.lifelong import HELD_OUT_FILE, choose_held_out

    return choose_held_out(config.data, model, tok, after=config.offset + config.limit, items=config.retention_items,
                           scan=config.retention_scan, batch_size=config.eval_batch_size,
                           path=config.out / HELD_OUT_FILE)


def model_fingerprint(model: torch.nn.Module) -> tuple[float, ...]:
    """Cheap per-tensor sums of every parameter and buffer: a restore that was not exact shows up here."""
    with torch.no_grad():
        return tuple(float(t.double().sum()) for t in model.state_dict().values())


# --------------------------------------------------------------------------- the table


def collect_rows(config: WiseTableConfig) -> dict[str, Any]:
    """Read every run folder of the plan: per method (and generation row) and T, the Rel./Gen./Loc. means."""
    from lmedit.runner import CONFIG_FILE, SUMMARY_FILE

    rows: dict[str, dict[str, Any]] = {}
    timing: dict[str, dict[str, Any]] = {}
    for method, T in config.plan():
        folder = config.folder(method, T)
        if not (folder / SUMMARY_FILE).is_file():
            continue
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        mode = json.loads((folder / CONFIG_FILE).read_text()).get("eval", {}).get("mode", "teacher")
        post = summary.get("post", {})
        cell_base = {"n": summary.get("n"), "complete": summary.get("complete", False)}
        if mode in ("teacher", "both"):
            rows.setdefault(method, {})[str(T)] = {**cell_base, **_cell(config, post, generation=False)}
        if mode in ("generate", "both"):
            label = method if mode == "generate" else f"{method} (gen)"
            rows.setdefault(label, {})[str(T)] = {**cell_base, **_cell(config, post, generation=True)}
        timing.setdefault(method, {})[str(T)] = summary.get("timing", {}).get("edit_seconds_per_request")
        if mode in ("teacher", "both") and str(T) not in rows.get(UNEDITED, {}):
            rows.setdefault(UNEDITED, {})[str(T)] = {**cell_base, **_cell(config, summary.get("pre", {}),
                                                                          generation=False, unedited=True)}
    return {"rows": rows, "seconds_per_edit": timing}


def _cell(config: WiseTableConfig, post: dict[str, float], *, generation: bool,
          unedited: bool = False) -> dict[str, float | None]:
    """One (row, T) cell; ``unedited``: the pre-edit scores, where locality (agreement with itself) is left out."""
    cell: dict[str, float | None] = {}
    for label, teacher, generated in config.columns:
        metric = generated if generation else teacher
        cell[label] = None if metric is None or (unedited and metric.startswith("locality")) else post.get(metric)
    if "Avg." in config.groups:
        present = [v for v in cell.values() if v is not None]
        cell["Avg."] = sum(present) / len(present) if len(present) == len(config.columns) else None
    return cell


def markdown_table(config: WiseTableConfig, collected: dict[str, Any]) -> str:
    """The paper's layout: one row per method, a Rel./Gen./Loc./Avg. group per T."""
    Ts = [str(T) for T in config.Ts]
    groups = config.groups
    header = "| Method | " + " | ".join(f"T={T} {g}" for T in Ts for g in groups) + " |"
    lines = [header, "|---|" + "---|" * (len(Ts) * len(groups))]
    for label, by_T in _ordered(collected["rows"], config.methods):
        cells = []
        for T in Ts:
            cell = by_T.get(T)
            flag = "" if cell is None or cell["complete"] else "*"
            cells.extend(_num(None if cell is None else cell.get(g)) + flag for g in groups)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Seconds per edit (edit time only, this machine):")
    lines.append("")
    lines.append("| Method | " + " | ".join(f"T={T}" for T in Ts) + " |")
    lines.append("|---|" + "---|" * len(Ts))
    for method in config.methods:
        seconds = collected["seconds_per_edit"].get(method, {})
        lines.append(f"| {method} | " + " | ".join(_num(seconds.get(T), 1) for T in Ts) + " |")
    return "\n".join(lines) + "\n"


COST_BINS = 4  # the longest run's chunk is cut into this many equal stretches of edits


def cost_along_chunk(config: WiseTableConfig) -> dict[str, Any]:
    """Per method, at its largest finished T: mean seconds per edit over each quarter of the chunk's edits.

    Whether an edit gets slower as edits accumulate (a growing codebook, stored memories, merges) shows here;
    the chunk-wide average in ``seconds_per_edit`` hides it. Each record's own step time is read
    (``step_seconds``; older runs: the method's own ``edit_info.seconds``).
    """
    from lmedit.runner import RESULTS_FILE, SUMMARY_FILE, read_records

    cost: dict[str, Any] = {}
    for method in config.methods:
        for T in sorted(config.Ts, reverse=True):
            if not _finished(config.folder(method, T) / SUMMARY_FILE):
                continue
            records = read_records(config.folder(method, T) / RESULTS_FILE)
            curve = _mean_step_seconds_by_position(records, T)
            if len(curve) >= COST_BINS:
                cost[method] = {"T": T, "bins": _bin_means(curve, COST_BINS), "curve": curve}
                break
    return cost


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


def plot_cost(config: WiseTableConfig, cost: dict[str, Any], path: Path) -> Path | None:
    """Seconds per edit against the edit's position in the chunk (running mean over 5), one line per method."""
    from lmedit.lifelong import new_figure

    figure = new_figure(7, 4)
    if figure is None or not cost:
        return None
    axis = figure.subplots(1, 1)
    colors = row_colors(config.methods)
    for method, entry in cost.items():
        curve = entry["curve"]
        smooth = [sum(curve[max(0, i - 4): i + 1]) / len(curve[max(0, i - 4): i + 1]) for i in range(len(curve))]
        axis.plot(range(1, len(curve) + 1), smooth, color=colors[method], label=f"{method} (T={entry['T']})")
    axis.set_xlabel("edit number in the chunk")
    axis.set_ylabel("seconds per edit (running mean of 5)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    axis.set_title(f"{config.model}: cost of each edit as edits accumulate")
    figure.tight_layout()
    figure.savefig(str(path))
    return path


# Curves per table layout: accuracies for zsRE; perplexities for passages (the hallucination table's Rel. and TRR).
RETENTION_CURVES: dict[str, tuple[tuple[str, str], ...]] = {
    "zsre": (("edit_retention", "ERR: edits 1..t still held"), ("test_retention", "TRR: held-out answers kept")),
    "hallucination": (("edit_ppl", "PPL of edits 1..t (lower is better)"), ("held_out_ppl", "PPL of held-out passages")),
}


def retention_curves(config: WiseTableConfig) -> dict[str, Any]:
    """Per method, the retention curves (ERR, TRR against t) of its largest finished T that recorded them."""
    from lmedit.lifelong import CURVES_JSON
    from lmedit.runner import SUMMARY_FILE

    found: dict[str, Any] = {}
    for method in config.methods:
        for T in sorted(config.Ts, reverse=True):
            folder = config.folder(method, T)
            if _finished(folder / SUMMARY_FILE) and (folder / CURVES_JSON).is_file():
                curves = json.loads((folder / CURVES_JSON).read_text())["curves"]
                metrics = [m for m, _ in RETENTION_CURVES[config.layout]]
                found[method] = {"T": T, **{k: curves[k] for k in ("edits", *metrics)}}
                break
    return found


def retention_table(config: WiseTableConfig, curves: dict[str, Any]) -> str:
    """Markdown: the layout's two retention curves at a few points along each method's longest chunk."""
    if not curves:
        return ""
    metrics = RETENTION_CURVES[config.layout]
    lines = ["Retention along the longest chunk, after edit t:", "",
             "| Method | T | " + " | ".join(f"{title} at t = 10 / 50 / T" for _, title in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for method, entry in curves.items():
        at = {t: i for i, t in enumerate(entry["edits"])}
        points = [t for t in (10, 50, entry["T"]) if t in at]
        cells = [" / ".join(_num(entry[metric][at[t]]) for t in points) for metric, _ in metrics]
        lines.append(f"| {method} | {entry['T']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_retention(config: WiseTableConfig, curves: dict[str, Any], path: Path) -> Path | None:
    """ERR (left) and TRR (right) against the number of edits, one line per method."""
    from lmedit.lifelong import new_figure

    figure = new_figure(11, 4)
    if figure is None or not curves:
        return None
    axes = figure.subplots(1, len(RETENTION_CURVES[config.layout]))
    colors = row_colors(config.methods)
    for axis, (metric, title) in zip(axes, RETENTION_CURVES[config.layout]):
        for method, entry in curves.items():
            points = [(t, v) for t, v in zip(entry["edits"], entry[metric]) if v is not None]
            axis.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=3,
                      color=colors[method], label=f"{method} (T={entry['T']})")
        _style_axis(axis, metric, "edits made (t)", title)
    axes[-1].legend(fontsize=7, loc="best")
    figure.suptitle(f"{config.model}: retention as edits accumulate ({config.data.name})")
    figure.tight_layout()
    figure.savefig(str(path))
    return path


def _ordered(rows: dict[str, Any], methods: Sequence[str]) -> list[tuple[str, Any]]:
    order = [UNEDITED] * (UNEDITED in rows) + [label for m in methods for label in (m, f"{m} (gen)") if label in rows]
    return [(label, rows[label]) for label in order]


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def write_table(config: WiseTableConfig) -> dict[str, Any]:
    """``wise-table.md``, ``wise-table.json`` and ``wise-table.png`` in the output folder, from the run folders."""
    collected = collect_rows(config)
    cost = cost_along_chunk(config)
    text = markdown_table(config, collected)
    if cost:
        text += "\n" + cost_table(cost)
    curves = retention_curves(config)
    if curves:
        text += "\n" + retention_table(config, curves)
    note = (f"\n{config.model}, sequential protocol, data {config.data.name} (offset {config.offset}, limit "
            f"{config.limit}); teacher-forced unless marked (gen); * = run not finished yet.\n")
    (config.out / f"{TABLE_NAME}.md").write_text(text + note)
    payload = {"table": TABLE_NAME, "layout": config.layout, "model": config.model, "data": str(config.data),
               "limit": config.limit, "offset": config.offset, "T": list(config.Ts), **collected,
               "cost_along_chunk": {m: {"T": e["T"], "bins": e["bins"]} for m, e in cost.items()},
               "retention": curves}
    (config.out / f"{TABLE_NAME}.json").write_text(json.dumps(payload, indent=2))
    if collected["rows"]:
        plot_table(config, collected, config.out / f"{TABLE_NAME}.png")
    if cost:
        plot_cost(config, cost, config.out / f"{TABLE_NAME}-cost.png")
    if curves:
        plot_retention(config, curves, config.out / f"{TABLE_NAME}-retention.png")
    return payload


def _style_axis(axis: Any, metric: str, xlabel: str, title: str) -> None:
    """Perplexities on a log scale, accuracies on [0, 1]."""
    if metric.endswith("_ppl"):
        axis.set_yscale("log")
    else:
        axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)


def _base_method(row_label: str) -> str:
    return row_label.removesuffix(" (gen)")


def row_colors(methods: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per method (its (gen) row shares it, dashed), grey for the unedited row: the same method has
    the same colour in every panel, however many rows there are."""
    import matplotlib

    tab10 = matplotlib.colormaps["tab10"]
    palette = [tab10(i) for i in range(10) if i != 7]  # tab10's 8th colour is the unedited row's grey
    if len(methods) > len(palette):
        tab20 = matplotlib.colormaps["tab20"]
        palette = [tab20(i) for i in range(20) if i not in (14, 15)]  # tab20's greys
    colors: dict[str, Any] = {UNEDITED: "0.45"}
    colors.update({method: palette[i % len(palette)] for i, method in enumerate(methods)})
    return colors


def plot_table(config: WiseTableConfig, collected: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric (Rel., Gen., Loc.): value against T for each method row."""
    from lmedit.lifelong import new_figure

    figure = new_figure(12, 3.8)
    if figure is None:
        return None
    axes = figure.subplots(1, len(config.columns))
    colors = row_colors(config.methods)
    legend: dict[str, Any] = {}
    for axis, (label, metric, _) in zip(axes, config.columns):
        for row_label, by_T in _ordered(collected["rows"], config.methods):
            points = [(T, by_T[str(T)].get(label)) for T in config.Ts
                      if str(T) in by_T and by_T[str(T)].get(label) is not None]
            if points:
                (line,) = axis.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=4,
                                    color=colors[_base_method(row_label)], label=row_label,
                                    linestyle=":" if row_label == UNEDITED else "--" if row_label.endswith("(gen)") else "-")
                legend.setdefault(row_label, line)
        axis.set_xscale("log")
        axis.set_xticks(list(config.Ts), [str(T) for T in config.Ts])
        _style_axis(axis, metric, "T (edits before evaluation)", label)
    axes[0].set_ylabel("score")
    if legend:  # one legend for all panels: a row missing from one panel (unedited has no Loc.) must not shift colours
        axes[-1].legend(list(legend.values()), list(legend.keys()), fontsize=7, loc="best")
    figure.suptitle(f"{config.model}: sequential editing on {config.data.name} ({config.limit} items)")
    figure.tight_layout()
    figure.savefig(str(path))
    return path
