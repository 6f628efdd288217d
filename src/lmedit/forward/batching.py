"""Laying tokenised sequences out as the inputs of one forward pass.

Prompts are tokenised without padding. Teacher-forced passes pack several
sequences into each row of a forward pass behind a block-diagonal causal
mask, with position ids restarting per sequence, so each sequence sees
exactly the context and positions it would see alone and no compute goes
to padding (models whose attention cannot take such a mask get
length-sorted, left-padded batches instead).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lmedit.compat import build_cache

ProgressFn = Callable[[int], None]
"""Called after each batch with the number of items it finished (drives a progress bar)."""


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


Row = list[int]
"""Indices of the sequences laid end to end in one row of a forward pass."""


def plan_padded(lengths: Sequence[int], max_sequences: int, max_tokens: int) -> list[list[Row]]:
    """One sequence per row, sorted by length, as many rows as both limits allow (padding counted)."""
    batches: list[list[Row]] = []
    current: list[Row] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        # sorted ascending, so this sequence sets the padded width of the batch
        if current and (len(current) >= max_sequences or (len(current) + 1) * lengths[index] > max_tokens):
            batches.append(current)
            current = []
        current.append([index])
    if current:
        batches.append(current)
    return batches


def plan_packed(
    lengths: Sequence[int], max_sequences: int, max_tokens: int, row_capacity: int = 128
) -> list[list[Row]]:
    """Lay sequences end to end in rows (first fit, longest first), then group rows into batches.

    Packing removes the padding that sorted batches still carry; short rows
    keep the wasted attention between unrelated sequences small.
    """
    capacity = max(row_capacity, max(lengths, default=0))
    rows: list[Row] = []
    fill: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, used in enumerate(fill):
            if used + lengths[index] <= capacity:
                rows[r].append(index)
                fill[r] += lengths[index]
                break
        else:
            rows.append([index])
            fill.append(lengths[index])
    batches: list[list[Row]] = []
    current: list[Row] = []
    width = count = 0
    for row, used in sorted(zip(rows, fill), key=lambda rf: -rf[1]):
        new_width = max(width, used)
        if current and (count + len(row) > max_sequences or (len(current) + 1) * new_width > max_tokens):
            batches.append(current)
            current, width, count = [], 0, 0
            new_width = used
        current.append(row)
        width, count = new_width, count + len(row)
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class SharedPrefix:
    """The tokens every sequence of a batch starts with, as per-layer keys and values of one row.

    Computed once and reused by every batch of the group: in-context editing
    puts the same demonstrations in front of every probe, so the probes differ
    only in their last few dozen tokens.
    """

    length: int
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def cache_for(self, model: torch.nn.Module, rows: int) -> Any:
        """The model's cache object holding the prefix once per row (views, not copies)."""
        return build_cache(model, [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.kv])


@dataclass(frozen=True)
class BatchInputs:
    """Model inputs for rows of sequences, and where each sequence starts (row, column).

    With ``prefix`` the rows hold only what follows it: every row attends to
    the prefix's keys and values first, and positions continue after it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    starts: dict[int, tuple[int, int]]
    prefix: SharedPrefix | None = None


def build_inputs(
    rows: Sequence[Row], sequences: Sequence[Sequence[int]], pad_id: int, mask_dtype: torch.dtype,
    prefix: SharedPrefix | None = None,
) -> BatchInputs:
    """Left-pad each row; rows holding several sequences get a block-diagonal causal 4D mask.

    Position ids restart at 0 for every sequence, so each one sees exactly
    the positions and the context it would see alone. With one sequence per
    row the usual 2D padding mask is used. With ``prefix`` the sequences are
    what follows it: positions start at its length and every column may also
    attend to its columns, which come first in the mask.
    """
    shift = prefix.length if prefix is not None else 0
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = -1 - torch.arange(width).repeat(len(rows), 1)  # padding: a segment of its own per column
    starts: dict[int, tuple[int, int]] = {}
    for r, row in enumerate(rows):
        column = width - sum(len(sequences[i]) for i in row)
        for index in row:
            seq = sequences[index]
            ids[r, column : column + len(seq)] = torch.tensor(seq, dtype=torch.long)
            positions[r, column : column + len(seq)] = torch.arange(shift, shift + len(seq))
            segment[r, column : column + len(seq)] = index
            starts[index] = (r, column)
            column += len(seq)
    if all(len(row) == 1 for row in rows):
        mask = (segment >= 0).long()
        if shift:
            mask = torch.cat([torch.ones((len(rows), shift), dtype=torch.long), mask], dim=1)
        return BatchInputs(ids, mask, positions, starts, prefix)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    if shift:
        allowed = torch.cat([torch.ones((len(rows), width, shift), dtype=torch.bool), allowed], dim=2)
    mask = torch.zeros((len(rows), 1, width, shift + width), dtype=mask_dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    return BatchInputs(ids, mask, positions, starts, prefix)


def supports_packing(model: torch.nn.Module) -> bool:
    """Packing needs an attention that takes an additive 4D mask (eager or SDPA) and position ids."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in ("eager", "sdpa"):
        return False
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
