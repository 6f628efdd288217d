"""Editing protocols as plans of independent chunks.

* ``single``: each request is edited alone, evaluated, and the model restored.
* ``batch``: ``batch_size`` requests go into one edit call, are evaluated, then restored.
* ``sequential`` with ``T``: requests are split in order into chunks of T;
  the T edits are applied one after another, then all T requests are
  evaluated on the model after the T-th edit, and the original model is
  restored before the next chunk (the WISE paper's protocol; the last chunk
  may be shorter). With ``batch_size`` > 1 each step of the chunk edits a
  batch (sequential batch editing, as in MEMIT/AlphaEdit papers).

A chunk always starts from the original model and carries its own seed, so
chunks are self-contained units of work that can be run in any order or
in other processes; :func:`run_chunk` is that unit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch

from lmedit.checkpoint import ChunkCheckpoints, ChunkProgress
from lmedit.evaluation.evaluator import Evaluator, Snapshot
from lmedit.forward.tokens import ContextLengthError, check_fits_context
from lmedit.handles import EditHandle, keep_first_copies, restore_all
from lmedit.limits import MemoryLimitError, check_eval_memory_for, check_state_memory
from lmedit.registry import MethodError, MethodInfo
from lmedit.requests import EditRequest

LOG = logging.getLogger(__name__)

ProtocolName = Literal["single", "batch", "sequential"]
PROTOCOLS: tuple[str, ...] = ("single", "batch", "sequential")


class ProtocolError(ValueError):
    """A protocol was asked for with settings that do not fit; the message says which."""


@dataclass(frozen=True)
class Chunk:
    """Requests (indices into the run's list) and how they are grouped into edit calls."""

    index: int
    steps: tuple[tuple[int, ...], ...]

    @property
    def requests(self) -> tuple[int, ...]:
        return tuple(i for step in self.steps for i in step)


def plan_chunks(
    n_requests: int, protocol: str, *, T: int | None = None, batch_size: int = 1
) -> list[Chunk]:
    """Split ``range(n_requests)`` into chunks for the protocol, in order."""
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if batch_size < 1:
        raise ProtocolError("batch size must be at least 1")
    if protocol == "sequential":
        if T is None or T < 1:
            raise ProtocolError("the sequential protocol needs T >= 1 (the number of edits before evaluation)")
        chunk_size, step_size = T, batch_size
    elif T is not None and T != 1:
        raise ProtocolError(f"T applies to the sequential protocol only; got T={T} with {protocol}")
    elif protocol == "single":
        if batch_size != 1:
            raise ProtocolError("the single protocol edits one request at a time; use --protocol batch for batches")
        chunk_size, step_size = 1, 1
    else:
        chunk_size, step_size = batch_size, batch_size
    chunks = []
    for c, start in enumerate(range(0, n_requests, chunk_size)):
        members = list(range(start, min(start + chunk_size, n_requests)))
        steps = tuple(tuple(members[s : s + step_size]) for s in range(0, len(members), step_size))
        chunks.append(Chunk(c, steps))
    return chunks


@dataclass
class EditSession:
    """Everything a chunk needs: the model, the method and its settings, the evaluator."""

    model: torch.nn.Module
    tok: Any
    method: MethodInfo
    hparams: Any
    evaluator: Evaluator
    seed: int = 0
    eval_each: bool = False

    def check(self, requests: Sequence[EditRequest], chunks: Sequence[Chunk]) -> None:
        """Validate every edit call up front, so bad input fails before hours of editing."""
        try:
            check_fits_context(self.model, self.tok, requests)
            check_eval_memory_for(self.model, self.tok, self.evaluator.config, requests)
            self.check_kept_state(chunks)
            self.check_edit_calls(chunks)
        except (ContextLengthError, MemoryLimitError) as exc:
            raise ProtocolError(str(exc)) from None
        for chunk in chunks:
            for step in chunk.steps:
                try:
                    self.method.check_requests([requests[i] for i in step])
                except MethodError as exc:
                    raise ProtocolError(str(exc)) from None

    def check_edit_calls(self, chunks: Sequence[Chunk]) -> None:
        """Refuse chunks with more edit calls than the method's store holds (``HyperParams.edit_calls_limit``)."""
        limit_of = getattr(self.hparams, "edit_calls_limit", None)
        limit = limit_of() if callable(limit_of) else None
        calls = max((len(chunk.steps) for chunk in chunks), default=0)
        if limit is not None and calls > limit[0]:
            raise ProtocolError(f"{self.method.name} holds at most {limit[0]} edit calls in one sequence, and a chunk "
                                f"of this run makes {calls}: {limit[1]}")

    def check_kept_state(self, chunks: Sequence[Chunk]) -> None:
        """Refuse chunks whose edits the method could not keep in memory (its ``kept_state`` estimate)."""
        estimate = self.method.kept_state
        edits = max((len(chunk.requests) for chunk in chunks), default=0)
        if estimate is None or edits < 2:
            return
        needed, what, fix = estimate(self.model, self.hparams, edits)
        check_state_memory(self.method.name, needed, edits, self.model, what=what, fix=fix)


@dataclass
class ChunkResult:
    chunk: int
    records: list[dict[str, Any]] = field(default_factory=list)
    edit_seconds: float = 0.0
    eval_seconds: float = 0.0


def run_chunk(
    session: EditSession,
    requests: Sequence[EditRequest],
    chunk: Chunk,
    pre: Snapshot,
    *,
    on_step: Callable[[], None] | None = None,
    after_step: Callable[[Chunk, int], None] | None = None,
    checkpoints: ChunkCheckpoints | None = None,
) -> ChunkResult:
    """Apply the chunk's edits in order, evaluate its requests, restore the original model.

    ``pre`` is the pre-edit capture of exactly ``chunk.requests`` (in that order).
    ``after_step(chunk, steps_done)`` is called on the edited model after each step, outside the
    edit timing (e.g. for retention curves, :mod:`lmedit.lifelong`); it must not change the model.
    ``checkpoints`` writes the chunk's state every few minutes of editing and continues a chunk
    from the one a stopped run left (:mod:`lmedit.checkpoint`); ``on_step`` is then called at
    once for the steps the checkpoint holds.
    """
    torch.manual_seed(session.seed + chunk.index)
    chunk_requests = [requests[i] for i in chunk.requests]
    position = {request: p for p, request in enumerate(chunk.requests)}
    result = ChunkResult(chunk.index)
    progress = ChunkProgress()
    handles: list[EditHandle] = []
    try:
        if checkpoints is not None and checkpoints.wanted(len(chunk.steps)):
            resumed = checkpoints.load(session.model, chunk.index, chunk.steps)
            if resumed is not None:
                handles, progress = resumed
                if on_step:
                    for _ in range(progress.steps_done):
                        on_step()
            checkpoints.start()
        for done, step in enumerate(chunk.steps, start=1):
            if done <= progress.steps_done:
                continue
            started = time.perf_counter()
            handle = session.method.apply(session.model, session.tok, [requests[i] for i in step], session.hparams)
            keep_first_copies(handles, handle)
            handles.append(handle)
            elapsed = time.perf_counter() - started
            progress.edit_seconds += elapsed
            for i in step:
                progress.step_info[i] = _summarise_info(handle.info)
                progress.step_seconds[i] = elapsed / len(step)
            if session.eval_each:
                started = time.perf_counter()
                local = [position[i] for i in step]
                scores = session.evaluator.score(session.model, [requests[i] for i in step], pre.subset(local))
                progress.post_each.update(zip(step, scores))
                progress.eval_seconds += time.perf_counter() - started
            progress.steps_done = done
            if on_step:
                on_step()
            if after_step:
                after_step(chunk, done)
            if checkpoints is not None and checkpoints.due(done, len(chunk.steps)):
                checkpoints.save(session.model, handles, chunk.index, chunk.steps, progress)
        started = time.perf_counter()
        post = session.evaluator.score(session.model, chunk_requests, pre)
        progress.eval_seconds += time.perf_counter() - started
    finally:
        restore_all(handles)
    result.edit_seconds, result.eval_seconds = progress.edit_seconds, progress.eval_seconds
    per_request_edit = result.edit_seconds / max(len(chunk_requests), 1)
    for p, i in enumerate(chunk.requests):
        record: dict[str, Any] = {
            "index": i,
            "case_id": requests[i].case_id,
            "chunk": chunk.index,
            "pre": pre.metrics[p],
            "post": post[p],
            "edit_info": progress.step_info.get(i, {}),
            "edit_seconds": per_request_edit,
            "step_seconds": progress.step_seconds.get(i, 0.0),
        }
        if session.eval_each:
            record["post_each"] = progress.post_each[i]
        result.records.append(record)
    return result


def _summarise_info(info: dict[str, Any]) -> dict[str, Any]:
    """Keep method info small in results: last loss and step count instead of whole loss curves."""
    summary = {k: v for k, v in info.items() if not isinstance(v, (list, tuple, dict))}
    losses = info.get("losses")
    if isinstance(losses, (list, tuple)) and losses:
        summary["final_loss"] = losses[-1]
        summary["first_loss"] = losses[0]
    return summary
