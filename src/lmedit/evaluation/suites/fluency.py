"""Fluency: weighted bigram/trigram entropy of greedy generations (ROME's and EasyEdit's n-gram entropy).

Definition (ROME's ``compute_n_gram_entropy``, used unchanged by EasyEdit
and KnowEdit): split a text into words, count its word n-grams for
n = 2 and 3, take the entropy in bits of each n-gram frequency
distribution, weight them by 2/3 and 4/3 and average the two weighted
values, ``(2/3·H₂ + 4/3·H₃) / 2``. A text with fewer than n words has
no n-grams and contributes 0 for that n, as NumPy's empty sum does in the
reference. A request's value is the arithmetic mean over its generations;
KnowEdit and ROME print 100 × the mean over requests.

Differences from the reference, all deliberate and recorded in the run's
config (``docs/benchmarks.md`` explains them):

* the text is generated **greedily** with the key/value cache, in padded
  batches, ``max_new_tokens`` new tokens after the prompt (default 100);
  the reference samples top-k = 5 and counts the prompt in its 100-token
  budget. Like the reference, generation does not stop at the
  end-of-sequence token (``stop_at_eos=false``): an instruction-tuned model
  ends most raw-prompt answers at once, and the score would then measure
  the prompt only;
* words come from a small regular expression instead of NLTK's
  ``word_tokenize`` (see :func:`word_tokens`);
* as in the reference, the scored text is the prompt plus the
  continuation, decoded without special tokens, NFKD-normalised, with
  blank lines (``"\\n\\n"``) replaced by a space.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

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
from lmedit.routing import generate_routed

NGRAM_ORDERS: tuple[int, ...] = (2, 3)
NGRAM_WEIGHTS: tuple[float, ...] = (2 / 3, 4 / 3)

# NLTK's Treebank-style rules that change which n-grams are distinct: punctuation marks are tokens
# of their own, clitics ('s, 're, n't, ...) are split off, numbers keep their inner separators,
# hyphenated words and "..." stay whole.
_WORD = re.compile(
    r"""
    \d+(?:[.,:]\d+)+             # 3.14, 1,000, 10:30
  | \w+(?=n't\b)                 # "do" of "don't", "ca" of "can't" (as NLTK splits them)
  | n't\b
  | '(?:s|re|ve|ll|d|m)\b        # clitics
  | \w+(?:-\w+|'(?!(?:s|re|ve|ll|d|m)\b)\w+)*   # words, hyphenated words, o'clock (not clitics)
  | \.\.\.                       # an ellipsis
  | [^\w\s]                      # any other single punctuation mark
    """,
    re.VERBOSE | re.IGNORECASE,
)


def word_tokens(text: str) -> list[str]:
    """Split ``text`` into words and punctuation marks, close to NLTK's ``word_tokenize``.

    Not identical: NLTK also rewrites quotes (`` and ''), keeps abbreviation
    periods inside a sentence ("Dr.") and splits sentences first. Those cases
    change few n-grams of a 100-token generation, and the dependency is not
    worth them.
    """
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the n-grams of ``tokens`` (0 when there are none)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_ngram_entropy(
    text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS
) -> float:
    """ROME's weighted n-gram entropy of one text: the mean of ``w_n · H_n`` over the orders."""
    tokens = word_tokens(text)
    weighted = [w * ngram_entropy(tokens, n) for n, w in zip(orders, weights)]
    return sum(weighted) / len(weighted)


def mean_ngram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of :func:`text_ngram_entropy` over texts (ROME's ``n_gram_entropy``)."""
    if not texts:
        raise ValueError("cannot compute the n-gram entropy of no texts")
    return sum(text_ngram_entropy(t) for t in texts) / len(texts)


def clean_generation(text: str) -> str:
    """The reference's post-processing of a decoded generation before scoring."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@dataclass(frozen=True)
class Generation:
    """A prompt's greedy continuation: the text that is scored and how many new tokens it has."""

    text: str
    new_tokens: int


class _NoStopTokenizer:
    """A view of a tokenizer without an end-of-sequence id, so greedy decoding runs the full length."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_token_id = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def generate_texts(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
    stop_at_eos: bool = False, share_prefix: bool = False,
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (each distinct prompt decoded once), as scored texts.

    A routed model (IKE, SERAC) continues each prompt as it would in use, from
    its routed prompt; the scored text is still the prompt as given plus the
    continuation, so IKE's demonstrations never enter the entropy.
    ``share_prefix``: see :func:`lmedit.forward.generate_greedy`.
    """
    distinct = list(dict.fromkeys(prompts))
    decoder_tok = tok if stop_at_eos else _NoStopTokenizer(tok)
    tokens = generate_routed(model, decoder_tok, distinct, [max_new_tokens] * len(distinct), batch_size=batch_size,
                             share_prefix=share_prefix)
    by_prompt = {}
    for prompt, new in zip(distinct, tokens):
        full = list(tok(prompt).input_ids) + list(new)
        by_prompt[prompt] = Generation(clean_generation(tok.decode(full, skip_special_tokens=True)), len(new))
    return [by_prompt[p] for p in prompts]


@dataclass(frozen=True)
class FluencyOptions(SuiteOptions):
    max_new_tokens: int = 100
    batch_size: int = 32
    stop_at_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise SuiteError("fluency: max_new_tokens and batch_size must be at least 1")


def fluency_prompts(request: EditRequest) -> list[str]:
    """The prompts whose continuations are scored: ``extra["fluency_prompts"]``, else the edit prompt.

    KnowEdit generates from the edit prompt; ConvSent from a plain question
    about the topic, which its loader stores in ``extra``.
    """
    prompts = request.extra.get("fluency_prompts")
    if prompts is None:
        return [request.prompt]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise SuiteError(f"request {request.case_id}: extra['fluency_prompts'] must be a non-empty list of strings")
    return prompts


class FluencySuite(MetricSuite):
    """``fluency``: n-gram entropy of greedy generations, pre and post."""

    name = "fluency"
    options_type = FluencyOptions
    summary = "weighted 2/3-gram entropy of greedy generations (KnowEdit's Fluency = 100 × mean)"

    def settings(self, tok: Any | None = None) -> dict[str, Any]:
        return {
            **super().settings(tok), "decoding": "greedy",
            "ngram_orders": list(NGRAM_ORDERS), "ngram_weights": list(NGRAM_WEIGHTS),
            "word_split": "regex (NLTK word_tokenize-like)", "scored_text": "prompt + continuation",
        }

    def _measure(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], context: SuiteContext) -> list[dict[str, float]]:
        prompts = [[context.edit_prompt(p) for p in fluency_prompts(r)] for r in requests]
        flat = [p for group in prompts for p in group]
        was_training = model.training
        model.eval()
        try:
            generations = generate_texts(model, tok, flat, self.options.max_new_tokens, self.options.batch_size,
                                         self.options.stop_at_eos, share_prefix=context.packing)
        finally:
            model.train(was_training)
        rows, start = [], 0
        for group in prompts:
            mine = generations[start : start + len(group)]
            start += len(group)
            rows.append({
                "fluency": mean_ngram_entropy([g.text for g in mine]),
                "fluency_new_tokens": sum(g.new_tokens for g in mine) / len(mine),
            })
        return rows

    def capture(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], context: SuiteContext) -> SuiteCapture:
        metrics = self._measure(model, tok, requests, context)
        return SuiteCapture(self.name, metrics, [None] * len(requests), [request_key(r) for r in requests])

    def score(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], pre: SuiteCapture,
              context: SuiteContext) -> list[dict[str, float]]:
        check_same_requests(self.name, pre, requests)
        return self._measure(model, tok, requests, context)
