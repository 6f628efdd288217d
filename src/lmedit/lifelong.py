"""Lifelong-editing metrics: how earlier edits and held-out knowledge survive as edits accumulate.

The sequential protocol already reports, after the last edit of a chunk,
rewrite / rephrase / locality over every edit of the chunk (the WISE paper's
Rel. / Gen. / Loc.). This module adds the curves against the number of edits:

* **edit retention** (GRACE's ERR): after edit t, the mean teacher-forced
  rewrite accuracy of edits 1..t, plus their mean perplexity (``edit_ppl``,
  the WISE hallucination metric when the edits are hallucination passages);
* **test retention** (GRACE's TRR): the accuracy on held-out probes that the
  unedited model answered correctly (teacher-forced accuracy 1), plus their
  agreement with the unedited model's tokens and their perplexity.

A :class:`RetentionTracker` is passed to :func:`lmedit.runner.run_benchmark` as
``after_step``. It scores every ``every`` edits (and after the chunk's last)
through the run's :class:`~lmedit.evaluation.Evaluator` in batches, reads the
model only, and appends one row per checkpoint to ``retention.jsonl`` in the run
folder; :func:`write_curves` turns the rows into ``lifelong.json`` and
``lifelong.png`` (drawn by :mod:`lmedit.reports.plots`). Every run sets these up
in one place, :func:`lmedit.experiment.run_experiment` with ``RetentionSettings``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import torch

from lmedit.evaluation.evaluator import Evaluator, ProbeOutcome, ProbeRef, locality_agreement
from lmedit.forward import generate_greedy, tokenize_pair
from lmedit.protocols import Chunk
from lmedit.requests import EditRequest
from lmedit.safe_files import append_lines

LOG = logging.getLogger(__name__)

RETENTION_FILE = "retention.jsonl"
CURVES_JSON = "lifelong.json"
CURVES_PNG = "lifelong.png"
HELD_OUT_FILE = "held_out.json"

# metric -> (label, is a perplexity)
CURVE_METRICS: dict[str, tuple[str, bool]] = {
    "edit_retention": ("edit retention (ERR): rewrite acc. of edits 1..t", False),
    "test_retention": ("test retention (TRR): held-out acc.", False),
    "held_out_agreement": ("held-out agreement with the unedited model", False),
    "edit_ppl": ("perplexity of edits 1..t", True),
    "held_out_ppl": ("held-out perplexity", True),
}


class LifelongError(ValueError):
    """Retention tracking was set up with something it cannot use; the message says what to change."""


# --------------------------------------------------------------------------- held-out probes


@dataclass(frozen=True)
class HeldOutProbe:
    """A (prompt, answer) pair outside the edited range; ``source`` says where it came from."""

    prompt: str
    answer: str
    source: str


@dataclass
class HeldOutSet:
    """Held-out probes with the unedited model's teacher-forced outcomes (the reference for TRR)."""

    probes: list[HeldOutProbe]
    pre: list[ProbeOutcome]
    require_correct: bool = True
    scanned: int = 0
    answers: str = "gold"  # "gold": the data's answers; "model": the unedited model's own greedy answers

    def __len__(self) -> int:
        return len(self.probes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "require_correct": self.require_correct,
            "scanned": self.scanned,
            "answers": self.answers,
            "probes": [
                {**dataclasses.asdict(p), "pre_predicted": list(o.teacher_predicted), "pre_target": list(o.teacher_target),
                 "pre_accuracy": o.teacher_accuracy, "pre_nll": o.teacher_nll}
                for p, o in zip(self.probes, self.pre)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeldOutSet":
        probes, pre = [], []
        for item in data["probes"]:
            probes.append(HeldOutProbe(item["prompt"], item["answer"], item["source"]))
            pre.append(ProbeOutcome(teacher_predicted=tuple(item["pre_predicted"]), teacher_target=tuple(item["pre_target"]),
                                    teacher_accuracy=item["pre_accuracy"], teacher_nll=item["pre_nll"]))
        return cls(probes, pre, bool(data.get("require_correct", True)), int(data.get("scanned", 0)),
                   str(data.get("answers", "gold")))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeldOutSet":
        return cls.from_dict(json.loads(Path(path).read_text()))


def held_out_candidates(requests: Iterable[EditRequest]) -> list[HeldOutProbe]:
    """Candidate held-out probes from requests that are *not* edited: each one's locality probes
    (zsRE: the NQ question, as GRACE's TRR uses NQ) and its own prompt with the true answer."""
    candidates = []
    for request in requests:
        for group, probes in request.locality.items():
            candidates.extend(HeldOutProbe(p.prompt, p.answer, f"locality:{group}") for p in probes if p.answer.strip())
        if request.ground_truth and request.ground_truth.strip():
            candidates.append(HeldOutProbe(request.prompt, request.ground_truth, "ground_truth"))
    return candidates


def select_held_out(
    model: torch.nn.Module,
    evaluator: Evaluator,
    candidates: Sequence[HeldOutProbe],
    items: int,
    *,
    require_correct: bool = True,
    batch: int = 256,
) -> HeldOutSet:
    """The first ``items`` candidates (in order) the unedited model answers correctly under teacher forcing
    (every answer token is the argmax), or simply the first ``items`` when ``require_correct`` is off
    (perplexity-only data such as WISE's hallucination passages). Scored in batches; the model is only read."""
    if items < 1:
        raise LifelongError("the held-out set needs at least one item (--retention-items >= 1)")
    teacher = _teacher_evaluator(evaluator)
    chosen: list[HeldOutProbe] = []
    outcomes: list[ProbeOutcome] = []
    for start in range(0, len(candidates), batch):
        block = list(candidates[start : start + batch])
        results = teacher.run_probes(model, _refs(block))
        for offset, (probe, outcome) in enumerate(zip(block, results)):
            if not require_correct or outcome.teacher_accuracy == 1.0:
                chosen.append(probe)
                outcomes.append(outcome)
            if len(chosen) == items:
                return HeldOutSet(chosen, outcomes, require_correct, scanned=start + offset + 1)
    LOG.warning("only %d of the %d held-out items asked for were found in %d candidates",
                len(chosen), items, len(candidates))
    return HeldOutSet(chosen, outcomes, require_correct, scanned=len(candidates))


def own_answers(
    model: torch.nn.Module, tok: Any, candidates: Sequence[HeldOutProbe], *, batch: int = 128,
) -> list[HeldOutProbe]:
    """The candidates with the unedited model's own greedy answer (as many tokens as the data's answer) in place
    of the data's answer.

    GRACE holds out questions the model answers correctly; a 135M model answers almost none of zsRE's or NQ's
    exactly (1 of 800 candidates on SmolLM2), so TRR is measured on what the model itself answered instead:
    whether it still gives the same answer after the edits. Empty answers are dropped.
    """
    lengths = [max(1, len(tokenize_pair(tok, c.prompt, c.answer).target_ids)) for c in candidates]
    generated = generate_greedy(model, tok, [c.prompt for c in candidates], lengths, batch_size=batch)
    answered = []
    for candidate, tokens in zip(candidates, generated):
        text = tok.decode(list(tokens), skip_special_tokens=True).strip()
        if text:
            answered.append(HeldOutProbe(candidate.prompt, text, f"{candidate.source}:model"))
    return answered


def choose_held_out(
    data: str | Path | None, model: torch.nn.Module, tok: Any, *, after: int, items: int, path: str | Path,
    scan: int = 400, batch_size: int = 128, data_format: str | None = None, exclude: Collection[str] = (),
) -> HeldOutSet:
    """The held-out set of a run on ``data`` whose edits end at record ``after``, chosen once and kept at ``path``.

    ``data`` None is the packaged demo set. Candidates come from the ``scan`` records after the edited range. Short answers (question answering) are held
    out when the unedited model answers them; when it answers too few (a small model), its own greedy answers are
    held out instead. Passages (hallucination data) are all kept and read by perplexity. Candidates whose prompt is
    in ``exclude`` (the run's edited prompts) are never held out.
    """
    from lmedit.data import load_requests
    from lmedit.evaluation.evaluator import EvalConfig

    path = Path(path)
    if path.is_file():
        return HeldOutSet.load(path)
    excluded = set(exclude)
    candidates = [c for c in held_out_candidates(load_requests(data, offset=after, limit=scan, format=data_format))
                  if c.prompt not in excluded]
    if not candidates:
        raise LifelongError(f"{data or 'the demo set'} has no records after record {after} that the run does not edit, "
                            "to hold out; lower --limit or --offset, or draw the probes from another file "
                            "(--retention-data)")
    evaluator = Evaluator(tok, EvalConfig(mode="teacher", batch_size=batch_size))
    require_correct = _short_answers(candidates)
    held_out = select_held_out(model, evaluator, candidates, items, require_correct=require_correct)
    if require_correct and len(held_out) < items:
        LOG.info("too few held-out questions answered correctly (%d); holding out the model's own answers", len(held_out))
        held_out = _held_out_own_answers(model, tok, evaluator, candidates, items, batch_size)
    held_out.save(path)
    return held_out


def _held_out_own_answers(model: torch.nn.Module, tok: Any, evaluator: Evaluator, candidates: Sequence[HeldOutProbe],
                          items: int, batch_size: int) -> HeldOutSet:
    """Held-out probes answered by the model itself, generated block by block until enough survive the
    re-tokenisation check (teacher-forced accuracy 1 on ``prompt + " " + answer``)."""
    block = 2 * items
    probes: list[HeldOutProbe] = []
    pre: list[ProbeOutcome] = []
    scanned = 0
    for start in range(0, len(candidates), block):
        answered = own_answers(model, tok, candidates[start : start + block], batch=batch_size)
        found = select_held_out(model, evaluator, answered, items - len(probes))
        probes, pre = probes + found.probes, pre + found.pre
        scanned = start + min(block, len(candidates) - start)
        if len(probes) >= items:
            break
    return HeldOutSet(probes, pre, require_correct=True, scanned=scanned, answers="model")


def _short_answers(candidates: Sequence[HeldOutProbe]) -> bool:
    """Question-answer data (short answers) is held out by correctness; passages (hallucination data) by perplexity."""
    lengths = sorted(len(c.answer.split()) for c in candidates)
    return lengths[len(lengths) // 2] <= 8


def _teacher_evaluator(evaluator: Evaluator) -> Evaluator:
    """The run's evaluator settings (batching, packing) with teacher forcing: retention curves are teacher-forced."""
    return Evaluator(evaluator.tok, dataclasses.replace(evaluator.config, mode="teacher"))


def _refs(probes: Sequence[HeldOutProbe]) -> list[ProbeRef]:
    # held-out prompts are never wrapped in a chat template, like locality prompts
    return [ProbeRef(i, "locality", p.source, p.prompt, p.answer) for i, p in enumerate(probes)]


# --------------------------------------------------------------------------- scoring one checkpoint


def retention_row(
    model: torch.nn.Module,
    evaluator: Evaluator,
    edited: Sequence[EditRequest],
    held_out: HeldOutSet | None,
) -> dict[str, Any]:
    """ERR over ``edited`` and TRR over ``held_out`` on the model as it is now (one batched pass)."""
    teacher = _teacher_evaluator(evaluator)
    stripped = [EditRequest(r.prompt, r.target_new, case_id=r.case_id) for r in edited]
    edit_refs = teacher.probes(stripped)  # the rewrite prompt of each edit, wrapped as the run wraps it
    held_refs = _refs(held_out.probes) if held_out else []
    outcomes = teacher.run_probes(model, edit_refs + held_refs)
    edit_outcomes, held_outcomes = outcomes[: len(edit_refs)], outcomes[len(edit_refs) :]
    row: dict[str, Any] = {"n_edits_scored": len(edit_refs)}
    if edit_outcomes:
        row["edit_retention"] = _mean(o.teacher_accuracy for o in edit_outcomes)
        row["edit_ppl"] = _mean(_ppl(o.teacher_nll) for o in edit_outcomes)
    if held_out is not None and held_outcomes:
        row.update(held_out_metrics(held_out, held_outcomes))
    return row


def held_out_metrics(held_out: HeldOutSet, outcomes: Sequence[ProbeOutcome]) -> dict[str, Any]:
    """TRR (accuracy of the held-out probes), agreement with the unedited model's tokens, perplexity."""
    return {
        "test_retention": _mean(o.teacher_accuracy for o in outcomes),
        "held_out_agreement": _mean(
            locality_agreement(p.teacher_predicted, o.teacher_predicted) for p, o in zip(held_out.pre, outcomes)
        ),
        "held_out_ppl": _mean(_ppl(o.teacher_nll) for o in outcomes),
        "n_held_out": len(outcomes),
    }


def _ppl(nll: float | None) -> float | None:
    return None if nll is None else math.exp(min(nll, 700.0))


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


# --------------------------------------------------------------------------- the tracker (a runner hook)


@dataclass
class RetentionTracker:
    """``after_step`` hook for :func:`lmedit.runner.run_benchmark`: a retention row every ``every`` edit steps.

    Rows are appended to ``out_dir/retention.jsonl`` as they come; a chunk that is
    run again after an interruption writes its rows again and the newest win.
    """

    model: torch.nn.Module
    evaluator: Evaluator
    requests: Sequence[EditRequest]
    out_dir: Path
    held_out: HeldOutSet | None = None
    every: int = 1
    seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise LifelongError(f"retention is scored every k >= 1 edit steps, got every={self.every}")
        self.out_dir = Path(self.out_dir)

    def due(self, chunk: Chunk, steps_done: int) -> bool:
        return steps_done % self.every == 0 or steps_done == len(chunk.steps)

    def __call__(self, chunk: Chunk, steps_done: int) -> None:
        if not self.due(chunk, steps_done):
            return
        started = time.perf_counter()
        edited = [self.requests[i] for step in chunk.steps[:steps_done] for i in step]
        row = {"chunk": chunk.index, "steps": steps_done, "edits": len(edited),
               **retention_row(self.model, self.evaluator, edited, self.held_out)}
        row["seconds"] = time.perf_counter() - started
        self.seconds += row["seconds"]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        append_lines(self.out_dir / RETENTION_FILE, [json.dumps(row)])  # a half line left by a kill is ended first


def read_retention(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``retention.jsonl``; a torn last line is skipped and the newest row per (chunk, edits) kept."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            LOG.warning("skipping an incomplete line in %s", path)
            continue
        rows[(row["chunk"], row["edits"])] = row
    return [rows[k] for k in sorted(rows)]


def retention_curves(rows: Sequence[dict[str, Any]], held_out: HeldOutSet | None = None) -> dict[str, Any]:
    """Mean over chunks of each metric at each number of edits; edits = 0 is the unedited model's held-out state.

    The points are those the longest chunk recorded. A shorter last chunk (37 edits after chunks of 1,000) also
    records where it ends, off that cadence; alone at t = 37 it would read as the long chunks' state there.
    """
    longest = max(rows, key=lambda row: row["edits"], default=None)
    grid = {row["edits"] for row in rows if longest is not None and row["chunk"] == longest["chunk"]}
    by_edits: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["edits"] in grid:
            by_edits[row["edits"]].append(row)
    points = sorted(by_edits)
    curves: dict[str, Any] = {"edits": points, "chunks": [len(by_edits[t]) for t in points]}
    for metric in CURVE_METRICS:
        curves[metric] = [_mean(r.get(metric) for r in by_edits[t]) for t in points]
    if held_out is not None and len(held_out):
        start = held_out_metrics(held_out, held_out.pre)
        curves["edits"] = [0] + curves["edits"]
        curves["chunks"] = [0] + curves["chunks"]
        for metric in CURVE_METRICS:
            curves[metric] = [start.get(metric)] + curves[metric]
    return curves


def write_curves(
    out_dir: str | Path, held_out: HeldOutSet | None = None, *, title: str = "", meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``lifelong.json`` (curves, rows, held-out description) and ``lifelong.png`` into the run folder."""
    out = Path(out_dir)
    rows = read_retention(out / RETENTION_FILE)
    curves = retention_curves(rows, held_out)
    payload = {
        "title": title,
        "curves": curves,
        "rows": rows,
        "held_out": None if held_out is None else {
            "n": len(held_out), "scanned": held_out.scanned, "require_correct": held_out.require_correct,
            "answers": held_out.answers,
            "sources": dict(sorted(_count(p.source for p in held_out.probes).items())),
        },
        "scoring": "teacher forcing",
        **(meta or {}),
    }
    (out / CURVES_JSON).write_text(json.dumps(payload, indent=2))
    if rows:
        from lmedit.reports.plots import plot_curves  # all figures are drawn in one place

        plot_curves(curves, CURVE_METRICS, out / CURVES_PNG, title)
    return payload


def _count(items: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item] += 1
    return counts
