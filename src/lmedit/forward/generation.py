"""Batched greedy generation, with or without the key/value cache.

Evaluation's generation metrics, the methods that score their own
generations (WISE) and the lifelong protocol's held-out answers all decode
through this one loop, so they agree token for token.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lmedit.compat import cache_keyword, output_cache
from lmedit.forward.batching import ProgressFn, build_inputs
from lmedit.forward.reading import forward_reading
from lmedit.forward.tokens import pad_id_of


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
    stop: Callable[[Sequence[int]], bool] | None = None,
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
                                  pad_id_of(tok), tok.eos_token_id, use_cache, stop)
        for index, tokens in zip(batch, generated):
            outputs[index] = tokens
        if progress:
            progress(len(batch))
    return outputs


def _greedy_batch(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], wanted: Sequence[int], pad_id: int, eos: int | None,
    use_cache: bool = True, stop: Callable[[Sequence[int]], bool] | None = None,
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
                done[row] = len(tokens[row]) >= wanted[row] or token == eos or (stop is not None and stop(tokens[row]))
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
