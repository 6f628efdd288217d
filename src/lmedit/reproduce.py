"""Reproduce the WISE paper's Table 2 layout on one model: ``lmedit reproduce wise-table``.

Every (method, T) pair is a sequential run (chunks of T edits, all T scored after
the T-th edit, the model restored before the next chunk) in its own run folder
``<out>/<method>-T<T>``. Finished folders are skipped and an unfinished one
resumes through the runner, so an interrupted reproduction continues where it
stopped. After each run the table (markdown + JSON) and the plot are rewritten
from the run folders by :mod:`lmedit.reports.wise_table`, so a partial
reproduction is readable too (``lmedit report --layout wise-table`` prints the
same table from the folders).

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import torch

from lmedit.evaluation.evaluator import EVAL_MODES, EvalConfig
from lmedit.registry import get_method, list_presets
from lmedit.reports.wise_table import TABLE_COLUMNS, TABLE_NAME, WISE_TABLE_METHODS, WiseTable
from lmedit.requests import EditRequest

LOG = logging.getLogger(__name__)

DEFAULT_TS: tuple[int, ...] = (1, 10, 100)
ZSRE_FILE = Path("zsre") / "zsre_mend_eval_portability_gpt4.json"
WISE_IRRELEVANT_FILE = Path("wise") / "hallucination" / "hallucination-train.json"


class ReproduceError(ValueError):
    """A reproduction cannot start or continue; the message says what to change."""


# --------------------------------------------------------------------------- configuration


@dataclass
class WiseTableConfig:
    """What ``lmedit reproduce wise-table`` runs; every field has a command-line option."""

    data: Path
    out: Path = Path("runs") / TABLE_NAME
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "float32"
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
    retention_data: Path | None = None  # None: the records of ``data`` after the edited ones
    irrelevant_file: Path | None = None
    checkpoint_minutes: float | None = None  # how often a chunk writes its state (None: lmedit.checkpoint's default)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout: str | None = None  # a key of TABLE_COLUMNS ("zsre", "hallucination"); None: detected from the data

    def __post_init__(self) -> None:

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
        if self.retention_data is not None:
            self.retention_data = Path(self.retention_data)
            if not self.retention_data.is_file():
                raise ReproduceError(f"--retention-data {self.retention_data} does not exist; pass a data file to draw "
                                     "held-out probes from")
        self.methods = tuple(get_method(m).name for m in self.methods)  # canonical names; unknown ones fail here
        self.overrides = {get_method(m).name: dict(v) for m, v in self.overrides.items()}
        self.Ts = tuple(sorted(set(self.Ts)))
        if self.layout is None:
            from lmedit.data import load_requests

            self.layout = detect_layout(load_requests(self.data, limit=self.limit, offset=self.offset))
        if self.layout not in TABLE_COLUMNS:
            raise ReproduceError(f"table layout {self.layout!r} is not one of {', '.join(TABLE_COLUMNS)}")

    @property
    def table(self) -> WiseTable:
        """The table this reproduction fills: every planned method and T, even those not run yet."""
        return WiseTable(layout=self.layout, methods=self.methods, Ts=self.Ts, model=self.model, data=str(self.data),
                         limit=self.limit, offset=self.offset)

    def eval_mode_for(self, method: str) -> str:
        """Methods registered with ``generation_scored`` (GRACE, DEFER, WISE) are also scored by generation
        (both modes in one run); others use ``eval_mode``."""
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

        model, tok = load_model(config.model, device=config.device, dtype=config.dtype)
    fingerprint = model_fingerprint(model)
    outcomes = []
    for method, T in config.plan():
        outcome = _run_one(config, method, T, requests, model, tok, show_progress)
        outcomes.append(outcome)
        if model_fingerprint(model) != fingerprint:
            raise ReproduceError(f"{method} T={T} left the model changed after restoring; later runs would be wrong")
        if on_run:
            on_run(outcome)
        write_table(config, outcomes)
    payload = write_table(config, outcomes)
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
        "retention_data": None if config.retention_data is None else str(config.retention_data),
        "irrelevant_file": None if config.irrelevant_file is None else str(config.irrelevant_file),
    }
    (config.out / "reproduce.json").write_text(json.dumps(plan, indent=2))


def _run_one(
    config: WiseTableConfig, method: str, T: int, requests: Sequence[EditRequest], model: torch.nn.Module, tok: Any,
    show_progress: bool,
) -> RunOutcome:
    from lmedit.lifelong import LifelongError
    from lmedit.runner import RunError

    folder = config.folder(method, T)
    status, seconds, error = run_unless_finished(
        folder, lambda: _run_method(config, method, T, requests, model, tok, show_progress), f"{method} T={T}",
        fatal=(RunError, LifelongError))  # another configuration's folder, or no held-out set: the user decides
    return RunOutcome(method, T, folder, status, seconds, error)


def run_unless_finished(folder: Path, run: Callable[[], None], what: str, fatal: tuple[type[Exception], ...],
                        failures: tuple[type[Exception], ...] = (ValueError, RuntimeError)) -> tuple[str, float, str | None]:
    """Run one cell of a reproduction unless its folder is finished: (status, seconds, error).

    ``fatal`` errors stop the reproduction (a ReproduceError naming ``what``); ``failures`` mark the cell
    ``failed`` and the reproduction goes on.
    """
    if run_finished(folder):
        return "done", 0.0, None
    started = time.perf_counter()
    try:
        run()
    except fatal as exc:
        raise ReproduceError(f"{what}: {exc}") from None
    except failures as exc:
        LOG.error("%s failed: %s", what, exc)
        return "failed", time.perf_counter() - started, str(exc)
    return "ran", time.perf_counter() - started, None


def run_finished(folder: Path) -> bool:
    """Whether the run folder's summary says every chunk is written."""
    from lmedit.runner import SUMMARY_FILE

    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        return False
    try:
        return bool(json.loads(summary_path.read_text()).get("complete"))
    except json.JSONDecodeError:
        return False


def run_progress(folder: Path) -> dict[str, Any] | None:
    """How far an unfinished run got: chunks written of all its chunks, and its minutes of work so far.

    The minutes are its edits and post-edit scores, summed from the records (so every session counts), without
    the pre-edit capture; ``minutes_left`` extends them at the mean per chunk so far. ``None`` where no run
    has started in ``folder``.
    """
    from lmedit.reports import read_run_records
    from lmedit.runner import RESULTS_FILE, SESSIONS_FILE, summarize

    sessions = folder / SESSIONS_FILE
    if not sessions.is_file():
        return None
    starts = [_json_or_none(line) for line in sessions.read_text().splitlines() if line.strip()]
    starts = [s for s in starts if isinstance(s, dict)]  # a line torn by a stopped process is skipped
    total = starts[-1].get("chunks") if starts else None  # the runner's own plan, written at every start
    records = read_run_records(folder / RESULTS_FILE)
    done = len({r["chunk"] for r in records})
    timing = summarize(records)["timing"] if records else {}
    minutes = (timing.get("edit_seconds_total", 0.0) + timing.get("post_eval_seconds_total", 0.0)) / 60
    left = minutes / done * (total - done) if done and isinstance(total, int) else None
    return {"chunks_done": done, "chunks": total, "work_minutes": minutes, "minutes_left": left}


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def unfinished_runs(planned: Iterable[tuple[str, Path]], failed: Collection[str] = ()) -> list[dict[str, Any]]:
    """Of the ``(label, folder)`` runs of a plan, those not finished, in plan order: how far each got
    (:func:`run_progress`), that it failed (its label in ``failed``: tried this time and failed), or that its
    records cannot be read (logged; the table is written all the same)."""
    from lmedit.reports import ReportError

    rows = []
    for label, folder in planned:
        if run_finished(folder):
            continue
        try:
            progress = run_progress(folder)
        except ReportError as exc:
            LOG.warning("cannot tell how far %s got: %s", folder, exc)
            rows.append({"run": label, "state": "unreadable", "chunks_done": 0, "chunks": None, "work_minutes": 0.0,
                         "minutes_left": None})
            continue
        state = "failed" if label in failed else "started" if progress is not None else "not started"
        rows.append({"run": label, "state": state,
                     **(progress or {"chunks_done": 0, "chunks": None, "work_minutes": 0.0, "minutes_left": None})})
    return rows


def _run_method(
    config: WiseTableConfig, method: str, T: int, requests: Sequence[EditRequest], model: torch.nn.Module, tok: Any,
    show_progress: bool,
) -> None:
    from lmedit.editor import Editor
    from lmedit.experiment import make_spec, run_experiment
    from lmedit.safe_files import file_sha256

    if config.model not in list_presets(method):
        raise ValueError(f"{method} has no preset for {config.model}; add presets/{method}/{config.model}.yaml")
    overrides = dict(config.overrides.get(method, {}))
    if config.irrelevant_file is not None and "irrelevant_file" in get_method(method).hparams_class.field_names():
        overrides.setdefault("irrelevant_file", str(config.irrelevant_file))  # methods that train against unrelated prompts
    eval_config = EvalConfig(mode=config.eval_mode_for(method), batch_size=config.eval_batch_size)
    editor = Editor(model, tok, method, preset=config.model, overrides=overrides, eval_config=eval_config,
                    model_name=config.model)
    spec = make_spec(editor, requests, protocol="sequential", T=T, seed=config.seed, data=str(config.data),
                     data_sha256=file_sha256(config.data), offset=config.offset, limit=config.limit,
                     extra={"reproduce": TABLE_NAME})
    run_experiment(editor, requests, spec, config.folder(method, T), retention=_retention(config, method, T),
                   show_progress=show_progress, checkpoint_minutes=config.checkpoint_minutes)


def _retention(config: WiseTableConfig, method: str, T: int) -> Any:
    """Retention settings of one run, or None; every run shares the held-out set in ``<out>/held_out.json``."""
    if not config.retention_every:
        return None
    from lmedit.experiment import RetentionSettings
    from lmedit.lifelong import HELD_OUT_FILE

    return RetentionSettings(every=config.retention_every, items=config.retention_items, data=config.data,
                             scan=config.retention_scan, held_out_file=config.out / HELD_OUT_FILE,
                             held_out_data=config.retention_data,
                             title=f"{method}, sequential T={T}, {config.model}")


def model_fingerprint(model: torch.nn.Module) -> tuple[float, ...]:
    """Cheap per-tensor sums of every parameter and buffer: a restore that was not exact shows up here."""
    with torch.no_grad():
        return tuple(float(t.double().sum()) for t in model.state_dict().values())


# --------------------------------------------------------------------------- the table (drawn by lmedit.reports)


def plan_runs(config: WiseTableConfig) -> list[dict[str, Any]]:
    """The plan's runs that have written a summary, read as :func:`lmedit.reports.load_run` reads them."""
    return load_written_runs(config.folder(method, T) for method, T in config.plan())


def load_written_runs(folders: Iterable[Path]) -> list[dict[str, Any]]:
    """The runs among ``folders`` that have written a summary (finished or not); a damaged one is left out."""
    from lmedit.reports import ReportError, load_run
    from lmedit.runner import SUMMARY_FILE

    runs = []
    for folder in folders:
        if (folder / SUMMARY_FILE).is_file():
            try:
                runs.append(load_run(folder))
            except (ReportError, json.JSONDecodeError) as exc:
                LOG.warning("leaving %s out of the table: %s", folder, exc)
    return runs


def write_table(config: WiseTableConfig, outcomes: Sequence[RunOutcome] = ()) -> dict[str, Any]:
    """``wise-table.md``, ``wise-table.json`` and ``wise-table.png`` in the output folder, from the run folders,
    with the runs not finished yet (``outcomes``: this reproduction's, to tell a failed run from one not started)."""
    from lmedit.reports.wise_table import write_table as write_wise_table

    failed = {f"{o.method} T={o.T}" for o in outcomes if o.status == "failed"}
    unfinished = unfinished_runs(((f"{m} T={T}", config.folder(m, T)) for m, T in config.plan()), failed)
    return write_wise_table(config.out, plan_runs(config), config.table, unfinished)
