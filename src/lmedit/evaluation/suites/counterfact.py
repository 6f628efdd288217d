"""CounterFact scores as the ROME paper defines them (Meng et al., 2022, §3 and Appendix).

For a target string ``o`` and a prompt ``p``, ROME's
``compute_rewrite_quality_counterfact`` scores the whole multi-token target
by its mean negative log-likelihood per token, ``NLL(o | p)``; we write
``P(o | p) = exp(−NLL)`` (the geometric-mean token probability). With
``o*`` the new and ``oᶜ`` the true object:

* **efficacy** ``cf_efficacy`` (ES): ``1[P(o* | p) > P(oᶜ | p)]`` on the rewrite
  prompt, and its magnitude ``cf_efficacy_magnitude`` (EM): ``P(o*) − P(oᶜ)``;
* **paraphrase** ``cf_paraphrase`` (PS) and ``cf_paraphrase_magnitude`` (PM):
  the same, averaged over the paraphrase prompts;
* **neighborhood** ``cf_neighborhood`` (NS) and ``cf_neighborhood_magnitude``
  (NM): ``1[P(oᶜ) > P(o*)]`` and ``P(oᶜ) − P(o*)`` on prompts about other
  subjects that share the true object;
* **generation entropy** ``cf_generation_entropy`` (GE): the weighted
  n-gram entropy (:mod:`lmedit.evaluation.suites.fluency`) of greedy
  continuations of the record's ``generation_prompts``.

The paper's score S is the harmonic mean of ES, PS and NS over the run
(``lmedit report --layout counterfact``). Reference-score consistency
(tf-idf against Wikipedia snippets) is not computed: the snippets are not
available here. Comparisons are strict, as in ROME's ``summarize.py``.
Token spans follow the core evaluator (answer tokens of
``prompt + " " + target`` after ``len(tok(prompt))``), which equals ROME's
separate tokenisation of ``" " + target`` for GPT-2 and Llama tokenizers
up to merges across the boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.evaluation.scoring import score_teacher_forced
from lmedit.evaluation.suites.base import (
    MetricSuite,
    SuiteCapture,
    SuiteContext,
    SuiteError,
    SuiteOptions,
    check_same_requests,
    request_key,
    require_unrouted,
)
from lmedit.evaluation.suites.fluency import generate_texts, mean_ngram_entropy
from lmedit.requests import EditRequest

EXTRA_KEY = "counterfact"
GROUPS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class CounterFactOptions(SuiteOptions):
    generation: bool = True
    max_new_tokens: int = 100
    batch_size: int = 32
    stop_at_eos: bool = False


@dataclass(frozen=True)
class CounterFactProbes:
    """The prompts of one CounterFact record, and its two objects."""

    target_new: str
    target_true: str
    rewrite: tuple[str, ...]
    paraphrase: tuple[str, ...]
    neighborhood: tuple[str, ...]
    generation: tuple[str, ...]


def counterfact_probes(request: EditRequest) -> CounterFactProbes:
    """From ``extra["counterfact"]`` (ROME-format loader) or, failing that, the request's own fields."""
    data = request.extra.get(EXTRA_KEY) or {}
    target_true = data.get("target_true", request.ground_truth)
    if not target_true:
        raise SuiteError(
            f"request {request.case_id}: the counterfact suite needs the true object (ground_truth, "
            "or extra['counterfact']['target_true']); load CounterFact with --format counterfact-rome"
        )
    neighborhood = data.get("neighborhood_prompts")
    if neighborhood is None:
        neighborhood = [p.prompt for p in request.locality.get("neighborhood", ())]
    return CounterFactProbes(
        target_new=request.target_new,
        target_true=target_true,
        rewrite=(request.prompt,),
        paraphrase=tuple(data.get("paraphrase_prompts", request.rephrase)),
        neighborhood=tuple(neighborhood),
        generation=tuple(data.get("generation_prompts", ())),
    )


def probability_scores(nll_new: Sequence[float], nll_true: Sequence[float], *, true_should_win: bool) -> tuple[float, float]:
    """ROME's success rate and magnitude over prompts, from mean per-token NLLs of both objects."""
    if not nll_new:
        raise ValueError("no prompts to score")
    if true_should_win:
        success = [t < n for n, t in zip(nll_new, nll_true)]
        magnitude = [math.exp(-t) - math.exp(-n) for n, t in zip(nll_new, nll_true)]
    else:
        success = [n < t for n, t in zip(nll_new, nll_true)]
        magnitude = [math.exp(-n) - math.exp(-t) for n, t in zip(nll_new, nll_true)]
    return sum(success) / len(success), sum(magnitude) / len(magnitude)


class CounterFactSuite(MetricSuite):
    """``counterfact``: ROME's efficacy, paraphrase and neighborhood scores and generation entropy."""

    name = "counterfact"
    options_type = CounterFactOptions
    summary = "ROME's CounterFact ES/PS/NS (+ magnitudes) on whole-target probabilities, and GE"

    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        for request in requests:
            counterfact_probes(request)

    def settings(self, tok: Any | None = None) -> dict[str, Any]:
        return {**super().settings(tok), "probability": "exp(-mean NLL per target token)",
                "generation_decoding": "greedy", "reference_score": "not computed"}

    def _measure(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], context: SuiteContext) -> list[dict[str, float]]:
        require_unrouted(model, self.name)
        probes = [counterfact_probes(r) for r in requests]
        pairs: list[tuple[str, str]] = []
        where: list[tuple[int, str]] = []
        for r, pr in enumerate(probes):
            for group in GROUPS:
                for prompt in getattr(pr, group):
                    # neighborhood prompts are probes of the model as it is used (never chat-wrapped), as locality
                    text = prompt if group == "neighborhood" else context.edit_prompt(prompt)
                    pairs.extend([(text, pr.target_new), (text, pr.target_true)])
                    where.append((r, group))
        was_training = model.training
        model.eval()
        try:
            scores = score_teacher_forced(model, tok, pairs, batch_size=context.batch_size,
                                          max_batch_tokens=context.max_batch_tokens, packing=context.packing)
            rows = self._probability_rows(len(requests), where, scores)
            if self.options.generation:
                self._add_generation(model, tok, probes, rows, context)
        finally:
            model.train(was_training)
        return rows

    @staticmethod
    def _probability_rows(n: int, where: list[tuple[int, str]], scores: list[Any]) -> list[dict[str, float]]:
        nll: list[dict[str, tuple[list[float], list[float]]]] = [{g: ([], []) for g in GROUPS} for _ in range(n)]
        for k, (r, group) in enumerate(where):
            nll[r][group][0].append(scores[2 * k].mean_nll)
            nll[r][group][1].append(scores[2 * k + 1].mean_nll)
        names = {"rewrite": "cf_efficacy", "paraphrase": "cf_paraphrase", "neighborhood": "cf_neighborhood"}
        rows = []
        for per_group in nll:
            row: dict[str, float] = {}
            for group, (new, true) in per_group.items():
                if new:
                    success, magnitude = probability_scores(new, true, true_should_win=group == "neighborhood")
                    row[names[group]] = success
                    row[f"{names[group]}_magnitude"] = magnitude
            rows.append(row)
        return rows

    def _add_generation(self, model: torch.nn.Module, tok: Any, probes: list[CounterFactProbes],
                        rows: list[dict[str, float]], context: SuiteContext) -> None:
        prompts = [[context.edit_prompt(p) for p in pr.generation] for pr in probes]
        flat = [p for group in prompts for p in group]
        if not flat:
            return
        generations = generate_texts(model, tok, flat, self.options.max_new_tokens, self.options.batch_size,
                                     self.options.stop_at_eos, share_prefix=context.packing)
        start = 0
        for row, group in zip(rows, prompts):
            if group:
                row["cf_generation_entropy"] = mean_ngram_entropy([g.text for g in generations[start : start + len(group)]])
            start += len(group)

    def capture(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], context: SuiteContext) -> SuiteCapture:
        self.check_requests(requests)
        metrics = self._measure(model, tok, requests, context)
        return SuiteCapture(self.name, metrics, [None] * len(requests), [request_key(r) for r in requests])

    def score(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], pre: SuiteCapture,
              context: SuiteContext) -> list[dict[str, float]]:
        check_same_requests(self.name, pre, requests)
        return self._measure(model, tok, requests, context)
