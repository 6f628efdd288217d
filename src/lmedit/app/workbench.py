"""What ``lmedit app`` does, without the web page: edit stacks, comparisons, tracing.

Kept apart from the Gradio page (:mod:`lmedit.app.ui`) so that every action
the page offers is a plain function with plain results, tested without a
browser. The page only turns these results into widgets.

Concurrency model: **one model state per browser session, and a queue.** The
app loads the model once (the *base*, never left edited) and gives each session
its own copy on first use, up to ``max_sessions`` copies; a session that finds
every slot taken gets an error naming the setting, never a wait. Work on one
session's copy is serialised by that session's lock, so two tabs never share or
corrupt a model; work on the base (comparisons) holds the base lock and restores
every edit it makes, bit for bit, before releasing it. Edits themselves run one
at a time (the page's queue, and a lock here), seeded: torch's random generator
is global, and an edit replayed or repeated must give the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lmedit.app import AppError
from lmedit.handles import EditHandle
from lmedit.requests import EditRequest

LOG = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
"""``progress(fraction, what)``: the page's progress bar (a no-op outside the page)."""

SCORE_KEYS = ("rewrite_acc", "rephrase_acc", "locality", "portability")
DEFAULT_PRESET = "(model's preset)"


def _silent(fraction: float, what: str) -> None:
    return None


def lines(text: str | None) -> list[str]:
    """Non-empty lines of a text box (paraphrases, unrelated prompts), stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def build_request(prompt: str, target: str, subject: str | None = None, rephrase: str | None = None,
                  unrelated: str | None = None) -> EditRequest:
    """The request the page's form describes; unrelated prompts get their answers later (the model's own)."""
    if not (prompt or "").strip():
        raise AppError("type the prompt to edit, e.g. 'The Eiffel Tower is located in the city of'")
    if not (target or "").strip():
        raise AppError("type the new answer (the target), e.g. 'Rome'")
    subject = (subject or "").strip() or None
    if subject is not None and subject not in prompt:
        raise AppError(f"the subject {subject!r} does not occur in the prompt; copy it from the prompt exactly")
    locality = {"neighborhood": [(p, "?") for p in lines(unrelated)]} if lines(unrelated) else {}
    return EditRequest(prompt.strip(), target.strip(), subject=subject, rephrase=tuple(lines(rephrase)), locality=locality)


def shown_probes(prompt: str | None, paraphrases: Sequence[str], unrelated: Sequence[str]) -> list[tuple[str, str]]:
    """(kind, prompt) of every prompt whose greedy answer the page shows, in the page's order."""
    shown = [("prompt", prompt)] if prompt else []
    return shown + [("paraphrase", p) for p in paraphrases] + [("unrelated", p) for p in unrelated]


def probes_of(request: EditRequest) -> list[tuple[str, str]]:
    """The shown probes of a request: its prompt, paraphrases and unrelated prompts."""
    return shown_probes(request.prompt, request.rephrase,
                        [probe.prompt for probe in request.locality.get("neighborhood", ())])


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tok: Any, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """What the (possibly routed) model really answers, greedily, as `lmedit edit` shows it."""
    from lmedit.routing import generate_routed

    if not prompts:
        return []
    tokens = generate_routed(model, tok, list(prompts), [max_new_tokens] * len(prompts))
    return [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]


def with_own_locality_answers(request: EditRequest, answers: Sequence[str]) -> EditRequest:
    """The request with each unrelated prompt's answer set to the model's own greedy answer (what must not move)."""
    probes = request.locality.get("neighborhood", ())
    if not probes:
        return request
    own = answers[len(answers) - len(probes):]
    return dataclasses.replace(request, locality={"neighborhood": [(p.prompt, a or "?") for p, a in zip(probes, own)]})


def preset_for(method: str, preset: str | None, model_name: str) -> str | None:
    """The preset to load: the one asked for, else the method's preset for this model when it has one."""
    from lmedit.registry import get_method, list_presets

    if preset and preset != DEFAULT_PRESET:
        if preset not in list_presets(get_method(method).name):
            raise AppError(f"{method} has no preset {preset!r}; choose one of {list_presets(get_method(method).name)}")
        return preset
    return model_name if model_name in list_presets(get_method(method).name) else None


def make_editor(model: torch.nn.Module, tok: Any, method: str, preset: str | None, model_name: str,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """An Editor for ``method``; ``overrides[method]`` (hyperparameter values) is laid over its preset."""
    from lmedit.editor import Editor
    from lmedit.registry import get_method

    name = get_method(method).name
    return Editor(model, tok, name, preset=preset_for(name, preset, model_name), model_name=model_name,
                  overrides=dict((overrides or {}).get(name, {})))


EDIT_SEED = 0
_RNG_LOCK = threading.Lock()  # torch's generator is global: edits from two threads must not interleave draws


def seeded_apply(editor: Any, request: EditRequest, seed: int = EDIT_SEED) -> EditHandle:
    """Apply with the random generators seeded (and put back after), so the same edit on the same model state
    gives the same weights: a replayed stack, or a comparison run twice, reproduces itself."""
    with _RNG_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        return editor.apply(request)


def _scores(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in SCORE_KEYS if k in metrics}


@dataclass
class AppliedEdit:
    """One edit on a session's stack."""

    number: int
    method: str
    preset: str | None
    handle: EditHandle
    seconds: float
    request: EditRequest | None = None
    loaded_from: Path | None = None

    def describe(self) -> str:
        if self.request is None:
            return f"loaded from {self.loaded_from.name if self.loaded_from else '?'}"
        return f"{self.request.prompt} → {self.request.target_new}"


@dataclass
class EditOutcome:
    """What the page shows after an edit: greedy answers before/after, probe scores before/after, seconds."""

    entry: AppliedEdit
    probes: list[tuple[str, str]]
    before: list[str]
    after: list[str]
    pre: dict[str, float]
    post: dict[str, float]


class EditStack:
    """The edits applied to one model, newest last; any one can be undone."""

    def __init__(self, model: torch.nn.Module, tok: Any, model_name: str,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.model = model
        self.tok = tok
        self.model_name = model_name
        self.overrides = dict(overrides or {})
        self.entries: list[AppliedEdit] = []
        self._numbers = 0

    def _next_number(self) -> int:
        self._numbers += 1
        return self._numbers

    def edit(self, method: str, preset: str | None, request: EditRequest, *, max_new_tokens: int = 8,
             progress: Progress = _silent) -> EditOutcome:
        """Apply one edit on top of the stack and measure it against the model just before it."""
        from lmedit.forward.tokens import check_fits_context

        editor = make_editor(self.model, self.tok, method, preset, self.model_name, self.overrides)
        editor.method.check_requests([request])
        check_fits_context(self.model, self.tok, [request])
        probes = probes_of(request)
        progress(0.1, "answers before the edit")
        before = greedy_answers(self.model, self.tok, [p for _, p in probes], max_new_tokens)
        request = with_own_locality_answers(request, before)
        pre = editor.capture([request])
        progress(0.3, f"editing with {editor.method.name}")
        start = time.perf_counter()
        handle = seeded_apply(editor, request)
        seconds = time.perf_counter() - start
        entry = AppliedEdit(self._next_number(), editor.method.name, editor.preset, handle, seconds, request=request)
        self.entries.append(entry)
        progress(0.8, "answers after the edit")
        after = greedy_answers(self.model, self.tok, [p for _, p in probes], max_new_tokens)
        post = editor.evaluate([request], pre)[0]
        return EditOutcome(entry, probes, before, after, _scores(pre.metrics[0]), _scores(post))

    def undo(self) -> AppliedEdit:
        """Restore the newest edit exactly."""
        if not self.entries:
            raise AppError("there is no edit to undo")
        entry = self.entries.pop()
        entry.handle.restore()
        return entry

    def remove(self, number: int, *, progress: Progress = _silent) -> AppliedEdit:
        """Take out edit ``number`` wherever it sits in the stack.

        The edits above it are restored (newest first), then it, and then the
        ones above it are applied again in their order: made-here edits are
        recomputed on the model without the removed one, loaded edits are loaded
        again as saved. For edits that do not interact (GRACE or WISE memories,
        adapters on other layers) that equals dropping it alone; for weight
        edits it gives what editing without it would have given.
        """
        position = next((i for i, e in enumerate(self.entries) if e.number == number), None)
        if position is None:
            raise AppError(f"there is no edit #{number} on the stack (edits: {[e.number for e in self.entries] or 'none'})")
        above = self.entries[position + 1:]
        for entry in reversed(self.entries[position:]):
            entry.handle.restore()
        removed = self.entries[position]
        del self.entries[position:]
        for i, entry in enumerate(above):
            progress((i + 1) / (len(above) + 1), f"re-applying edit #{entry.number}")
            self.entries.append(self._reapply(entry))
        return removed

    def _reapply(self, entry: AppliedEdit) -> AppliedEdit:
        from lmedit.registry import load_edit

        start = time.perf_counter()
        if entry.request is None:
            handle = load_edit(self.model, entry.loaded_from)
        else:
            editor = make_editor(self.model, self.tok, entry.method, entry.preset, self.model_name, self.overrides)
            handle = seeded_apply(editor, entry.request)
        return dataclasses.replace(entry, handle=handle, seconds=time.perf_counter() - start)

    def save(self, number: int, folder: Path) -> Path:
        """Write edit ``number`` with its method's saver (safetensors + JSON), for :meth:`load`."""
        entry = next((e for e in self.entries if e.number == number), None)
        if entry is None:
            raise AppError(f"there is no edit #{number} on the stack to save")
        try:
            return entry.handle.save(folder)
        except NotImplementedError as exc:
            raise AppError(str(exc)) from None

    def load(self, folder: Path) -> AppliedEdit:
        """Re-apply a saved edit on top of the stack (checked as untrusted input; nothing is unpickled)."""
        from lmedit.registry import load_edit

        start = time.perf_counter()
        handle = load_edit(self.model, folder)
        entry = AppliedEdit(self._next_number(), handle.method, None, handle, time.perf_counter() - start,
                            loaded_from=folder)
        self.entries.append(entry)
        return entry

    def restore_all(self) -> None:
        while self.entries:
            self.undo()

    def rows(self) -> list[list[Any]]:
        """The stack as table rows: #, method, preset, edit, seconds."""
        return [[e.number, e.method, e.preset or "defaults", e.describe(), round(e.seconds, 2)] for e in self.entries]


@dataclass
class Session:
    """One browser session's model copy, its stack and its lock."""

    stack: EditStack
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class CompareRow:
    method: str
    answers: list[str]
    scores: dict[str, float]
    seconds: float | None
    error: str = ""


class Workbench:
    """The app's model, its sessions, and the actions of the Edit, Compare and Trace tabs."""

    def __init__(self, model: torch.nn.Module, tok: Any, model_name: str, *, max_sessions: int = 2,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """``overrides``: hyperparameter values per method name, laid over every preset (tests use tiny settings)."""
        if max_sessions < 1:
            raise AppError("max_sessions must be at least 1")
        self.base = model
        self.tok = tok
        self.model_name = model_name
        self.max_sessions = max_sessions
        self.overrides = dict(overrides or {})
        self.base_lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._sessions_lock = threading.Lock()

    # ------------------------------------------------------------------ sessions

    def session(self, session_id: str) -> Session:
        """This session's model copy, made on first use."""
        with self._sessions_lock:
            found = self._sessions.get(session_id)
            if found is not None:
                found.last_used = time.monotonic()
                return found
            if len(self._sessions) >= self.max_sessions:
                raise AppError(f"all {self.max_sessions} model copies are in use by other browser tabs; close one, or "
                               "start the app with a larger --sessions")
            with self.base_lock:  # never copy the base while a comparison has it edited
                model = copy.deepcopy(self.base)
            created = Session(EditStack(model, self.tok, self.model_name, self.overrides))
            self._sessions[session_id] = created
            return created

    def release(self, session_id: str) -> None:
        """Drop a closed session's model copy."""
        with self._sessions_lock:
            self._sessions.pop(session_id, None)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------------ compare

    def compare(self, methods: Sequence[str], request: EditRequest, *, max_new_tokens: int = 8,
                progress: Progress = _silent) -> tuple[list[tuple[str, str]], list[str], list[CompareRow]]:
        """The same edit with each method, each from the unedited model (the base, restored after each).

        Returns the probes, the unedited answers and one row per method; a method
        that cannot make this edit gets its error in its row instead of stopping the others.
        """
        if not methods:
            raise AppError("choose at least one method to compare")
        probes = probes_of(request)
        rows: list[CompareRow] = []
        with self.base_lock:
            before = greedy_answers(self.base, self.tok, [p for _, p in probes], max_new_tokens)
            request = with_own_locality_answers(request, before)
            for i, method in enumerate(methods):
                progress(i / len(methods), f"{method}: editing")
                rows.append(self._compare_one(method, request, probes, max_new_tokens))
        return probes, before, rows

    def _compare_one(self, method: str, request: EditRequest, probes: Sequence[tuple[str, str]],
                     max_new_tokens: int) -> CompareRow:
        handle = None
        try:
            editor = make_editor(self.base, self.tok, method, None, self.model_name, self.overrides)
            editor.method.check_requests([request])
            pre = editor.capture([request])
            start = time.perf_counter()
            handle = seeded_apply(editor, request)
            seconds = time.perf_counter() - start
            answers = greedy_answers(self.base, self.tok, [p for _, p in probes], max_new_tokens)
            return CompareRow(method, answers, _scores(editor.evaluate([request], pre)[0]), seconds)
        except (ValueError, RuntimeError, OSError, NotImplementedError) as exc:
            return CompareRow(method, [], {}, None, error=str(exc).splitlines()[0])
        finally:
            if handle is not None:
                handle.restore()

    # ------------------------------------------------------------------ trace

    def trace(self, session_id: str, prompt: str, subject: str, *, kind: str = "mlp", samples: int = 5,
              progress: Progress = _silent) -> tuple[Any, dict[str, Any]]:
        """Causal trace of one fact on this session's model (with its edits): the trace and a summary.

        Noise is ROME's: 3 x the std of the subject's token embeddings (of the
        whole prompt's when the subject is one token, too few to measure). The
        suggested layer is the one whose restored ``kind`` output at the last
        subject token raises p(answer) most.
        """
        from lmedit.analysis.tracing import count_restorations, trace_fact, Fact

        if not (prompt or "").strip() or not (subject or "").strip():
            raise AppError("type a prompt and the subject inside it")
        if subject.strip() not in prompt:
            raise AppError(f"the subject {subject.strip()!r} does not occur in the prompt; copy it from the prompt exactly")
        found = self.session(session_id)
        with found.lock:
            model = found.stack.model
            total = max(1, count_restorations(self.tok, [Fact(prompt, subject.strip())], _layers(model), [kind]))
            done = [0]

            def advance(n: int) -> None:
                done[0] += n
                progress(min(done[0] / total, 1.0), "restoring states")

            noise = 3.0 * _noise_scale(model, self.tok, prompt, subject.strip())
            trace = trace_fact(model, self.tok, prompt, subject.strip(), noise_std=noise, kinds=(kind,),
                               samples=samples, advance=advance)
            edits = len(found.stack.entries)
        last_subject = trace.subject_range[1] - 1
        effect = trace.indirect_effect(kind)[last_subject]
        layer = int(torch.nan_to_num(effect, nan=float("-inf")).argmax())
        return trace, {"answer": trace.answer.strip(), "p_clean": trace.p_clean, "p_corrupted": trace.p_corrupted,
                       "layer": layer, "effect": float(effect[layer]), "edits": edits, "kind": kind}


def _noise_scale(model: torch.nn.Module, tok: Any, prompt: str, subject: str) -> float:
    from lmedit.analysis.tracing import TracingError, embedding_std

    try:
        return embedding_std(model, tok, [subject])
    except TracingError:
        return embedding_std(model, tok, [prompt])


def _layers(model: torch.nn.Module) -> int:
    from lmedit.spec import ModelSpec

    return ModelSpec.from_model(model).num_layers
