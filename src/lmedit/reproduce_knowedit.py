"""KnowEdit's Table 4 on one model, every method, one command: ``lmedit reproduce knowedit-table``.

Every (dataset, method) pair is a single-edit run (EasyEdit's KnowEdit protocol: edit, score, restore) of the
first ``limit`` items of that KnowEdit file, with KnowEdit's fluency, in its own run folder
``<out>/<dataset>/<method>`` -- the same folders ``lmedit run`` writes, so finished runs are skipped, an unfinished
one resumes, and ``lmedit report --layout knowedit`` reads them. After every run the table is rewritten from the
folders: KnowEdit's layout with the published LLaMA-2-7B value beside each cell
(:mod:`lmedit.reports.knowedit_published`), whether the methods come in the published order per row, and a plot
of reproduced against published values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lmedit.registry import get_method, list_presets
from lmedit.reproduce import (ReproduceError, load_written_runs, model_fingerprint, run_finished, run_unless_finished,
                              unfinished_runs)

LOG = logging.getLogger(__name__)

TABLE_NAME = "knowedit-table"
# KnowEdit's datasets and where their test files sit under a KnowEdit folder (EasyEdit's / the HF dataset's names)
KNOWEDIT_FILES: dict[str, Path] = {
    "ZsRE": Path("ZsRE") / "ZsRE-test-all.json",
    "WikiBio": Path("WikiBio") / "wikibio-test-all.json",
    "ConvSent": Path("Convsent") / "blender_test.json",
    "Sanitation": Path("Sanitation") / "trivia_qa_test.json",
    "Sanitation-EasyEdit": Path("Sanitation") / "trivia_qa_train.json",
    "WikiData_recent": Path("recent") / "recent_test.json",
    "WikiData_counterfact": Path("counterfact") / "test_cf.json",
}
KNOWEDIT_DEFAULT_SETS: tuple[str, ...] = ("ZsRE", "WikiBio", "ConvSent", "Sanitation", "Sanitation-EasyEdit")
# Sanitation-EasyEdit is EasyEdit's own Sanitation protocol (examples/run_santinization_llama2.py), where the published
# Sanitation cells come from: the training file's questions of one answer are edited one after another, then the test
# file's questions are scored by 10-token greedy answers. It runs the whole file, one sequence per answer.
SANITATION_EASYEDIT = "Sanitation-EasyEdit"
SANITATION_EASYEDIT_SUITES: tuple[str, ...] = ("fluency", "qa:context=question,max_new_tokens=10")
KNOWEDIT_TABLE_METHODS: tuple[str, ...] = (
    "FT-L", "FT-M", "LoRA", "AdaLoRA", "ROME", "MEMIT", "AlphaEdit", "GRACE", "DEFER", "WISE", "IKE", "SERAC", "MEND")
COMPARED_METRICS: tuple[str, ...] = ("Edit Succ.", "Portability", "Locality", "Fluency")


@dataclass
class KnowEditTableConfig:
    """What ``lmedit reproduce knowedit-table`` runs; every field has a command-line option."""

    root: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    sets: tuple[str, ...] = KNOWEDIT_DEFAULT_SETS
    methods: tuple[str, ...] = KNOWEDIT_TABLE_METHODS
    out: Path = Path("runs") / TABLE_NAME
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "float32"
    limit: int = 50
    offset: int = 0
    eval_batch_size: int = 128
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    preset: str | None = None
    """The methods' hyperparameter presets (default: the one named like the model)."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        unknown = [s for s in (*self.sets, *self.files) if s not in KNOWEDIT_FILES]
        if unknown:
            raise ReproduceError(f"unknown KnowEdit dataset(s) {unknown}; choose from {', '.join(KNOWEDIT_FILES)}")
        if self.limit < 1 or self.offset < 0:
            raise ReproduceError("--limit must be at least 1 and --offset at least 0")
        self.methods = tuple(get_method(m).name for m in self.methods)  # canonical names; unknown ones fail here
        self.overrides = {get_method(m).name: dict(v) for m, v in self.overrides.items()}
        self.files = {name: Path(path) for name, path in self.files.items()}
        missing = [f"{name}: {self.data_file(name)}" for name in self.sets if not self.data_file(name).is_file()]
        if missing:
            raise ReproduceError(f"KnowEdit file(s) not found ({'; '.join(missing)}); pass the KnowEdit folder with "
                                 "--root, a file with --file NAME=PATH, or leave the dataset out with --sets")

    def data_file(self, dataset: str) -> Path:
        if dataset in self.files:
            return self.files[dataset]
        return (self.root or Path(".")) / KNOWEDIT_FILES[dataset]

    def folder(self, dataset: str, method: str) -> Path:
        return self.out / dataset / method

    def plan(self) -> list[tuple[str, str]]:
        """(dataset, method) runs: every method on the first dataset first, so a short budget fills whole rows."""
        return [(dataset, method) for dataset in self.sets for method in self.methods]


@dataclass
class KnowEditOutcome:
    dataset: str
    method: str
    folder: Path
    status: str  # "done" (already finished), "ran", "failed"
    seconds: float = 0.0  # serially the run's wall time; on Ray its work (edits, scoring, capture), as runs overlap
    error: str | None = None


def run_knowedit_table(
    config: KnowEditTableConfig,
    *,
    model: torch.nn.Module | None = None,
    tok: Any = None,
    show_progress: bool = True,
    on_run: Callable[[KnowEditOutcome], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every (dataset, method) of the plan in this process, then write the table; returns its payload.

    A run that fails (a method without a preset for the model, a record a method cannot edit, an untrained
    checkpoint) is logged, marked ``failed`` and left out of the table; the others go on.
    """
    from lmedit.sweep.engine import ChunkWorker

    _check_requests(config)
    if model is None:
        from lmedit.models import load_model

        model, tok = load_model(config.model, device=config.device, dtype=config.dtype)
    worker = ChunkWorker(config.device, config.dtype)
    worker.adopt_model(config.model, model, tok)
    fingerprint = model_fingerprint(model)
    outcomes = []
    for dataset, method, job in table_jobs(config):
        outcome = _run_one(config, dataset, method, lambda: _run_job(config, worker, job, show_progress))
        outcomes.append(outcome)
        if model_fingerprint(model) != fingerprint:
            raise ReproduceError(f"{method} on {dataset} left the model changed after restoring; later runs would be wrong")
        if on_run:
            on_run(outcome)
        write_table(config, outcomes)
    return write_table(config, outcomes)


def run_knowedit_table_on_ray(
    config: KnowEditTableConfig,
    *,
    workers: int = 2,
    address: str | None = None,
    threads: int | None = None,
    show_progress: bool = True,
    on_run: Callable[[KnowEditOutcome], None] | None = None,
) -> dict[str, Any]:
    """The same runs as :func:`run_knowedit_table`, as chunks on Ray workers (``lmedit sweep``'s engine).

    Each worker loads the model once; the run folders, their records and summaries are the ones the serial path
    writes (the same jobs, so either path resumes the other's folders). The table is rewritten as each run ends.
    """
    from lmedit.reports.knowedit import run_cost
    from lmedit.runner import SUMMARY_FILE
    from lmedit.sweep.engine import run_ray

    _check_requests(config)
    outcomes: list[KnowEditOutcome] = []
    todo = []
    for dataset, method, job in table_jobs(config):
        folder = config.folder(dataset, method)
        missing = _missing_preset(config, method)
        if run_finished(folder):
            outcomes.append(KnowEditOutcome(dataset, method, folder, "done"))
        elif missing:
            outcomes.append(KnowEditOutcome(dataset, method, folder, "failed", error=missing))
        else:
            todo.append((dataset, method, job))
    for outcome in outcomes:
        if on_run:
            on_run(outcome)
    cells = {job.name: (dataset, method) for dataset, method, job in todo}

    def settle(name: str, error: str | None) -> None:
        dataset, method = cells.pop(name)
        folder = config.folder(dataset, method)
        minutes = None if error else run_cost(json.loads((folder / SUMMARY_FILE).read_text()))["work_minutes"]
        outcome = KnowEditOutcome(dataset, method, folder, "failed" if error else "ran", (minutes or 0.0) * 60, error)
        outcomes.append(outcome)
        if on_run:
            on_run(outcome)
        write_table(config, outcomes)

    def chunk_written(job: Any, _chunk: int, _result: dict[str, Any]) -> None:
        if job.name in cells and run_finished(config.out / job.name):
            settle(job.name, None)

    if todo:
        run_ray([job for *_, job in todo], config.out, workers=workers, address=address, device=config.device,
                dtype=config.dtype, threads=threads, show_progress=show_progress, on_chunk=chunk_written,
                on_plan_error=lambda job, error: settle(job.name, error))
    for name in list(cells):  # runs whose chunks were all written before (their summary was rewritten)
        settle(name, None)
    return write_table(config, outcomes)


def table_jobs(config: KnowEditTableConfig) -> list[tuple[str, str, Any]]:
    """(dataset, method, job) per run of the plan: the sweep jobs that write ``<out>/<dataset>/<method>``.

    Both paths, in this process and on Ray, run these jobs, so a folder one of them began the other resumes.
    """
    from lmedit.sweep.plan import Job

    selections = {dataset: selection(config, dataset) for dataset in config.sets}
    return [(dataset, method, Job(
        method=method, model=config.model, data=str(config.data_file(dataset)), seed=config.seed,
        eval_batch_size=config.eval_batch_size, preset=config.preset or config.model,
        overrides=dict(config.overrides.get(method, {})), folder=f"{dataset}/{method}", **selections[dataset]))
        for dataset, method in config.plan()]


def selection(config: KnowEditTableConfig, dataset: str) -> dict[str, Any]:
    """The protocol and items of one set: single edits of the first ``limit`` items, except for EasyEdit's
    Sanitation protocol, which edits every training question, one answer's questions per sequence."""
    if dataset != SANITATION_EASYEDIT:
        return {"protocol": "single", "offset": config.offset, "limit": config.limit, "suites": ("fluency",)}
    return {"protocol": "sequential", "T": sanitation_group_size(config.data_file(dataset)), "offset": 0,
            "limit": None, "data_format": "sanitation-easyedit", "suites": SANITATION_EASYEDIT_SUITES}


def sanitation_group_size(train_file: Path) -> int:
    """The number of training questions per answer; each answer's must be one run of equal length in the file,
    so that sequences of that length edit one answer each."""
    from itertools import groupby

    from lmedit.data import load_requests

    answers = [r.extra["answer"].lower() for r in load_requests(train_file, format="sanitation-easyedit")]
    runs = [(answer, len(list(run))) for answer, run in groupby(answers)]
    sizes = {size for _, size in runs}
    if len(sizes) != 1 or len({a for a, _ in runs}) != len(runs):
        raise ReproduceError(f"{train_file}: the questions to forget must come in one block per answer, all of one "
                             f"size, for one sequence per answer; found {runs}")
    return sizes.pop()


def _check_requests(config: KnowEditTableConfig) -> None:
    """Every dataset has requests at the offset (else nothing runs); then the plan is written to the output folder."""
    from lmedit.data import load_requests

    sizes = {}
    for dataset in config.sets:
        chosen = selection(config, dataset)
        sizes[dataset] = len(load_requests(config.data_file(dataset), limit=chosen["limit"], offset=chosen["offset"],
                                           format=chosen.get("data_format")))
        if not sizes[dataset]:
            raise ReproduceError(f"no requests in {config.data_file(dataset)} at offset {config.offset}")
    config.out.mkdir(parents=True, exist_ok=True)
    _write_plan(config, sizes)


def _missing_preset(config: KnowEditTableConfig, method: str) -> str | None:
    preset = config.preset or config.model
    if preset in list_presets(method):
        return None
    return f"{method} has no preset {preset}; add presets/{method}/{preset}.yaml"


def _write_plan(config: KnowEditTableConfig, sizes: dict[str, int]) -> None:
    plan = {"table": TABLE_NAME, "model": config.model, "preset": config.preset or config.model,
            "methods": list(config.methods), "data": {d: str(config.data_file(d)) for d in config.sets},
            "n_requests": sizes,
            "limit": config.limit, "offset": config.offset, "protocol": "single", "suites": ["fluency"],
            "selections": {d: selection(config, d) for d in config.sets if d == SANITATION_EASYEDIT}}
    (config.out / "reproduce.json").write_text(json.dumps(plan, indent=2))


def _run_one(config: KnowEditTableConfig, dataset: str, method: str, run: Callable[[], None]) -> KnowEditOutcome:
    from lmedit.runner import RunError

    folder = config.folder(dataset, method)
    status, seconds, error = run_unless_finished(
        folder, run, f"{method} on {dataset}", fatal=(RunError,),  # another configuration's folder: the user decides
        failures=(ValueError, RuntimeError, OSError))  # e.g. SERAC/MEND before `lmedit train`: no checkpoint
    return KnowEditOutcome(dataset, method, folder, status, seconds, error)


def _run_job(config: KnowEditTableConfig, worker: Any, job: Any, show_progress: bool) -> None:
    from lmedit.experiment import run_experiment

    missing = _missing_preset(config, job.method)
    if missing:
        raise ValueError(missing)
    prepared = worker.prepared(job)
    try:
        run_experiment(prepared.editor, prepared.requests, prepared.spec, config.out / job.name,
                       show_progress=show_progress)
    finally:
        worker.forget(job)


# --------------------------------------------------------------------------- the table


def plan_runs(config: KnowEditTableConfig) -> list[dict[str, Any]]:
    """The plan's runs that have written a summary (finished or not)."""
    return load_written_runs(config.folder(dataset, method) for dataset, method in config.plan())


def write_table(config: KnowEditTableConfig, outcomes: Sequence[KnowEditOutcome] = ()) -> dict[str, Any]:
    """``knowedit-table.md``, ``.json`` and ``.png`` in the output folder, from the run folders."""
    from lmedit.reports.knowedit import cost_table, knowedit_rows, knowedit_table
    from lmedit.reports.knowedit_published import comparison_table, ordering_comparison
    from lmedit.reports.unfinished import unfinished_section

    runs = plan_runs(config)
    rows = knowedit_rows(runs)
    for row, run in zip(rows, runs):  # the reproduction's dataset names, whatever the file is called
        row["dataset"] = Path(run["folder"]).parent.name
    comparisons = ordering_comparison(rows, COMPARED_METRICS)
    agreeing = sum(c["same_order"] for c in comparisons)
    text = (f"# KnowEdit Table 4 on {config.model}\n\n"
            f"Single edits, the first {config.limit} items of each set (offset {config.offset}), KnowEdit's "
            f"metrics × 100. Each cell: lmedit's value (the published LLaMA-2-7B value, EasyEdit README).\n\n"
            + (f"{SANITATION_EASYEDIT}: EasyEdit's Sanitation protocol instead: all training questions to forget "
               f"edited in one sequence per answer; Edit Succ. is the share of that answer's test questions whose "
               f"10-token greedy answer contains \"I don't know\", Locality the token F1 of the kept questions' "
               f"greedy answers against the unedited model's.\n\n" if SANITATION_EASYEDIT in config.sets else "")
            + knowedit_table(rows, published=True)
            + "\n## Method order per row, against the published table\n\n"
            + (f"{agreeing} of {len(comparisons)} rows in the published order.\n\n" + comparison_table(comparisons)
               if comparisons else "No row has two methods with a published value yet.\n"))
    if rows:
        hours = sum(r["work_minutes"] or 0 for r in rows) / 60
        text += (f"\n## Cost\n\nSeconds per edit · minutes of work per run (edits, post-edit scoring and the "
                 f"pre-edit capture), on this machine; {hours:.1f} h in all.\n\n" + cost_table(rows))
    runs_by_label = {f"{d}/{m}": (d, m) for d, m in config.plan()}
    failed_labels = {f"{o.dataset}/{o.method}" for o in outcomes if o.status == "failed"}
    unfinished = unfinished_runs(((label, config.folder(*run)) for label, run in runs_by_label.items()), failed_labels)
    for row in unfinished:
        why = _refused(config, *runs_by_label[row["run"]]) if row["state"] == "not started" else None
        if why:
            row["state"] = f"cannot run: {why}"
    text += unfinished_section(unfinished)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        text += "\n## Runs that failed\n\n" + "".join(f"* {o.method} on {o.dataset}: {o.error}\n" for o in failed)
    (config.out / f"{TABLE_NAME}.md").write_text(text)
    payload = {"table": TABLE_NAME, "model": config.model, "rows": rows, "ordering": comparisons,
               "unfinished": unfinished,
               "outcomes": [{"dataset": o.dataset, "method": o.method, "status": o.status, "seconds": o.seconds,
                             "error": o.error} for o in outcomes]}
    (config.out / f"{TABLE_NAME}.json").write_text(json.dumps(payload, indent=2, default=str))
    plot_against_published(rows, config.out / f"{TABLE_NAME}.png")
    return payload


def _refused(config: KnowEditTableConfig, dataset: str, method: str) -> str | None:
    """Why ``method`` refuses the set's first request, which no run would change (ROME on records without a
    subject); ``None`` when it takes it. So a table written from the folders alone (``--table-only``) does not
    list such a run as merely not started."""
    from lmedit.data import load_requests

    chosen = selection(config, dataset)
    try:
        requests = load_requests(config.data_file(dataset), limit=1, offset=chosen["offset"],
                                 format=chosen.get("data_format"))
        get_method(method).check_requests(requests[:1])
    except (ValueError, OSError) as exc:  # RequestError, MethodError, or a file that cannot be read as this set
        return str(exc).split(";")[0]
    return None


def plot_against_published(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One panel per metric: lmedit's value against the published one, a point per (dataset, method)."""
    from lmedit.reports.knowedit_published import published_value
    from lmedit.reports.plots import _save, new_figure

    metrics = ("Edit Succ.", "Portability", "Locality")
    points = {m: [(r["dataset"], r["method"], published_value(r["dataset"], m, r["method"]), r.get(m))
                  for r in rows] for m in metrics}
    points = {m: [p for p in ps if p[2] is not None and p[3] is not None] for m, ps in points.items()}
    if not any(points.values()):
        return None
    figure = new_figure(4.2 * len(metrics), 4.0)
    if figure is None:
        return None
    import matplotlib

    markers = dict(zip(KNOWEDIT_FILES, "osD^vPX"))
    colors = {name: matplotlib.colormaps["tab10"](i) for i, name in enumerate(KNOWEDIT_FILES)}
    for index, metric in enumerate(metrics):
        axis = figure.add_subplot(1, len(metrics), index + 1)
        for dataset, method, published, ours in points[metric]:  # one colour and marker per dataset
            axis.scatter(published, ours, marker=markers.get(dataset, "o"), color=colors.get(dataset, "0.3"),
                         label=dataset)
            axis.annotate(method, (published, ours), fontsize=6, xytext=(3, 2), textcoords="offset points")
        axis.plot([0, 100], [0, 100], color="0.7", linewidth=0.8)
        axis.set_xlim(-2, 102)
        axis.set_ylim(-2, 102)
        axis.set_xlabel("published (LLaMA-2-7B)")
        axis.set_ylabel("lmedit")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        if unique:
            axis.legend(unique.values(), unique.keys(), fontsize=7)
    return _save(figure, path)
