"""``qa``: generation-based scores as real use sees them (the WILD protocol of "The Mirage of Model Editing", 2025).

Teacher-forced accuracy feeds the model the answer's tokens, and so its
length: on the embedded model WISE scores 0.81 that way and 0.46 when it
must produce the answer itself. This suite asks each probe question the way
a user would and scores what comes back:

* the question is wrapped in a QA context (``context=``):

  - ``chat``: the tokenizer's chat template with the system message "You are
    a helpful, respectful and honest assistant." and the user message
    "Please answer the question:\\n\\nQ: {question}\\nA:" (EasyEdit's WILD
    ``chat_temp``);
  - ``qa_inst``: the same instruction as plain text (WILD's ``qa_inst``);
  - ``question``: the question alone (WILD's default, ``question-only``);
  - ``auto`` (default): ``chat`` when the tokenizer has a chat template,
    else ``qa_inst``;

* the model decodes greedily until its end-of-sequence token, a stop
  string (WILD's ``.`` and newline) or ``max_new_tokens`` (WILD's 50);
  the answer is the decoded text before the first stop string, stripped;
* ``*_qa_em``: exact match after SQuAD normalisation (lower case, no
  punctuation, no articles, single spaces), WILD's ``exact_match``;
  ``*_qa_f1``: SQuAD's token F1; ``*_qa_contains``: the normalised answer
  occurs, as whole words, in the normalised prediction (a chat model tends
  to answer in a sentence, which exact match counts as wrong). All three
  take the best over the answer and its aliases
  (:attr:`lmedit.requests.Probe.aliases`);
* locality compares the post-edit answer with the model's own pre-edit
  answer to the same question (``locality_qa_em``, ``locality_qa_f1``),
  as WILD compares the generated tokens before and after the edit.

WILD's preferred judge is GPT-4o-mini, which needs the network; exact match
is its offline metric and the one used here. Cutting at the first "." also
cuts answers such as "St. Louis": that is WILD's rule and is kept, so
the numbers stay comparable.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from lmedit.evaluation.suites.base import (
    MetricSuite,
    SuiteCapture,
    SuiteContext,
    SuiteError,
    SuiteOptions,
    check_same_requests,
    request_key,
)
from lmedit.requests import EditRequest

CONTEXTS = ("auto", "chat", "qa_inst", "question")
SYSTEM_MESSAGE = "You are a helpful, respectful and honest assistant."
INSTRUCTION = "Please answer the question:\n\nQ: {question}\nA:"
STOP_STRINGS = (".", "\n")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's token F1 against the best-matching answer (two empty answers agree fully)."""
    return max((_f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers), default=0.0)


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when a normalised answer occurs as whole words inside the normalised prediction."""
    predicted = f" {normalize_answer(prediction)} "
    return float(any(f" {gold} " in predicted for gold in map(normalize_answer, answers) if gold))


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """The text before the first stop string, stripped."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end].strip()


@dataclass(frozen=True)
class QAOptions(SuiteOptions):
    context: str = "auto"
    max_new_tokens: int = 50
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise SuiteError(f"qa: context={self.context!r} is not one of {', '.join(CONTEXTS)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise SuiteError("qa: max_new_tokens and batch_size must be at least 1")


@dataclass(frozen=True)
class QAProbe:
    """One question of one request, with the answers that count as right."""

    request: int
    kind: str  # rewrite, rephrase, portability, locality
    group: str
    question: str
    answers: tuple[str, ...]


def qa_probes(requests: Sequence[EditRequest]) -> list[QAProbe]:
    """Every question the suite asks, in request order (the evaluator's probes, with aliases)."""
    probes = []
    for i, r in enumerate(requests):
        probes.append(QAProbe(i, "rewrite", "", r.prompt, (r.target_new,)))
        probes.extend(QAProbe(i, "rephrase", "", text, (r.target_new,)) for text in r.rephrase)
        for kind, groups in (("portability", r.portability), ("locality", r.locality)):
            for name, group in groups.items():
                probes.extend(QAProbe(i, kind, name, p.prompt, p.answers) for p in group)
    return probes


class QASuite(MetricSuite):
    """``qa``: free generation in a QA context, scored by exact match and token F1 (WILD)."""

    name = "qa"
    options_type = QAOptions
    summary = "free greedy generation in a QA context until a stop string, exact match / token F1 (WILD)"

    def context_kind(self, tok: Any) -> str:
        if self.options.context != "auto":
            return self.options.context
        return "chat" if getattr(tok, "chat_template", None) else "qa_inst"

    def wrap(self, tok: Any, question: str) -> str:
        """The text the model is given for ``question``."""
        kind = self.context_kind(tok)
        if kind == "question":
            return question
        instruction = INSTRUCTION.format(question=question)
        if kind == "qa_inst":
            return instruction
        if not getattr(tok, "chat_template", None):
            raise SuiteError("qa: context=chat needs a tokenizer with a chat template; use context=qa_inst")
        messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": instruction}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def settings(self, tok: Any | None = None) -> dict[str, Any]:
        resolved = self.context_kind(tok) if tok is not None else self.options.context
        return {**super().settings(tok), "resolved_context": resolved, "decoding": "greedy",
                "stop_strings": list(STOP_STRINGS) + ["end-of-sequence token"], "normalisation": "SQuAD",
                "locality_reference": "the model's own pre-edit answer"}

    def answers(self, model: torch.nn.Module, tok: Any, probes: Sequence[QAProbe], context: SuiteContext) -> list[str]:
        """The model's answer to each probe: routed when the model carries a router (IKE, SERAC)."""
        from lmedit.routing import generate_routed

        def stopped(tokens: Sequence[int]) -> bool:
            return any(s in tok.decode(tokens, skip_special_tokens=True) for s in STOP_STRINGS)

        prompts = [self.wrap(tok, p.question) for p in probes]
        was_training = model.training
        model.eval()
        try:
            generated = generate_routed(model, tok, prompts, [self.options.max_new_tokens] * len(prompts),
                                        batch_size=self.options.batch_size, use_cache=context.generation_cache,
                                        stop=stopped, share_prefix=context.packing)
        finally:
            model.train(was_training)
        return [cut_at_stop(tok.decode(tokens, skip_special_tokens=True), STOP_STRINGS) for tokens in generated]

    def capture(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], context: SuiteContext) -> SuiteCapture:
        probes = qa_probes(requests)
        answers = self.answers(model, tok, probes, context)
        rows = _aggregate(probes, answers, None, len(requests))
        states: list[list[str]] = [[] for _ in requests]
        for probe, answer in zip(probes, answers):
            states[probe.request].append(answer)
        return SuiteCapture(self.name, rows, states, [request_key(r) for r in requests])

    def score(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], pre: SuiteCapture,
              context: SuiteContext) -> list[dict[str, float]]:
        check_same_requests(self.name, pre, requests)
        probes = qa_probes(requests)
        pre_answers = [answer for state in pre.states for answer in state]
        if len(pre_answers) != len(probes):
            raise SuiteError("the qa pre-edit capture was made for other probes; capture them again")
        return _aggregate(probes, self.answers(model, tok, probes, context), pre_answers, len(requests))


def _aggregate(probes: Sequence[QAProbe], answers: Sequence[str], pre_answers: Sequence[str] | None,
               n_requests: int) -> list[dict[str, float]]:
    """Per request, grouped as the core metrics are (:func:`lmedit.evaluation.evaluator.collapse_groups`)."""
    from lmedit.evaluation.evaluator import collapse_groups

    def values() -> Iterator[tuple[int, str, str, float]]:
        for i, (probe, answer) in enumerate(zip(probes, answers)):
            if probe.kind == "locality" and pre_answers is None:
                continue  # locality needs a post-edit answer to compare with
            reference = (pre_answers[i],) if probe.kind == "locality" else probe.answers  # type: ignore[index]
            for name, score in (("em", exact_match), ("f1", token_f1), ("contains", contains_answer)):
                yield probe.request, f"{probe.kind}_qa_{name}", probe.group, score(answer, reference)

    return collapse_groups(values(), n_requests)
