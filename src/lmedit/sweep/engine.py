"""Running a sweep's jobs: one after another in this process, or their chunks as Ray tasks.

The sequential protocol's chunks are independent by design (each starts from
the unedited model, seeded ``seed + chunk``), so a chunk is the unit of work.
With Ray, each worker is an actor that loads a model once and runs chunk after
chunk on it, restoring it exactly in between. The driver (this process) is the
only writer of the run folders: it writes a job's ``config.json`` before any
chunk runs, appends each finished chunk's records in one write (the runner's own
format, so a chunk is on disk whole or not at all), and writes ``summary.json``
when the job's last chunk is in. So

* a worker that dies has its chunk run again on the restarted worker (Ray
  restarts the actor and retries the task), and the chunk is written once;
* rerunning a sweep skips the chunks already written (the runner's resume);
* the driver's death loses only the chunks in flight, and those continue from
  their last checkpoint (``checkpoints/`` in the job's folder, written by the
  worker every few minutes of a long chunk) where the workers share the folder's
  file system.

A worker computes a job's pre-edit reference over the same requests, in the
same batches, as ``lmedit run`` does (all chunks still to run, or per chunk in
half precision), and runs each chunk with the runner's own ``run_chunk``: the
summaries equal a serial run's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lmedit.sweep.plan import Job, SweepError

LOG = logging.getLogger(__name__)

PLAN_FILE = "sweep.json"


# --------------------------------------------------------------------------- what a worker does


@dataclass
class PreparedJob:
    editor: Any
    session: Any
    requests: list[Any]
    spec: Any
    chunks: list[Any]
    pre: dict[tuple[int, ...], Any]


class ChunkWorker:
    """Loads models once, prepares jobs (editor, requests, spec, chunk plan) and runs their chunks."""

    def __init__(self, device: str = "cpu", dtype: str = "float32", threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.device = device
        self.dtype = dtype
        self._models: dict[str, tuple[Any, Any]] = {}
        self._jobs: dict[str, PreparedJob] = {}

    def pid(self) -> int:
        return os.getpid()

    def adopt_model(self, name: str, model: Any, tok: Any) -> None:
        """Use an already loaded model for jobs that name ``name`` (a caller in this process that holds one)."""
        self._models[name] = (model, tok)

    def _model(self, name: str) -> tuple[Any, Any]:
        if name not in self._models:
            from lmedit.models import load_model

            self._models[name] = load_model(name, device=self.device, dtype=self.dtype)
        return self._models[name]

    def prepared(self, job: Job) -> PreparedJob:
        """The job's editor, requests, spec and chunks (built once per worker), as ``lmedit run`` builds them."""
        if job.name not in self._jobs:
            from lmedit.data import load_requests
            from lmedit.editor import Editor
            from lmedit.evaluation import EvalConfig
            from lmedit.evaluation.suites import required_specs
            from lmedit.experiment import make_spec
            from lmedit.runner import check_run
            from lmedit.safe_files import file_sha256

            data = None if job.data == "demo" else job.data
            requests = load_requests(data, limit=job.limit, offset=job.offset, format=job.data_format)
            model, tok = self._model(job.model)
            config = EvalConfig(mode=job.eval_mode, batch_size=job.eval_batch_size,
                                suites=required_specs(requests, job.suites))
            editor = Editor(model, tok, job.method, preset=job.preset, overrides=dict(job.overrides), eval_config=config,
                            model_name=job.model)
            spec = make_spec(editor, requests, protocol=job.protocol, T=job.T, batch_size=job.batch_size, seed=job.seed,
                             data=job.data, data_sha256=file_sha256(data) if data else None, offset=job.offset,
                             limit=job.limit, extra={"sweep_job": job.name,
                                                    **({"data_format": job.data_format} if job.data_format else {})})
            session = editor.session(seed=spec.seed)
            chunks = check_run(session, requests, spec)
            self._jobs[job.name] = PreparedJob(editor, session, requests, spec, chunks, {})
        return self._jobs[job.name]

    def forget(self, job: Job) -> None:
        """Drop a finished job's editor and session (a long serial plan need not keep them all)."""
        self._jobs.pop(job.name, None)

    def plan(self, job_dict: Mapping[str, Any]) -> dict[str, Any]:
        """The job's spec (for config.json) and chunk plan, for the driver."""
        prepared = self.prepared(Job.from_dict(job_dict))
        return {"spec": prepared.spec, "chunks": prepared.chunks}

    def run(self, job_dict: Mapping[str, Any], chunk_index: int, todo: Sequence[int],
            checkpoint_folder: str | None = None, checkpoint_minutes: float | None = None) -> dict[str, Any]:
        """Run one chunk; ``todo`` is every chunk of the job still to run (the pre-edit batches cover those).

        ``checkpoint_folder`` (the job's ``checkpoints/``): a long chunk writes its state there and a retry
        continues from it, as ``lmedit run`` does. Workers on machines that do not share the run folder's file
        system write a copy no retry elsewhere sees: their retried chunk starts from its first edit.
        """
        from lmedit.checkpoint import ChunkCheckpoints
        from lmedit.evaluation.captures import capture_reusing
        from lmedit.precision import is_half
        from lmedit.protocols import run_chunk

        prepared = self.prepared(Job.from_dict(job_dict))
        chunk = prepared.chunks[chunk_index]
        started = time.perf_counter()
        model = prepared.session.model
        evaluator = prepared.session.evaluator
        if is_half(next(model.parameters()).dtype):  # as the runner: per chunk, in the chunk's own batches
            pre = evaluator.capture(model, [prepared.requests[i] for i in chunk.requests])
        else:
            key = tuple(todo)
            if key not in prepared.pre:
                prepared.pre = {key: capture_reusing(evaluator, model, [prepared.requests[i] for c in todo
                                                                        for i in prepared.chunks[c].requests])}
            order = [i for c in todo for i in prepared.chunks[c].requests]
            position = {request: p for p, request in enumerate(order)}
            pre = prepared.pre[key].subset([position[i] for i in chunk.requests])
        pre_seconds = time.perf_counter() - started
        checkpoints = None
        if checkpoint_folder is not None:
            checkpoints = ChunkCheckpoints(Path(checkpoint_folder), prepared.spec.identity(), minutes=checkpoint_minutes)
        result = run_chunk(prepared.session, prepared.requests, chunk, pre, checkpoints=checkpoints)
        from lmedit.devices import peak_memory_bytes

        return {"records": result.records, "eval_seconds": result.eval_seconds, "pre_seconds": pre_seconds,
                "pid": os.getpid(), "memory": peak_memory_bytes()}


# --------------------------------------------------------------------------- the driver


@dataclass
class JobState:
    job: Job
    folder: Path
    spec: Any
    chunks: list[Any]
    todo: list[int]
    started: float = 0.0
    pre_seconds: float = 0.0
    memory: dict[str, Any] | None = None

    def finished(self) -> bool:
        return not self.todo


def write_plan(root: Path, jobs: Sequence[Job], engine: str, totals: Mapping[str, int]) -> None:
    from lmedit.safe_files import atomic_write_json

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / PLAN_FILE, {"engine": engine, "jobs": [{**j.to_dict(), "chunks": totals.get(j.name)}
                                                                     for j in jobs]}, indent=2)


def run_serial(jobs: Sequence[Job], root: Path, *, device: str = "cpu", dtype: str = "float32",
               threads: int | None = None, show_progress: bool = True,
               on_job: Callable[[Job, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Each job in order in this process, exactly as ``lmedit run`` would (one model load per model).

    ``threads`` sets this process's torch threads (as ``--threads`` does for Ray workers, for equal bits).
    """
    from lmedit.experiment import run_experiment

    worker = ChunkWorker(device, dtype, threads)
    prepared = {job.name: worker.prepared(job) for job in jobs}  # every job checked before the first edit
    write_plan(root, jobs, "serial", {name: len(p.chunks) for name, p in prepared.items()})
    summaries = {}
    for job in jobs:
        p = prepared[job.name]
        summaries[job.name], _ = run_experiment(p.editor, p.requests, p.spec, root / job.name, show_progress=show_progress)
        if on_job:
            on_job(job, summaries[job.name])
    return summaries


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail within seconds when ``--address host:port`` (or ``ray://host:port``) cannot be reached."""
    if not address or address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--address {address!r} is not auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as exc:
        raise SweepError(f"cannot reach the Ray cluster at {address} ({exc}); start it (ray start --head) or check "
                         "the address") from None


def start_ray(workers: int, address: str | None) -> Any:
    """Join the cluster at ``address`` (checked first), or start a local Ray with ``workers`` CPUs."""
    try:
        import ray
    except ImportError:
        raise SweepError("the Ray engine needs Ray: pip install 'lmedit[cluster]'") from None
    check_address(address)
    if ray.is_initialized():
        return ray
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **options)
        else:  # workers at this process's niceness: Ray's default of 15 starves them beside any busy process
            niceness = os.nice(0) if hasattr(os, "nice") else 0
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), _system_config={"worker_niceness": niceness},
                     **options)
    except ConnectionError as exc:
        raise SweepError(f"cannot join the Ray cluster at {address}: {exc}") from None
    return ray


def run_ray(jobs: Sequence[Job], root: Path, *, workers: int = 2, address: str | None = None, device: str = "cpu",
            dtype: str = "float32", threads: int | None = None, max_retries: int = 3, show_progress: bool = True,
            on_chunk: Callable[[Job, int, dict[str, Any]], None] | None = None,
            on_plan: Callable[[int, int], None] | None = None,
            on_plan_error: Callable[[Job, str], None] | None = None) -> dict[str, Any]:
    """Every unfinished chunk of every job as a task on ``workers`` Ray actors; returns the summaries.

    ``on_chunk(job, chunk, result)`` is called as each chunk is written; ``on_plan(written, total)``
    once the folders are read, with the chunks already written by an earlier run and all of them.
    A job that cannot be prepared (no preset, an untrained checkpoint) stops the sweep before any folder is
    touched, unless ``on_plan_error(job, message)`` is given: then that job is reported to it and left out.
    """
    from lmedit.checkpoint import CHECKPOINTS_DIR, ChunkCheckpoints
    from lmedit.progress import progress_bar
    from lmedit.runner import RESULTS_FILE, _append_records, _environment, _prepare_folder, hold_run_folder

    if workers < 1:
        raise SweepError("--workers must be at least 1")
    ray = start_ray(workers, address)
    gpus = 1 if device.startswith("cuda") or device == "auto" else 0
    per_worker = threads or default_threads()
    actor_class = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=-1, max_task_retries=max_retries)(ChunkWorker)
    actors = [actor_class.remote(device, dtype, per_worker) for _ in range(workers)]
    states: dict[str, JobState] = {}
    with contextlib.ExitStack() as held:
        refs = [actors[i % workers].plan.remote(job.to_dict()) for i, job in enumerate(jobs)]
        for job, ref in zip(jobs, refs):  # every job is checked (on a worker) before any folder is touched
            try:
                plan = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                if on_plan_error is None:
                    raise
                on_plan_error(job, str(getattr(exc, "cause", None) or exc))
                continue
            states[job.name] = JobState(job, root / job.name, plan["spec"], plan["chunks"], [])
        jobs = [job for job in jobs if job.name in states]
        write_plan(root, jobs, "ray", {name: len(s.chunks) for name, s in states.items()})
        # the workers' threads, not this driver's, are what the run's edits and timings depend on
        environment = {**_environment(), "threads": str(per_worker), "engine": "ray", "workers": str(workers)}
        for state in states.values():
            held.enter_context(hold_run_folder(state.folder))
            done = _prepare_folder(state.folder, state.spec, state.chunks, environment)
            state.todo = [c.index for c in state.chunks if c.index not in done]
            state.started = time.perf_counter()
        queue = [(state.job.name, c, tuple(state.todo)) for state in states.values() for c in state.todo]
        # longest chunks first (a T=10 chunk is ten T=1 chunks of work), so no long chunk is left alone at the end;
        # the order changes nothing in the results, which each chunk computes from the unedited model
        queue.sort(key=lambda task: -len(states[task[0]].chunks[task[1]].requests))
        total = sum(len(state.chunks) for state in states.values())
        LOG.info("sweep: %d of %d chunks already written; %d to run", total - len(queue), total, len(queue))
        if on_plan:
            on_plan(total - len(queue), total)
        for state in states.values():
            if state.finished():
                _write_summary(state)
        running: dict[Any, tuple[Any, tuple[str, int, tuple[int, ...]]]] = {}
        with progress_bar("sweep chunks", len(queue), enabled=show_progress) as advance:
            free = list(actors)
            while queue or running:
                while queue and free:
                    actor, task = free.pop(0), queue.pop(0)
                    name, chunk, todo = task
                    running[actor.run.remote(states[name].job.to_dict(), chunk, list(todo),
                                             str(states[name].folder / CHECKPOINTS_DIR))] = (actor, task)
                ready, _ = ray.wait(list(running), num_returns=1)
                actor, (name, chunk, _todo) = running.pop(ready[0])
                result = ray.get(ready[0])
                state = states[name]
                _append_records(state.folder / RESULTS_FILE, result["records"], result["eval_seconds"])
                ChunkCheckpoints.discard_written(state.folder / CHECKPOINTS_DIR, chunk)
                state.todo.remove(chunk)
                state.pre_seconds += result["pre_seconds"]
                state.memory = _larger(state.memory, result["memory"])
                free.append(actor)
                advance(1)
                if state.finished():
                    _write_summary(state)
                if on_chunk:  # after the summary, so a job's last chunk finds its summary complete
                    on_chunk(state.job, chunk, result)
    return {name: json.loads((s.folder / "summary.json").read_text()) for name, s in states.items()}


def default_threads() -> int:
    """The torch threads a worker uses unless told otherwise: this process's, as a serial run here would use.

    Float results depend on the intra-op thread count (a reduction split over 2
    threads sums in another order than over 1): measured on SmolLM2, workers with
    1 thread instead of 2 changed perplexities in the 6th digit and, after 10
    sequential edits, accuracies by up to 0.05. Same threads, same bits; fewer
    threads per worker (``--threads``) is faster on many cores but not bit-identical.
    """
    import torch

    return torch.get_num_threads()


def _larger(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    if a is None:
        return dict(b)
    return {k: max(a.get(k, 0), b.get(k, 0)) for k in set(a) | set(b)}


def _write_summary(state: JobState) -> None:
    """The job's summary.json, as the runner writes it (timing of this sweep session, the workers' peak memory)."""
    from lmedit.runner import RESULTS_FILE, SUMMARY_FILE, read_records, summarize
    from lmedit.safe_files import atomic_write_json

    summary = summarize(read_records(state.folder / RESULTS_FILE), state.chunks)
    summary["timing"]["pre_eval_seconds_this_session"] = state.pre_seconds
    summary["timing"]["wall_seconds_this_session"] = time.perf_counter() - state.started
    summary["memory"] = state.memory or {}
    atomic_write_json(state.folder / SUMMARY_FILE, summary, indent=2)
