"""Batched teacher-forced passes that hand back whole next-token distributions, for suites that need them.

:func:`lmedit.evaluation.scoring.score_teacher_forced` keeps only the
argmax and the target log-probability of each answer token. ConvSent's
locality is a KL divergence between whole distributions, so these passes
return the logits at every answer-predicting position (and, on request,
the hidden states that enter the LM head there). They use the same
tokenisation, packing and batching as the core scorer, batch by batch, so
a caller can reduce each batch before the next one is computed.

Keeping full pre-edit distributions would cost ``tokens × vocabulary``
floats (60 MB per ConvSent request on a 49k vocabulary). :class:`HeadSnapshot`
instead keeps a copy of the output layer once and the pre-edit hidden
states that enter it (``tokens × hidden``, 85× smaller here): the pre-edit
logits are recomputed exactly from them after the edit, even when the edit
changed the output layer itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch.func import functional_call

from lmedit.forward import TokenizedPair, answer_batches, logits_at, tokenize_pair

LOG = logging.getLogger(__name__)


@dataclass
class AnswerPass:
    """One (prompt, answer) pair after a forward pass: logits (and head inputs) predicting each answer token."""

    index: int
    pair: TokenizedPair
    logits: torch.Tensor
    hidden: torch.Tensor | None = None

    @property
    def target_logprobs(self) -> torch.Tensor:
        target = torch.tensor(self.pair.target_ids, device=self.logits.device)
        return torch.log_softmax(self.logits, dim=-1).gather(1, target[:, None]).squeeze(1)


def answer_passes(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 128,
    max_batch_tokens: int = 2048,
    packing: bool = True,
    keep_hidden: bool = False,
) -> Iterator[list[AnswerPass]]:
    """Yield, batch by batch, the answer-position logits of ``pairs`` (order within a batch is arbitrary)."""
    tokenized = [tokenize_pair(tok, p, a) for p, a in pairs]
    device = next(model.parameters()).device
    for batch in answer_batches(model, tok, tokenized, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                packing=packing):
        inputs, members, spans, read = batch.inputs, batch.members, batch.spans, batch.read
        captured: list[torch.Tensor] = []
        hook = _hidden_hook(model, read.to(device), captured) if keep_hidden else None
        try:
            logits = logits_at(model, inputs, read)
        finally:
            if hook is not None:
                hook.remove()
        hidden = captured[0] if captured else None
        yield [
            AnswerPass(index, tokenized[index], logits[o : o + n], None if hidden is None else hidden[o : o + n])
            for index, (o, n) in zip(members, spans)
        ]


def _hidden_hook(model: torch.nn.Module, read: torch.Tensor, sink: list[torch.Tensor]) -> Any:
    """Record the LM head's input at the read positions (registered before forward_reading's own hook)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        return None

    def record(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        hidden = args[0]
        sink.append(hidden.reshape(-1, hidden.shape[-1]).index_select(0, read).detach().clone())

    return head.register_forward_pre_hook(record)


class HeadSnapshot:
    """A frozen copy of the model's output layer, to turn saved pre-edit hidden states back into logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Module):
            raise ValueError("the model has no output embedding module")
        self.head = head
        self.params = {name: p.detach().clone() for name, p in head.named_parameters()}
        self.buffers = {name: b.detach().clone() for name, b in head.named_buffers()}
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.head, {**self.params, **self.buffers}, (hidden,)).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def reproduces(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        """Whether the logits rebuilt from ``hidden`` match the model's own (anything after the head?)."""
        rebuilt = self.logits(hidden)
        scale = 1.0 + float(logits.abs().max())
        return bool((rebuilt - logits).abs().max() <= 1e-4 * scale)


def kl_divergence(pre_logits: torch.Tensor, post_logits: torch.Tensor) -> torch.Tensor:
    """Per row KL(softmax(pre) ‖ softmax(post)) in nats."""
    pre_log = torch.log_softmax(pre_logits.float(), dim=-1)
    post_log = torch.log_softmax(post_logits.float(), dim=-1)
    return (pre_log.exp() * (pre_log - post_log)).sum(dim=-1)
