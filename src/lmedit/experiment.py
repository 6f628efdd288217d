"""One run of an editor over a benchmark, the way ``Editor.run``, ``lmedit run`` and ``lmedit reproduce`` all do it.

The orchestration layer above methods and the runner: :func:`make_spec` writes
down what a run does (``config.json``), :func:`run_experiment` sets up the
optional retention tracking (held-out probes, the tracker, the curves written
at the end) and hands the edit loop to :func:`lmedit.runner.run_benchmark`.
Keeping both in one place is what makes a CLI run, a library run and a
reproduction's run write the same folder for the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from lmedit.protocols import Chunk
from lmedit.requests import EditRequest
from lmedit.runner import RunSpec, check_run, default_out_dir, hold_run_folder, run_benchmark

if TYPE_CHECKING:
    from lmedit.editor import Editor
    from lmedit.lifelong import HeldOutSet, RetentionTracker

AfterStep = Callable[[Chunk, int], None]


@dataclass(frozen=True)
class RetentionSettings:
    """Retention curves (ERR/TRR) every ``every`` edits, on ``items`` held-out probes.

    The probes come from the ``scan`` records of ``data`` (None: the demo set) after
    the edited range, and are chosen once and kept in ``held_out_file`` (None: the
    run folder's ``held_out.json``); runs that must share one held-out set (a
    reproduction) point it at one file. ``held_out_data`` draws them instead from
    the first ``scan`` records of another file, for a run that edits a whole file
    (T=1000 on all of zsRE leaves no records after it); probes asking an edited
    prompt or rephrasing are left out. ``title`` heads ``lifelong.png`` (None: the
    method and protocol).
    """

    every: int
    items: int = 50
    data: str | Path | None = None
    data_format: str | None = None
    scan: int = 400
    held_out_file: Path | None = None
    held_out_data: str | Path | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"--retention-every must be 0 (off) or a positive number of edits, got {self.every}")
        if self.items < 1:
            raise ValueError(f"--retention-items must be at least 1, got {self.items}")


def make_spec(
    editor: "Editor",
    requests: Sequence[EditRequest],
    *,
    protocol: str = "single",
    T: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    eval_each: bool = False,
    data: str | None = None,
    data_sha256: str | None = None,
    offset: int = 0,
    limit: int | None = None,
    extra: dict[str, Any] | None = None,
) -> RunSpec:
    """The run's ``config.json`` identity: the editor's method, model, hyperparameters and evaluation settings
    plus the protocol and data selection. The only place a :class:`RunSpec` is built from an editor."""
    weights = next(editor.model.parameters())
    placement = {"device": str(weights.device), "dtype": str(weights.dtype).removeprefix("torch."),
                 "device_map": getattr(editor.model, "hf_device_map", None)}
    return RunSpec(
        method=editor.method.name,
        model=editor.model_name,
        protocol=protocol,
        hparams=editor.hparams.to_dict(),
        eval=dict(editor.evaluator.config.__dict__),
        T=T,
        batch_size=batch_size,
        seed=seed,
        eval_each=eval_each,
        data=data,
        data_sha256=data_sha256,
        offset=offset,
        limit=limit,
        n_requests=len(requests),
        preset=editor.preset,
        hparams_file=editor.hparams_file,
        dtype=placement["dtype"],
        extra={"placement": placement, **(extra or {})},
    )


def run_experiment(
    editor: "Editor",
    requests: Sequence[EditRequest],
    spec: RunSpec,
    out_dir: str | Path | None = None,
    *,
    retention: RetentionSettings | None = None,
    show_progress: bool = True,
    after_step: AfterStep | None = None,
    checkpoint_minutes: float | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run ``spec`` with ``editor`` over ``requests`` into ``out_dir`` (None: ``runs/<time>-<method>``).

    Returns the summary and the run folder. A folder holding the same run resumes; a folder another
    process is writing raises :class:`lmedit.runner.RunFolderBusy` before anything is written.
    ``retention`` also records retention curves (``retention.jsonl``, ``lifelong.json``,
    ``lifelong.png``); ``after_step`` is any other hook called after each edit step,
    which must not change the model. ``checkpoint_minutes``: how often a long sequential chunk writes
    its state, so that a rerun continues it (None: the runner's default; 0: never).
    """
    out = Path(out_dir) if out_dir is not None else default_out_dir(spec.method)
    session = editor.session(seed=spec.seed, eval_each=spec.eval_each)
    chunks = check_run(session, requests, spec)  # bad input fails before the folder is touched
    with hold_run_folder(out):  # the whole run, retention files included: a second writer stops at once
        tracker = _retention_tracker(editor, requests, spec, out, retention) if retention is not None else None
        summary = run_benchmark(session, requests, spec, out, show_progress=show_progress,
                                after_step=_chain(tracker, after_step), chunks=chunks,
                                checkpoint_minutes=checkpoint_minutes)
        if tracker is not None:
            _write_curves(out, tracker, spec, retention)
    return summary, out


def _held_out(editor: "Editor", requests: Sequence[EditRequest], spec: RunSpec, retention: RetentionSettings,
              out: Path) -> "HeldOutSet":
    """The run's held-out probes (chosen once, then read back): from the records after its edited range, or from
    the start of ``retention.held_out_data``, never a prompt the run edits."""
    from lmedit.lifelong import HELD_OUT_FILE, choose_held_out

    if retention.held_out_data is not None:
        data, after, data_format = retention.held_out_data, 0, None
    else:
        edited = spec.limit if spec.limit is not None else spec.n_requests  # raw records, as --limit counts them
        data, after, data_format = retention.data, spec.offset + edited, retention.data_format
    edited_prompts = {prompt for r in requests for prompt in (r.prompt, *r.rephrase)}
    return choose_held_out(data, editor.model, editor.tok, after=after, items=retention.items,
                           path=retention.held_out_file or out / HELD_OUT_FILE, scan=retention.scan,
                           batch_size=editor.evaluator.config.batch_size, data_format=data_format,
                           exclude=edited_prompts)


def _retention_tracker(editor: "Editor", requests: Sequence[EditRequest], spec: RunSpec, out: Path,
                       retention: RetentionSettings) -> "RetentionTracker":
    from lmedit.lifelong import RetentionTracker

    held_out = _held_out(editor, requests, spec, retention, out)
    return RetentionTracker(editor.model, editor.evaluator, requests, out, held_out, retention.every)


def _write_curves(out: Path, tracker: "RetentionTracker", spec: RunSpec, retention: RetentionSettings) -> None:
    from lmedit.lifelong import write_curves

    title = retention.title or f"{spec.method}, {spec.protocol}" + (f" T={spec.T}" if spec.T else "")
    write_curves(out, tracker.held_out, title=title,
                 meta={"every": retention.every, "tracking_seconds_this_session": tracker.seconds})


def _chain(*hooks: AfterStep | None) -> AfterStep | None:
    """One ``after_step`` calling each given hook in order (None when there is none)."""
    present = [hook for hook in hooks if hook is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def call_all(chunk: Chunk, steps_done: int) -> None:
        for hook in present:
            hook(chunk, steps_done)

    return call_all
