"""Batched scoring primitives: teacher-forced token predictions and greedy generation.

Prompts are tokenised without padding, sorted by length, left-padded into
batches and run with explicit position ids, so a padded sequence sees
exactly the positions it would see alone. With left padding every
sequence ends at the last column, so only the last few columns' logits are
needed; models that accept ``logits_to_keep`` compute just those.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class TokenizedPair:
    """``prompt + " " + answer`` tokenised, and where the answer starts (EasyEdit's slicing)."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.ids[self.prompt_len :]


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


def tokenize_pair(tok: Any, prompt: str, answer: str) -> TokenizedPair:
    """Tokenise as EasyEdit does: answer span = tokens of ``prompt + ' ' + answer`` past ``len(tok(prompt))``."""
    prompt_ids = tok(prompt).input_ids
    full_ids = tok(f"{prompt} {answer}").input_ids
    if len(full_ids) <= len(prompt_ids):
        raise ValueError(f"answer {answer!r} adds no tokens after prompt {prompt!r}")
    return TokenizedPair(tuple(full_ids), len(prompt_ids))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad to a batch; return input ids, attention mask and position ids that ignore the padding."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_tail(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, keep: int) -> torch.Tensor:
    """Float logits of the last ``keep`` columns of a left-padded batch.

    Every left-padded sequence ends at the last column, so its answer tokens
    are predicted by the last few columns; models that accept
    ``logits_to_keep`` skip the LM head everywhere else.
    """
    ids, mask, positions = left_pad(sequences, pad_id)
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), **kwargs
    ).logits
    return logits[:, -keep:].float()


def pad_id_of(tok: Any) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tok.pad_token")
    return int(pad)


@torch.no_grad()
def score_teacher_forced(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> list[TeacherForcedScore]:
    """One forward pass per batch; returns scores in the order of ``pairs``."""
    tokenized = [tokenize_pair(tok, p, a) for p, a in pairs]
    results: list[TeacherForcedScore | None] = [None] * len(tokenized)
    for batch in _batches_by_length([len(t.ids) for t in tokenized], batch_size):
        items = [tokenized[i] for i in batch]
        # column c predicts token c+1: an answer of n tokens is read from the n columns before the last
        keep = max(len(t.target_ids) for t in items) + 1
        logits = forward_tail(model, [t.ids for t in items], pad_id_of(tok), keep)
        for row, (index, item) in enumerate(zip(batch, items)):
            results[index] = _read_answer(logits[row], item)
        if progress:
            progress(len(batch))
    return [r for r in results if r is not None]


def _read_answer(tail_logits: torch.Tensor, item: TokenizedPair) -> TeacherForcedScore:
    n_target = len(item.target_ids)
    rows = tail_logits[-n_target - 1 : -1]
    logprobs = torch.log_softmax(rows, dim=-1)
    target = torch.tensor(item.target_ids, device=rows.device)
    return TeacherForcedScore(
        target_ids=item.target_ids,
        predicted_ids=tuple(int(x) for x in rows.argmax(dim=-1).tolist()),
        target_logprobs=tuple(float(x) for x in logprobs.gather(1, target[:, None]).squeeze(1).tolist()),
    )


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: Sequence[int],
    *,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> list[tuple[int, ...]]:
    """Greedy continuation of each prompt, ``max_new_tokens[i]`` tokens long (shorter if EOS comes first)."""
    encoded = [tuple(tok(p).input_ids) for p in prompts]
    outputs: list[tuple[int, ...]] = [()] * len(encoded)
    device = next(model.parameters()).device
    pad = pad_id_of(tok)
    eos = tok.eos_token_id
    for batch in _batches_by_length([len(e) for e in encoded], batch_size):
        ids, mask, _ = left_pad([encoded[i] for i in batch], pad)
        longest = max(max_new_tokens[i] for i in batch)
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=longest,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos,
        )[:, ids.shape[1] :]
        for row, index in enumerate(batch):
            outputs[index] = _until_eos(generated[row].tolist()[: max_new_tokens[index]], eos)
        if progress:
            progress(len(batch))
    return outputs


def _until_eos(tokens: list[int], eos: int | None) -> tuple[int, ...]:
    if eos is not None and eos in tokens:
        return tuple(tokens[: tokens.index(eos) + 1])
    return tuple(tokens)
