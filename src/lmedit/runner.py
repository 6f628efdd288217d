"""Benchmark runs: plan, capture pre-edit state, run chunks, write results as they come.

A run folder holds ``config.json`` (the resolved configuration),
``results.jsonl`` (one line per request, appended as each chunk finishes)
and ``summary.json`` (means of every pre and post metric, per chunk and
overall). Re-running into the same folder with the same configuration
resumes: finished chunks are kept and skipped.

Kill safety: the folder is held (:func:`lmedit.safe_files.hold_folder`) for the
whole run, so a second process writing into it stops at once. ``config.json``
and ``summary.json`` are replaced atomically; a chunk's records are appended in
one write and fsynced. A kill can leave part of a chunk's records, or half a
line, at the end of ``results.jsonl``; resuming first rewrites the file with
only the complete chunks, then runs the rest, so a run killed any number of
times ends with the same records as an uninterrupted one (each request once).
A long sequential chunk also writes its state to ``checkpoints/`` every
:data:`lmedit.checkpoint.DEFAULT_CHECKPOINT_MINUTES` of editing (:mod:`lmedit.checkpoint`), and a
rerun continues it from there rather than from its first edit.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import platform
import time
from collections import defaultdict
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lmedit.checkpoint import CHECKPOINTS_DIR, ChunkCheckpoints
from lmedit.devices import peak_memory_bytes
from lmedit.evaluation.captures import capture_reusing
from lmedit.precision import is_half
from lmedit.progress import progress_bar
from lmedit.protocols import Chunk, EditSession, plan_chunks, run_chunk
from lmedit.registry import with_hparam_defaults
from lmedit.requests import EditRequest
from lmedit.safe_files import (FolderBusy, append_lines, atomic_write_json, atomic_write_text, ensure_folder_free,
                               hold_folder, remove_stale_temp_files)

LOG = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
SESSIONS_FILE = "sessions.jsonl"


class RunError(RuntimeError):
    """A run cannot start or resume; the message says why and what to do."""


RunFolderBusy = FolderBusy  # another process is writing the same run folder


def hold_run_folder(out: str | Path) -> Any:
    """Hold ``out`` for this process while a run writes it (a context manager; nested holds are free)."""
    return hold_folder(out, "run folder", "wait for it or choose another --out")


def ensure_run_folder_free(out: str | Path) -> None:
    """Raise :class:`RunFolderBusy` if another process is running into ``out`` (writes nothing)."""
    ensure_folder_free(out, "run folder", "wait for it or choose another --out")


@dataclass
class RunSpec:
    """What a run does, independent of where the model lives; written to config.json."""

    method: str
    model: str
    protocol: str
    hparams: dict[str, Any]
    eval: dict[str, Any]
    T: int | None = None
    batch_size: int = 1
    seed: int = 0
    eval_each: bool = False
    data: str | None = None
    data_sha256: str | None = None
    offset: int = 0
    limit: int | None = None
    n_requests: int = 0
    preset: str | None = None
    hparams_file: str | None = None
    dtype: str = "float32"  # the model's weights: a bfloat16 run does not resume a float32 one
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The parts that must match for a folder to be resumed."""
        return {k: v for k, v in self.__dict__.items() if k not in ("extra",)}


def default_out_dir(method: str, root: Path | str = "runs") -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{method}"



def run_benchmark(
    session: EditSession,
    requests: Sequence[EditRequest],
    spec: RunSpec,
    out_dir: str | Path,
    *,
    show_progress: bool = True,
    after_step: Callable[[Chunk, int], None] | None = None,
    chunks: Sequence[Chunk] | None = None,
    checkpoint_minutes: float | None = None,
) -> dict[str, Any]:
    """Run the protocol over ``requests`` and return the summary (also written to ``out_dir``).

    ``after_step`` is passed to :func:`lmedit.protocols.run_chunk` (called after each edit step).
    ``chunks``: the plan :func:`check_run` already made and checked (None: make and check it here).
    """
    out = Path(out_dir)
    chunks = check_run(session, requests, spec) if chunks is None else chunks
    with hold_run_folder(out):
        checkpoints = ChunkCheckpoints(out / CHECKPOINTS_DIR, spec.identity(), minutes=checkpoint_minutes)
        return _run_held(session, requests, spec, out, chunks, show_progress, after_step, checkpoints)


def check_run(session: EditSession, requests: Sequence[EditRequest], spec: RunSpec) -> list[Chunk]:
    """Plan the chunks and validate every edit call, before anything is written."""
    chunks = plan_chunks(len(requests), spec.protocol, T=spec.T, batch_size=spec.batch_size)
    session.check(requests, chunks)
    # suites hook: record each metric suite's resolved settings (those the data switches on included)
    spec.extra.setdefault("suites", session.evaluator.suite_settings(requests))
    return chunks


def _run_held(session: EditSession, requests: Sequence[EditRequest], spec: RunSpec, out: Path,
              chunks: Sequence[Chunk], show_progress: bool, after_step: Callable[[Chunk, int], None] | None,
              checkpoints: ChunkCheckpoints | None = None) -> dict[str, Any]:
    """The run itself, while this process holds ``out``."""
    done = _prepare_folder(out, spec, chunks)
    todo = [c for c in chunks if c.index not in done]
    if done:
        LOG.info("resuming %s: %d of %d chunks already done", out, len(done), len(chunks))
    todo_requests = [i for c in todo for i in c.requests]
    started = time.perf_counter()
    # In bfloat16/float16 the pre-edit reference is taken per chunk, in the same batches the chunk's post-edit
    # scores use: scored in other batches, the unedited model's own answers already differed (SmolLM2 in bfloat16,
    # zsRE 0-49, no edit at all: locality 0.972 against 1.000), which would be charged to the edit.
    per_chunk = is_half(next(session.model.parameters()).dtype)
    pre_all = None
    if not per_chunk:
        todo_list = [requests[i] for i in todo_requests]
        units = len(session.evaluator.probes(todo_list)) * _passes(session)
        with progress_bar("pre-edit evaluation", units, enabled=show_progress) as advance:
            # a capture an earlier run in this process made on the same unedited model is reused as it is
            pre_all = capture_reusing(session.evaluator, session.model, todo_list, advance, units)
    pre_seconds = time.perf_counter() - started
    offsets = {request: p for p, request in enumerate(todo_requests)}
    with progress_bar(f"{spec.method} {spec.protocol}", sum(len(c.steps) for c in todo), enabled=show_progress) as advance:
        for chunk in todo:
            if pre_all is None:
                chunk_started = time.perf_counter()
                pre = session.evaluator.capture(session.model, [requests[i] for i in chunk.requests])
                pre_seconds += time.perf_counter() - chunk_started
            else:
                pre = pre_all.subset([offsets[i] for i in chunk.requests])
            result = run_chunk(session, requests, chunk, pre, on_step=lambda: advance(1), after_step=after_step,
                               checkpoints=checkpoints)
            _append_records(out / RESULTS_FILE, result.records, result.eval_seconds)
            if checkpoints is not None:
                checkpoints.discard(chunk.index)
    summary = summarize(read_records(out / RESULTS_FILE), chunks)
    summary["timing"]["pre_eval_seconds_this_session"] = pre_seconds
    summary["timing"]["wall_seconds_this_session"] = time.perf_counter() - started
    summary["memory"] = peak_memory_bytes()  # this process's peak (CPU resident set; CUDA allocator on GPUs)
    atomic_write_json(out / SUMMARY_FILE, summary, indent=2)
    return summary


def _passes(session: EditSession) -> int:
    return 2 if session.evaluator.config.mode == "both" else 1


def _prepare_folder(out: Path, spec: RunSpec, chunks: Sequence[Chunk],
                    environment: dict[str, str] | None = None) -> set[int]:
    """Create the folder, or check it belongs to the same run; return the chunks already done.

    Called while holding the folder: temp files and records of a chunk that a
    kill interrupted are dropped here, so the chunk runs again and is recorded once.
    Every start and resume adds a line to ``sessions.jsonl`` with its own
    ``environment`` (this process's by default), so a run continued over several
    sessions or machines records each one; ``config.json`` keeps the first's.
    """
    environment = _environment() if environment is None else environment
    done = _check_or_create(out, spec, chunks, environment)
    append_lines(out / SESSIONS_FILE, [json.dumps({
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "chunks_done": len(done), "chunks": len(chunks), "environment": environment})])
    return done


def _check_or_create(out: Path, spec: RunSpec, chunks: Sequence[Chunk], environment: dict[str, str]) -> set[int]:
    """The folder check of :func:`_prepare_folder`, apart so that every outcome but a refusal is logged once."""
    config_path = out / CONFIG_FILE
    payload = {**spec.identity(), "extra": spec.extra, "environment": environment}
    remove_stale_temp_files(out)
    if config_path.is_file():
        previous = with_hparam_defaults(_read_config(config_path))
        previous["eval"] = _with_eval_defaults(previous.get("eval"))
        previous.setdefault("dtype", "float32")  # folders written before runs recorded it were all float32
        # compared as JSON, the form config.json stores (a tuple setting reads back as a list)
        mismatched = [k for k, v in spec.identity().items() if previous.get(k) != json.loads(json.dumps(v))]
        if mismatched:
            raise RunError(
                f"{out} holds a different run (differs in {', '.join(mismatched)}); "
                "choose another --out folder, or delete this one to start again"
            )
        return _keep_complete_chunks(out / RESULTS_FILE, chunks)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_FILE
    if results.is_file() and results.stat().st_size > 0:
        raise RunError(f"{out} has results but no {CONFIG_FILE}; choose another --out folder")
    results.unlink(missing_ok=True)  # empty: a kill before the first record, nothing to keep
    atomic_write_json(config_path, payload, indent=2)
    return set()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        previous = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is damaged ({exc}); delete the run folder to start again, "
                       "or choose another --out folder") from None
    if not isinstance(previous, dict):
        raise RunError(f"{path} is not a run configuration (a JSON object); choose another --out folder")
    return previous


def _keep_complete_chunks(path: Path, chunks: Sequence[Chunk]) -> set[int]:
    """The chunks whose every request has a record; rewrite ``path`` (atomically) to hold exactly those.

    A kill while a chunk's records were appended can leave some of them, or a
    torn last line: both are dropped, and the chunk counts as not done. Complete
    chunks written out of order (Ray finishes them so) are only put in request order.
    """
    records = read_records(path)
    present: dict[int, set[int]] = defaultdict(set)
    for record in records:
        present[record["chunk"]].add(record["index"])
    done = {c.index for c in chunks if c.requests and present.get(c.index, set()) >= set(c.requests)}
    wanted = {i for c in chunks if c.index in done for i in c.requests}
    kept = [r for r in records if r["chunk"] in done and r["index"] in wanted]
    canonical = "".join(json.dumps(r) + "\n" for r in kept)
    current = path.read_text() if path.is_file() else ""
    if current != canonical:
        dropped = len(current.splitlines()) - len(kept)
        if dropped:
            LOG.warning("%s: dropping %d record line(s) of interrupted chunks; those chunks run again", path, dropped)
        atomic_write_text(path, canonical)
    return done


def _with_eval_defaults(stored: Any) -> Any:
    """A folder written before an evaluation setting existed ran with that setting's default: fill it in,
    so adding a setting to :class:`EvalConfig` does not stop older folders from resuming."""
    if not isinstance(stored, dict):
        return stored
    from lmedit.evaluation.evaluator import EvalConfig

    defaults = {f.name: f.default for f in fields(EvalConfig) if f.default is not MISSING}
    return {**json.loads(json.dumps(defaults)), **stored}


def _environment() -> dict[str, str]:
    import torch
    import transformers

    from lmedit import __version__

    return {
        "lmedit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
    }


def _append_records(path: Path, records: Iterable[dict[str, Any]], eval_seconds: float) -> None:
    """Append one chunk's records in a single write, then fsync: the chunk is on disk before the next starts."""
    records = list(records)
    append_lines(path, (json.dumps({**r, "eval_seconds": eval_seconds / max(len(records), 1)}) for r in records))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read results.jsonl, skipping a torn last line from an interrupted write; keep the newest per request."""
    if not path.is_file():
        return []
    by_index: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            LOG.warning("skipping an incomplete line in %s", path)
            continue
        by_index[record["index"]] = record
    return [by_index[i] for i in sorted(by_index)]


def mean_metrics(rows: Iterable[dict[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """Mean of each metric over the rows that have it, with the count behind each mean."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        for key, value in row.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            sums[key] += value
            counts[key] += 1
    return {k: sums[k] / counts[k] for k in sorted(sums)}, dict(sorted(counts.items()))


def summarize(records: Sequence[dict[str, Any]], chunks: Sequence[Chunk] | None = None) -> dict[str, Any]:
    """Means over requests, per chunk, and the mean of the chunk means (the WISE paper averages runs)."""
    summary: dict[str, Any] = {"n": len(records)}
    for phase in ("pre", "post", "post_each"):
        rows = [r[phase] for r in records if phase in r]
        if rows:
            summary[phase], summary.setdefault("counts", {})[phase] = mean_metrics(rows)
    by_chunk: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_chunk[record["chunk"]].append(record)
    summary["chunks"] = [
        {"chunk": c, "n": len(rs), "post": mean_metrics(r["post"] for r in rs)[0], "pre": mean_metrics(r["pre"] for r in rs)[0]}
        for c, rs in sorted(by_chunk.items())
    ]
    if summary["chunks"]:
        summary["chunk_mean"] = {"post": mean_metrics(c["post"] for c in summary["chunks"])[0]}
    if chunks is not None:
        summary["complete"] = len(by_chunk) == len(chunks)
    edit = sum(r.get("edit_seconds", 0.0) for r in records)
    evaluation = sum(r.get("eval_seconds", 0.0) for r in records)
    summary["timing"] = {
        "edit_seconds_total": edit,
        "edit_seconds_per_request": edit / max(len(records), 1),
        "post_eval_seconds_total": evaluation,
    }
    return summary
