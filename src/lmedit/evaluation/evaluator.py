"""Per-request edit metrics, identical for every method.

Teacher-forced metrics follow EasyEdit's definitions: ``rewrite_acc``,
``rephrase_acc`` and ``portability`` are the fraction of answer tokens whose
argmax equals the answer token on ``prompt + " " + answer``; ``locality`` is
the fraction of answer positions whose argmax is unchanged between the
pre-edit and the post-edit model. Generation metrics (``*_gen_*``) decode
greedily ``len(answer)`` tokens instead; they are kept under their own names
so the two protocols are never mixed in one column.

Pre-edit state is captured by :meth:`Evaluator.capture` before any edit and
passed to :meth:`Evaluator.score`; the evaluator never changes the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch

from lmedit.evaluation.scoring import score_teacher_forced, token_match
from lmedit.forward import ProgressFn, generate_greedy
from lmedit.requests import EditRequest
from lmedit.routing import route_prompts

EvalMode = Literal["teacher", "generate", "both"]
EVAL_MODES: tuple[str, ...] = ("teacher", "generate", "both")


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: scoring mode, batching, and whether edit prompts use the chat template.

    ``batch_size`` caps the sequences per forward pass (and the prompts per
    generation batch); ``max_batch_tokens`` caps the tokens per teacher-forced
    pass; ``packing`` lets several sequences share a row (results equal to
    one-at-a-time scoring up to float rounding).
    """

    mode: EvalMode = "teacher"
    batch_size: int = 128
    use_chat_template: bool = False
    max_batch_tokens: int = 2048
    packing: bool = True
    # greedy generation with the KV cache; False feeds the whole sequence at each step (EasyEdit's
    # vanilla_generation), for methods whose edit reads their whole input on every call (WISE, DEFER)
    generation_cache: bool = True
    # metric suites (lmedit.evaluation.suites), "name" or "name:key=value,..."; see docs/benchmarks.md
    suites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"eval mode {self.mode!r} is not one of {', '.join(EVAL_MODES)}")
        from lmedit.evaluation.suites import build_suites  # suites hook: validate the specs early

        object.__setattr__(self, "suites", tuple(self.suites))
        build_suites(self.suites)
        if self.batch_size < 1:
            raise ValueError("eval batch size must be at least 1")
        if self.max_batch_tokens < 1:
            raise ValueError("eval max_batch_tokens must be at least 1")

    @property
    def teacher(self) -> bool:
        return self.mode in ("teacher", "both")

    @property
    def generate(self) -> bool:
        return self.mode in ("generate", "both")


@dataclass(frozen=True)
class ProbeRef:
    """One probe of one request: which metric it feeds and what to send to the model."""

    request: int
    kind: Literal["rewrite", "rephrase", "portability", "locality"]
    group: str
    prompt: str
    answer: str


@dataclass
class ProbeOutcome:
    """What one probe produced on one model: enough to compute every metric later."""

    teacher_predicted: tuple[int, ...] = ()
    teacher_target: tuple[int, ...] = ()
    teacher_accuracy: float | None = None
    teacher_nll: float | None = None
    generated: tuple[int, ...] = ()
    generate_accuracy: float | None = None


@dataclass
class Snapshot:
    """All probe outcomes of a set of requests on one model state (the pre-edit capture)."""

    probes: list[ProbeRef]
    outcomes: list[ProbeOutcome]
    metrics: list[dict[str, float]] = field(default_factory=list)
    suites: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (suite, its SuiteCapture)

    def subset(self, indices: Sequence[int]) -> "Snapshot":
        """The capture of some requests only, renumbered in the order of ``indices``."""
        position = {request: new for new, request in enumerate(indices)}
        chosen = sorted(
            (i for i, p in enumerate(self.probes) if p.request in position),
            key=lambda i: position[self.probes[i].request],
        )
        probes = [
            ProbeRef(position[p.request], p.kind, p.group, p.prompt, p.answer)
            for p in (self.probes[i] for i in chosen)
        ]
        metrics = [self.metrics[i] for i in indices] if self.metrics else []
        suites = {name: (suite, capture.subset(indices)) for name, (suite, capture) in self.suites.items()}
        return Snapshot(probes, [self.outcomes[i] for i in chosen], metrics, suites)


class Evaluator:
    """Scores requests on a model in padded batches; never mutates the model."""

    def __init__(self, tok: Any, config: EvalConfig | None = None) -> None:
        self.tok = tok
        self.config = config or EvalConfig()

    def probes(self, requests: Sequence[EditRequest]) -> list[ProbeRef]:
        refs: list[ProbeRef] = []
        for i, request in enumerate(requests):
            refs.append(ProbeRef(i, "rewrite", "", self._edit_prompt(request.prompt), request.target_new))
            for text in request.rephrase:
                refs.append(ProbeRef(i, "rephrase", "", self._edit_prompt(text), request.target_new))
            for name, group in request.portability.items():
                for probe in group:
                    refs.append(ProbeRef(i, "portability", name, self._edit_prompt(probe.prompt), probe.answer))
            for name, group in request.locality.items():
                for probe in group:
                    # locality prompts are never wrapped (as in EasyEdit): they probe the model as it is used
                    refs.append(ProbeRef(i, "locality", name, probe.prompt, probe.answer))
        return refs

    def _edit_prompt(self, prompt: str) -> str:
        if not self.config.use_chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def run_probes(
        self, model: torch.nn.Module, probes: Sequence[ProbeRef], progress: ProgressFn | None = None
    ) -> list[ProbeOutcome]:
        """Outcomes of ``probes`` in order; a model with a probe router (IKE, SERAC) is scored on its routes."""
        use_cache = self._generation_cache(model)
        # routing hook (lmedit.routing): one route call, then each route model's probes scored in batches
        groups = route_prompts(model, self.tok, [p.prompt for p in probes])
        if groups is None:
            return self._score_probes(model, probes, progress, use_cache)
        outcomes = [ProbeOutcome() for _ in probes]
        for group in groups:
            routed = [dataclasses.replace(probes[i], prompt=prompt) for i, prompt in zip(group.indices, group.prompts)]
            for index, outcome in zip(group.indices, self._score_probes(group.model, routed, progress, use_cache)):
                outcomes[index] = outcome
        return outcomes

    def _generation_cache(self, model: torch.nn.Module) -> bool:
        """Decode with the key/value cache unless the method forbids it *and* its adapter is in the model.

        WISE, DEFER and MELO read the whole input on every call, so their edited models decode without the cache.
        A model that carries no adapter (the unedited model of a pre-edit capture) decodes the same either way,
        and several times faster with the cache.
        """
        from lmedit.adapters import carries_adapter

        return self.config.generation_cache or not carries_adapter(model)

    def _score_probes(
        self, model: torch.nn.Module, probes: Sequence[ProbeRef], progress: ProgressFn | None = None,
        use_cache: bool = True,
    ) -> list[ProbeOutcome]:
        outcomes = [ProbeOutcome() for _ in probes]
        was_training = model.training
        model.eval()
        try:
            if self.config.teacher:
                scores = score_teacher_forced(
                    model, self.tok, [(p.prompt, p.answer) for p in probes],
                    batch_size=self.config.batch_size, max_batch_tokens=self.config.max_batch_tokens,
                    packing=self.config.packing, progress=progress,
                )
                for outcome, score in zip(outcomes, scores):
                    outcome.teacher_predicted = score.predicted_ids
                    outcome.teacher_target = score.target_ids
                    outcome.teacher_accuracy = score.token_accuracy
                    outcome.teacher_nll = score.mean_nll
            if self.config.generate:
                targets = [self._answer_ids(p) for p in probes]
                generated = generate_greedy(
                    model, self.tok, [p.prompt for p in probes], [len(t) for t in targets],
                    batch_size=self.config.batch_size, progress=progress, use_cache=use_cache,
                    share_prefix=self.config.packing,
                )
                for outcome, gen, target in zip(outcomes, generated, targets):
                    outcome.generated = gen
                    outcome.generate_accuracy = token_match(gen, target)
        finally:
            model.train(was_training)
        return outcomes

    def _answer_ids(self, probe: ProbeRef) -> tuple[int, ...]:
        full = self.tok(f"{probe.prompt} {probe.answer}").input_ids
        return tuple(full[len(self.tok(probe.prompt).input_ids) :])

    def capture(
        self, model: torch.nn.Module, requests: Sequence[EditRequest], progress: ProgressFn | None = None
    ) -> Snapshot:
        """Run every probe on the current (unedited) model; the result is the 'pre' reference."""
        probes = self.probes(requests)
        outcomes = self.run_probes(model, probes, progress)
        snapshot = Snapshot(probes, outcomes)
        snapshot.metrics = aggregate(probes, outcomes, reference=None, n_requests=len(requests))
        # suites hook: each selected (or data-required) suite captures its pre-edit state now
        from lmedit.evaluation.suites import merge_metrics

        for suite in self.active_suites(requests):
            capture = suite.capture(model, self.tok, requests, self._suite_context(model))
            merge_metrics(snapshot.metrics, capture.metrics)
            snapshot.suites[suite.name] = (suite, capture)
        return snapshot

    def score(
        self,
        model: torch.nn.Module,
        requests: Sequence[EditRequest],
        pre: Snapshot,
        progress: ProgressFn | None = None,
    ) -> list[dict[str, float]]:
        """Post-edit metrics of ``requests``; locality is measured against the ``pre`` capture."""
        probes = self.probes(requests)
        if [self._key(p) for p in probes] != [self._key(p) for p in pre.probes]:
            raise ValueError("the pre-edit capture was made for other requests; capture them again")
        outcomes = self.run_probes(model, probes, progress)
        rows = aggregate(probes, outcomes, reference=pre.outcomes, n_requests=len(requests))
        # suites hook: the suites captured with ``pre`` score against it
        from lmedit.evaluation.suites import merge_metrics

        for suite, capture in pre.suites.values():
            merge_metrics(rows, suite.score(model, self.tok, requests, capture, self._suite_context(model)))
        return rows

    def active_suites(self, requests: Sequence[EditRequest]) -> list[Any]:
        """The configured suites plus those the requests' data needs (ConvSent), checked against the requests."""
        from lmedit.evaluation.suites import build_suites, required_specs

        suites = build_suites(required_specs(requests, self.config.suites))
        for suite in suites:
            suite.check_requests(requests)
        return suites

    def suite_settings(self, requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
        """The resolved settings of the suites that will run on ``requests`` (for a run's config)."""
        from lmedit.evaluation.suites import describe

        return describe(self.active_suites(requests), self.tok)

    def _suite_context(self, model: torch.nn.Module) -> Any:
        from lmedit.evaluation.suites import SuiteContext

        return SuiteContext(self.config.batch_size, self.config.max_batch_tokens, self.config.packing, self._edit_prompt,
                            self._generation_cache(model))

    @staticmethod
    def _key(probe: ProbeRef) -> tuple[Any, ...]:
        return (probe.request, probe.kind, probe.group, probe.prompt, probe.answer)


def locality_agreement(pre_tokens: Sequence[int], post_tokens: Sequence[int]) -> float:
    """Fraction of positions where the post-edit token equals the pre-edit token.

    EasyEdit's README example: [29, 234, 334] vs [29, 234, 333] gives 2/3.
    """
    if not pre_tokens:
        raise ValueError("locality needs at least one pre-edit token")
    return token_match(post_tokens, pre_tokens)


def aggregate(
    probes: Sequence[ProbeRef],
    outcomes: Sequence[ProbeOutcome],
    *,
    reference: Sequence[ProbeOutcome] | None,
    n_requests: int,
) -> list[dict[str, float]]:
    """Collapse probe outcomes into one metric dict per request.

    Groups are averaged first, then groups are averaged per request, so a
    group with many probes does not outweigh the others (EasyEdit's summary).
    """
    values = (
        (probe.request, metric, probe.group, value)
        for i, (probe, outcome) in enumerate(zip(probes, outcomes))
        for metric, value in _probe_values(probe, outcome, reference[i] if reference is not None else None)
    )
    return collapse_groups(values, n_requests)


def collapse_groups(values: Iterable[tuple[int, str, str, float]], n_requests: int) -> list[dict[str, float]]:
    """(request, metric, group, value) tuples into one metric dict per request: each group's mean first, then the
    mean over groups, so a group with many probes does not outweigh the others; named groups are also reported
    on their own (``metric/group``)."""
    buckets: list[dict[str, dict[str, list[float]]]] = [defaultdict(lambda: defaultdict(list)) for _ in range(n_requests)]
    for request, metric, group, value in values:
        buckets[request][metric][group].append(value)
    results = []
    for bucket in buckets:
        row: dict[str, float] = {}
        for metric, groups in bucket.items():
            means = {g: sum(v) / len(v) for g, v in groups.items()}
            row[metric] = sum(means.values()) / len(means)
            row.update({f"{metric}/{group}": mean for group, mean in means.items() if group})
        results.append(row)
    return results


def _probe_values(
    probe: ProbeRef, outcome: ProbeOutcome, reference: ProbeOutcome | None
) -> Iterable[tuple[str, float]]:
    kind = probe.kind
    if outcome.teacher_accuracy is not None:
        if kind == "locality":
            yield "locality_acc", outcome.teacher_accuracy
            if reference is not None:
                yield "locality", locality_agreement(reference.teacher_predicted, outcome.teacher_predicted)
        elif kind == "portability":
            yield "portability", outcome.teacher_accuracy
        else:
            yield f"{kind}_acc", outcome.teacher_accuracy
            if kind == "rewrite" and outcome.teacher_nll is not None:
                yield "rewrite_ppl", math.exp(outcome.teacher_nll)
    if outcome.generate_accuracy is not None:
        em = float(outcome.generate_accuracy == 1.0)
        if kind == "locality":
            if reference is not None:
                yield "locality_gen", locality_agreement(reference.generated, outcome.generated)
        elif kind == "portability":
            yield "portability_gen_acc", outcome.generate_accuracy
            yield "portability_gen_em", em
        else:
            yield f"{kind}_gen_acc", outcome.generate_accuracy
            yield f"{kind}_gen_em", em
