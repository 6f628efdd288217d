"""Teacher-forced answer passes: plan the (prompt, answer) pairs into batches and say where each answer is read.

Every teacher-forced pass of the framework (core scoring, the suites) plans
through :func:`answer_batches`, so all of them batch, pack and slice alike.

Sequences that start with the same long run of tokens (an in-context
editor's demonstrations in front of every probe, a memory method's retrieved
fact) are grouped, and the run they share is computed once: its keys and
values become the cache of every batch of the group, and the batches hold
only what follows it. In a causal model a token's keys and values depend on
the tokens before it only, so this is the same computation. The shortcut is
checked against a full pass of one sequence of the group and dropped for a
group where they disagree (a dtype whose rounding differs between the two
layouts, an attention that ignores the cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from lmedit.compat import takes_cache
from lmedit.forward.batching import (
    BatchInputs,
    SharedPrefix,
    build_inputs,
    plan_packed,
    plan_padded,
    supports_packing,
)
from lmedit.forward.prefix import checked_prefix, shared_prefix_groups
from lmedit.forward.tokens import TokenizedPair, pad_id_of


@dataclass
class AnswerBatch:
    """One planned forward pass: its inputs, the pairs it holds, and where their answer predictions are read."""

    inputs: BatchInputs
    members: list[int]  # indices into the tokenized pairs
    spans: list[tuple[int, int]]  # per member: offset and count of its rows in the read positions
    read: torch.Tensor  # flat (row * width + column) positions of the columns predicting answer tokens


def answer_batches(
    model: torch.nn.Module, tok: Any, tokenized: Sequence[TokenizedPair], *, batch_size: int = 128,
    max_batch_tokens: int = 2048, packing: bool = True,
) -> Iterator[AnswerBatch]:
    """Plan ``tokenized`` into packed (or left-padded) batches and yield each one's inputs and read positions.

    Run each batch with :func:`lmedit.forward.logits_at` (``batch.inputs``, ``batch.read``): it feeds a
    group's shared prefix as the cache.
    """
    causal = packing and supports_packing(model)
    # In a causal, position-wise model the last answer token changes no prediction that is read,
    # so it is left out. Without ``packing`` the model may not be (an adapter that looks at the
    # last token of its input, like DEFER's gate), and the full sequence is fed, as EasyEdit does.
    # Sharing a prefix rests on the same property, so it is used only then, and not at batch_size 1,
    # the one-prompt-at-a-time reference that every shortcut is compared with.
    inputs_of = [t.ids[:-1] if causal else t.ids for t in tokenized]
    if causal and takes_cache(model) and len(tokenized) > 1 and batch_size > 1:
        # the prefix must end before the first column an answer is read from
        groups = shared_prefix_groups(inputs_of, [t.prompt_len - 1 for t in tokenized])
    else:
        groups = [(0, list(range(len(tokenized))))]
    pad = pad_id_of(tok)
    dtype = next(model.parameters()).dtype
    for length, members in groups:
        prefix = _checked_prefix(model, tokenized, inputs_of, members, length, pad, dtype) if length else None
        shift = prefix.length if prefix is not None else 0
        suffixes = [inputs_of[i][shift:] for i in members]
        lengths = [len(s) for s in suffixes]
        if causal and batch_size > 1:
            plan = plan_packed(lengths, batch_size, max_batch_tokens)
        else:
            plan = plan_padded(lengths, batch_size, max_batch_tokens)
        for rows in plan:
            inputs = build_inputs(rows, suffixes, pad, dtype, prefix)
            local = [index for row in rows for index in row]
            yield AnswerBatch(inputs, [members[i] for i in local],
                              *_read_positions(inputs, [tokenized[members[i]] for i in local], local, shift))


def _read_positions(inputs: BatchInputs, items: Sequence[TokenizedPair], local: Sequence[int],
                    shift: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Per item, its span in the read positions, and the flat positions predicting its answer tokens."""
    width = inputs.input_ids.shape[1]
    spans, flat = [], []
    for index, item in zip(local, items):
        row, start = inputs.starts[index]
        columns = _answer_columns(item)
        spans.append((len(flat), len(columns)))
        flat.extend(row * width + start - shift + c for c in columns)
    return spans, torch.tensor(flat, dtype=torch.long)


def _answer_columns(item: TokenizedPair) -> range:
    """The columns of the pair's own sequence that predict its answer tokens (column c predicts token c + 1)."""
    return range(item.prompt_len - 1, len(item.ids) - 1)


def _checked_prefix(model: torch.nn.Module, tokenized: Sequence[TokenizedPair], inputs_of: Sequence[Sequence[int]],
                    members: Sequence[int], length: int, pad: int, dtype: torch.dtype) -> SharedPrefix | None:
    """The group's first ``length`` tokens as a cache, checked on the group's shortest member's answer columns."""
    probe = min(members, key=lambda i: len(inputs_of[i]))
    return checked_prefix(model, inputs_of[probe], length, _answer_columns(tokenized[probe]), pad, dtype)
