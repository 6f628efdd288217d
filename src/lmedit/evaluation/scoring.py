"""Probe scoring: what the model predicts for each answer token, teacher-forced.

The forward layer (:mod:`lmedit.forward`) tokenises, packs and batches the
pairs and reads logits only where an answer token is predicted; this module
turns those logits into each probe's argmax tokens and target
log-probabilities, the raw material of every teacher-forced metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.forward import ProgressFn, TokenizedPair, answer_batches, logits_at, tokenize_pair


@dataclass(frozen=True)
class TeacherForcedScore:
    """Per answer token: the model's argmax and the log-probability of the true token."""

    target_ids: tuple[int, ...]
    predicted_ids: tuple[int, ...]
    target_logprobs: tuple[float, ...]

    @property
    def token_accuracy(self) -> float:
        return token_match(self.predicted_ids, self.target_ids)

    @property
    def mean_nll(self) -> float:
        return -sum(self.target_logprobs) / len(self.target_logprobs)


def token_match(predicted: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of reference positions whose token equals the prediction at the same position.

    A prediction shorter than the reference (generation stopped early) counts
    the missing positions as wrong.
    """
    if not reference:
        raise ValueError("cannot score an empty reference")
    hits = sum(1 for i, ref in enumerate(reference) if i < len(predicted) and predicted[i] == ref)
    return hits / len(reference)


@torch.no_grad()
def score_teacher_forced(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 128,
    max_batch_tokens: int = 2048,
    packing: bool = True,
    progress: ProgressFn | None = None,
) -> list[TeacherForcedScore]:
    """One forward pass per batch; returns scores in the order of ``pairs``.

    ``batch_size`` caps the sequences and ``max_batch_tokens`` the tokens
    (padding included) per forward pass. With ``packing`` (and a model
    that supports it) several sequences share a row behind a block-diagonal
    mask, so no compute goes to padding; ``batch_size=1`` is the
    one-prompt-at-a-time reference. ``packing=False`` also feeds each
    sequence whole, for methods whose output is not purely causal.
    """
    tokenized = [tokenize_pair(tok, p, a) for p, a in pairs]
    results: list[TeacherForcedScore | None] = [None] * len(tokenized)
    for batch in answer_batches(model, tok, tokenized, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                packing=packing):
        logits = logits_at(model, batch.inputs, batch.read)
        for index, (offset, count) in zip(batch.members, batch.spans):
            results[index] = _read_answer(logits[offset : offset + count], tokenized[index])
        if progress:
            progress(len(batch.members))
    return [r for r in results if r is not None]


def _read_answer(rows: torch.Tensor, item: TokenizedPair) -> TeacherForcedScore:
    """``rows``: the logits that predict each answer token, in order."""
    logprobs = torch.log_softmax(rows, dim=-1)
    target = torch.tensor(item.target_ids, device=rows.device)
    return TeacherForcedScore(
        target_ids=item.target_ids,
        predicted_ids=tuple(int(x) for x in rows.argmax(dim=-1).tolist()),
        target_logprobs=tuple(float(x) for x in logprobs.gather(1, target[:, None]).squeeze(1).tolist()),
    )
