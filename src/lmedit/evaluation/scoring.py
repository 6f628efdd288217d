"""Batched scoring primitives: teacher-forced token predictions and greedy generation.

Prompts are tokenised without padding. Teacher-forced scoring packs
several sequences into each row of a forward pass behind a block-diagonal
causal mask, with position ids restarting per sequence, so each sequence
sees exactly the context and positions it would see alone and no compute
goes to padding (models whose attention cannot take such a mask get
length-sorted, left-padded batches instead). The LM head runs only at the
positions whose prediction is read.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from lmedit.compat import cache_keyword, output_cache

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
class BatchInputs:
    """Model inputs for rows of sequences, and where each sequence starts (row, column)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    starts: dict[int, tuple[int, int]]


def build_inputs(
    rows: Sequence[Row], sequences: Sequence[Sequence[int]], pad_id: int, mask_dtype: torch.dtype
) -> BatchInputs:
    """Left-pad each row; rows holding several sequences get a block-diagonal causal 4D mask.

    Position ids restart at 0 for every sequence, so each one sees exactly
    the positions and the context it would see alone. With one sequence per
    row the usual 2D padding mask is used.
    """
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
            positions[r, column : column + len(seq)] = torch.arange(len(seq))
            segment[r, column : column + len(seq)] = index
            starts[index] = (r, column)
            column += len(seq)
    if all(len(row) == 1 for row in rows):
        return BatchInputs(ids, (segment >= 0).long(), positions, starts)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = torch.zeros((len(rows), 1, width, width), dtype=mask_dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    return BatchInputs(ids, mask, positions, starts)


def supports_packing(model: torch.nn.Module) -> bool:
    """Packing needs an attention that takes an additive 4D mask (eager or SDPA) and position ids."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in ("eager", "sdpa"):
        return False
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_at(model: torch.nn.Module, inputs: BatchInputs, flat_positions: torch.Tensor) -> torch.Tensor:
    """Float logits at the given flattened (row * width + column) positions only."""
    device = next(model.parameters()).device
    logits, _ = forward_reading(
        model, flat_positions, input_ids=inputs.input_ids.to(device),
        attention_mask=inputs.attention_mask.to(device), position_ids=inputs.position_ids.to(device), use_cache=False,
    )
    return logits


def forward_reading(model: torch.nn.Module, read: torch.Tensor, **model_inputs: Any) -> tuple[torch.Tensor, Any]:
    """Run the model; return float logits at the ``read`` flat positions, and its output.

    A pre-hook on the output embedding hands the LM head just those hidden
    states, so the vocabulary projection (a fifth of this model's FLOPs per
    token) runs only where a prediction is read. Anything the model applies
    after its head (logit soft-capping) still applies. Models without an
    output embedding module get full logits, gathered afterwards.
    """
    read = read.to(next(model.parameters()).device)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fired: list[bool] = []

    def gather(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        fired.append(True)
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, read)[None], *args[1:])

    hook = head.register_forward_pre_hook(gather) if isinstance(head, torch.nn.Module) else None
    try:
        out = model(**model_inputs)
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits[0] if len(fired) == 1 else out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, read)
    return logits.float(), out


def forward_tail(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, keep: int) -> torch.Tensor:
    """Float logits of the last ``keep`` columns of a left-padded batch, shape (rows, keep, vocab)."""
    inputs = build_inputs([[i] for i in range(len(sequences))], sequences, pad_id, torch.float32)
    width = inputs.input_ids.shape[1]
    columns = torch.arange(width - keep, width)
    flat = (torch.arange(len(sequences))[:, None] * width + columns[None]).reshape(-1)
    return logits_at(model, inputs, flat).reshape(len(sequences), keep, -1)


def pad_id_of(tok: Any) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tok.pad_token")
    return int(pad)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


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

    Shared by every teacher-forced pass (core scoring, suites), so all of them batch, pack and slice alike.
    """
    causal = packing and supports_packing(model)
    # In a causal, position-wise model the last answer token changes no prediction that is read,
    # so it is left out. Without ``packing`` the model may not be (an adapter that looks at the
    # last token of its input, like DEFER's gate), and the full sequence is fed, as EasyEdit does.
    inputs_of = [t.ids[:-1] if causal else t.ids for t in tokenized]
    lengths = [len(ids) for ids in inputs_of]
    if causal and batch_size > 1:
        plan = plan_packed(lengths, batch_size, max_batch_tokens)
    else:
        plan = plan_padded(lengths, batch_size, max_batch_tokens)
    pad = pad_id_of(tok)
    for rows in plan:
        inputs = build_inputs(rows, inputs_of, pad, _model_dtype(model))
        width = inputs.input_ids.shape[1]
        members = [index for row in rows for index in row]
        spans, flat = [], []
        for index in members:
            row, start = inputs.starts[index]
            item = tokenized[index]
            # column c predicts token c+1: the answer is read from the columns before each answer token
            columns = range(start + item.prompt_len - 1, start + len(item.ids) - 1)
            spans.append((len(flat), len(columns)))
            flat.extend(row * width + c for c in columns)
        yield AnswerBatch(inputs, members, spans, torch.tensor(flat, dtype=torch.long))


def _read_answer(rows: torch.Tensor, item: TokenizedPair) -> TeacherForcedScore:
    """``rows``: the logits that predict each answer token, in order."""
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
    use_cache: bool = True,
) -> list[tuple[int, ...]]:
    """Greedy continuation of each prompt, ``max_new_tokens[i]`` tokens long (shorter if EOS comes first).

    Batches are formed from prompts that want the same number of new tokens
    (then similar prompt lengths), so no batch decodes steps that only one
    member needs; decoding stops as soon as every member is done.
    ``use_cache=False`` feeds the whole sequence at every step (EasyEdit's
    ``vanilla_generation``): the same tokens for an ordinary model, but a
    method that reads its whole input on each call (WISE's routing, DEFER's
    gate) then sees prompt and answer so far, not only the newest token.
    """
    encoded = [tuple(tok(p).input_ids) for p in prompts]
    outputs: list[tuple[int, ...]] = [()] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: (max_new_tokens[i], len(encoded[i])))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        generated = _greedy_batch(model, [encoded[i] for i in batch], [max_new_tokens[i] for i in batch],
                                  pad_id_of(tok), tok.eos_token_id, use_cache)
        for index, tokens in zip(batch, generated):
            outputs[index] = tokens
        if progress:
            progress(len(batch))
    return outputs


def _greedy_batch(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], wanted: Sequence[int], pad_id: int, eos: int | None,
    use_cache: bool = True,
) -> list[tuple[int, ...]]:
    """Left-padded prefill, then one token per step with the key/value cache (or the whole sequence again)."""
    device = next(model.parameters()).device
    inputs = build_inputs([[i] for i in range(len(prompts))], prompts, pad_id, torch.float32)
    width = inputs.input_ids.shape[1]
    last = torch.arange(len(prompts)) * width + width - 1
    mask = inputs.attention_mask.to(device)
    ids, all_positions = inputs.input_ids.to(device), inputs.position_ids.to(device)
    logits, cache = _step(model, ids, mask, all_positions, None, last, use_cache)
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [n <= 0 for n in wanted]
    for step in range(max(wanted)):
        next_ids = logits.argmax(dim=-1)
        for row, token in enumerate(next_ids.tolist()):
            if not done[row]:
                tokens[row].append(token)
                done[row] = len(tokens[row]) >= wanted[row] or token == eos
        if all(done) or step + 1 == max(wanted):
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = all_positions[:, -1:] + 1
        all_positions = torch.cat([all_positions, positions], dim=1)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if use_cache:
            logits, cache = _step(model, next_ids[:, None], mask, positions, cache, torch.arange(len(prompts)), True)
        else:
            width = ids.shape[1]
            logits, _ = _step(model, ids, mask, all_positions, None, torch.arange(len(prompts)) * width + width - 1, False)
    return [tuple(t) for t in tokens]


def _step(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any,
    read: torch.Tensor,
    use_cache: bool,
) -> tuple[torch.Tensor, Any]:
    """One forward pass, with or without the key/value cache; logits at the ``read`` flat positions only."""
    if not use_cache:
        logits, _ = forward_reading(model, read, input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
        return logits, None
    logits, out = forward_reading(model, read, input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=True, **{cache_keyword(model): cache})
    return logits, output_cache(out)


def _until_eos(tokens: list[int], eos: int | None) -> tuple[int, ...]:
    if eos is not None and eos in tokens:
        return tuple(tokens[: tokens.index(eos) + 1])
    return tuple(tokens)
