"""ConvSent (SERAC's sentiment editing, a KnowEdit subset): edit score and KL locality.

A ConvSent edit asks the model to talk about a topic with one sentiment.
Every request carries, in ``extra["convsent"]`` (written by the ``convsent``
loader), the topic's answers of both sentiments ("inner") and the answers
about another topic ("outer"), each paired with a question about its topic.
Each pair is scored as ``question + " " + SEP + " " + answer``, where SEP
is the tokenizer's end-of-sequence token (EasyEdit hard-codes Llama's
``</s>``); only the answer tokens are read.

* **Edit score** (EasyEdit's ``es``, from SERAC): with ``ℓ(·)`` the mean
  log-probability per answer token over a set of answers,
  ``z_sent = σ(ℓ_post(target) − ℓ_post(other))``,
  ``z_topic = min(1, exp(ℓ_post(target) − ℓ_pre(target)))``,
  ``es = z_sent · z_topic``. Pre-edit, ``es`` is ``σ(ℓ_pre(target) − ℓ_pre(other))``.
* **Locality** ``convsent_kl``: the mean over the outer topic's answer
  tokens of ``KL(p_pre ‖ p_post)`` between the next-token distributions
  (softmax of the logits) that predict each answer token, in nats. Lower
  is better; it is 0 before the edit by definition, so it has no pre value.

The pre-edit quantities come from :meth:`ConvSentSuite.capture`, on the
unedited model. EasyEdit computes them after the edit, from the same
in-place-edited object, which makes its KL exactly 0 and ``z_topic`` 1
for ROME, MEMIT and fine-tuning.

Two more differences from EasyEdit, both corrections: log-probabilities
are read one position earlier (position t−1 predicts token t; EasyEdit
gathers the logits at t for the token at t, a shift missing since SERAC's
sequence-to-sequence original), and padding positions are not averaged in.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from lmedit.evaluation.suites._forward import AnswerPass, HeadSnapshot, answer_passes, kl_divergence
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

LOG = logging.getLogger(__name__)

EXTRA_KEY = "convsent"


@dataclass(frozen=True)
class ConvSentOptions(SuiteOptions):
    separator: str = "eos"  # "eos": the tokenizer's end-of-sequence token; anything else is used literally


@dataclass
class _Sums:
    total: float = 0.0
    count: int = 0

    def add(self, logprobs: torch.Tensor) -> None:
        self.total += float(logprobs.sum())
        self.count += int(logprobs.numel())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


@dataclass
class _PreState:
    """Pre-edit state of one request: inner means, and what rebuilds the outer distributions."""

    target: _Sums
    other: _Sums
    outer_targets: list[tuple[int, ...]]
    outer_hidden: list[torch.Tensor | None] = field(default_factory=list)
    outer_logprobs: list[torch.Tensor | None] = field(default_factory=list)


@dataclass(frozen=True)
class _PairRef:
    request: int
    outer: bool
    slot: int  # index among the request's outer pairs (outer) or its inner pairs (inner)
    is_target: bool = False


def convsent_data(request: EditRequest) -> dict[str, Any]:
    data = request.extra.get(EXTRA_KEY)
    if not isinstance(data, dict):
        raise SuiteError(
            f"request {request.case_id} has no ConvSent data (extra[{EXTRA_KEY!r}]); "
            "load ConvSent files with --format convsent"
        )
    return data


def separator_of(tok: Any, option: str) -> str:
    if option != "eos":
        return option
    if not getattr(tok, "eos_token", None):
        raise SuiteError("convsent: the tokenizer has no end-of-sequence token; pass --suite convsent:separator=TEXT")
    return str(tok.eos_token)


def entailment(pre_target: float, post_target: float, post_other: float) -> tuple[float, float, float]:
    """SERAC/EasyEdit's edit score from mean per-token log-probabilities: (es, z_sent, z_topic)."""
    z_sent = 1.0 / (1.0 + math.exp(-(post_target - post_other)))
    z_topic = min(1.0, math.exp(post_target - pre_target))
    return z_sent * z_topic, z_sent, z_topic


class ConvSentSuite(MetricSuite):
    """``convsent``: edit score (es) and KL locality on the other topic; on automatically for ConvSent data."""

    name = "convsent"
    options_type = ConvSentOptions
    summary = "ConvSent edit score z_sent·z_topic and KL(pre‖post) on another topic's answers"

    @classmethod
    def required_by(cls, request: EditRequest) -> bool:
        return EXTRA_KEY in request.extra

    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        for request in requests:
            data = convsent_data(request)
            inner = data.get("inner") or []
            if not any(t for *_, t in inner) or all(t for *_, t in inner) or not data.get("outer"):
                raise SuiteError(
                    f"request {request.case_id}: ConvSent data needs answers of both sentiments and outer answers"
                )

    def settings(self, tok: Any | None = None) -> dict[str, Any]:
        base = super().settings(tok)
        if tok is not None:
            base["separator_text"] = separator_of(tok, self.options.separator)
        return {**base, "kl": "KL(pre || post), nats, mean over outer answer tokens"}

    # ------------------------------------------------------------------ shared pass over all pairs

    def _pairs(self, requests: Sequence[EditRequest]) -> tuple[list[tuple[str, str]], list[_PairRef]]:
        """Every (question, answer) pair of the requests; the separator is added after routing."""
        pairs: list[tuple[str, str]] = []
        refs: list[_PairRef] = []
        for r, request in enumerate(requests):
            data = convsent_data(request)
            for slot, (question, answer, is_target) in enumerate(data["inner"]):
                pairs.append((question, answer))
                refs.append(_PairRef(r, False, slot, bool(is_target)))
            for slot, (question, answer) in enumerate(data["outer"]):
                pairs.append((question, answer))
                refs.append(_PairRef(r, True, slot))
        return pairs, refs

    def _passes(self, model: torch.nn.Module, tok: Any, pairs: list[tuple[str, str]], context: SuiteContext,
                keep_hidden: bool) -> Iterator[list[AnswerPass]]:
        """Answer passes of ``question SEP answer``, on what the model is really fed: a router (IKE, SERAC) picks
        each question's text and network, as it does for the core metrics; SEP follows the routed question."""
        from lmedit.routing import route_prompts

        sep = separator_of(tok, self.options.separator)
        groups = route_prompts(model, tok, [question for question, _ in pairs])
        routes = ([(model, tuple(range(len(pairs))), tuple(q for q, _ in pairs))] if groups is None
                  else [(g.model, g.indices, g.prompts) for g in groups])
        for network, indices, questions in routes:
            routed = [(f"{question} {sep}", pairs[i][1]) for i, question in zip(indices, questions)]
            for batch in answer_passes(network, tok, routed, batch_size=context.batch_size,
                                       max_batch_tokens=context.max_batch_tokens, packing=context.packing,
                                       keep_hidden=keep_hidden):
                yield [replace(item, index=indices[item.index]) for item in batch]

    # ------------------------------------------------------------------ capture

    @torch.no_grad()
    def capture(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], context: SuiteContext) -> SuiteCapture:
        self.check_requests(requests)
        pairs, refs = self._pairs(requests)
        sizes = [len(convsent_data(r)["outer"]) for r in requests]
        states = [_PreState(_Sums(), _Sums(), [()] * n, [None] * n, [None] * n) for n in sizes]
        head: HeadSnapshot | None = None
        try:
            head = HeadSnapshot(model)
        except ValueError:
            head = None
        verified = head is None
        was_training = model.training
        model.eval()
        try:
            for batch in self._passes(model, tok, pairs, context, keep_hidden=head is not None):
                outer = [item for item in batch if refs[item.index].outer]
                if not verified and outer:
                    # checked once, before any hidden state is kept: does the head copy rebuild the logits?
                    if not all(item.hidden is not None and head.reproduces(item.hidden, item.logits) for item in outer):
                        LOG.warning("convsent: the output layer does not reproduce the model's logits; keeping "
                                    "full pre-edit distributions instead (more memory)")
                        head = None
                    verified = True
                self._record(batch, refs, states, head)
        finally:
            model.train(was_training)
        metrics = []
        for state in states:
            es, z_sent, _ = entailment(state.target.mean, state.target.mean, state.other.mean)
            metrics.append({"convsent_es": es, "convsent_z_sent": z_sent})
        return SuiteCapture(self.name, metrics, states, [request_key(r) for r in requests], shared=head)

    @staticmethod
    def _record(batch, refs: list[_PairRef], states: list[_PreState], head: HeadSnapshot | None) -> None:
        for item in batch:
            ref = refs[item.index]
            state = states[ref.request]
            if ref.outer:
                state.outer_targets[ref.slot] = item.pair.target_ids
                if head is not None:
                    state.outer_hidden[ref.slot] = item.hidden
                else:
                    state.outer_logprobs[ref.slot] = torch.log_softmax(item.logits, dim=-1)
            else:
                (state.target if ref.is_target else state.other).add(item.target_logprobs)

    # ------------------------------------------------------------------ score

    @torch.no_grad()
    def score(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], pre: SuiteCapture,
              context: SuiteContext) -> list[dict[str, float]]:
        check_same_requests(self.name, pre, requests)
        pairs, refs = self._pairs(requests)
        head: HeadSnapshot | None = pre.shared
        target = [_Sums() for _ in requests]
        other = [_Sums() for _ in requests]
        kl_sum = [0.0] * len(requests)
        kl_count = [0] * len(requests)
        was_training = model.training
        model.eval()
        try:
            for batch in self._passes(model, tok, pairs, context, keep_hidden=False):
                for item in batch:
                    ref = refs[item.index]
                    state: _PreState = pre.states[ref.request]
                    if not ref.outer:
                        (target if ref.is_target else other)[ref.request].add(item.target_logprobs)
                        continue
                    if state.outer_targets[ref.slot] != item.pair.target_ids:
                        raise SuiteError("convsent: the outer answers tokenise differently than at capture time")
                    kl = kl_divergence(self._pre_logits(state, ref.slot, head), item.logits)
                    kl_sum[ref.request] += float(kl.sum())
                    kl_count[ref.request] += int(kl.numel())
        finally:
            model.train(was_training)
        rows = []
        for r, state in enumerate(pre.states):
            es, z_sent, z_topic = entailment(state.target.mean, target[r].mean, other[r].mean)
            rows.append({
                "convsent_es": es, "convsent_z_sent": z_sent, "convsent_z_topic": z_topic,
                "convsent_kl": kl_sum[r] / kl_count[r] if kl_count[r] else float("nan"),
            })
        return rows

    @staticmethod
    def _pre_logits(state: _PreState, slot: int, head: HeadSnapshot | None) -> torch.Tensor:
        hidden = state.outer_hidden[slot] if state.outer_hidden else None
        if hidden is not None and head is not None:
            return head.logits(hidden)
        logprobs = state.outer_logprobs[slot]
        if logprobs is None:
            raise SuiteError("convsent: the pre-edit capture holds no distribution for an outer answer")
        return logprobs
