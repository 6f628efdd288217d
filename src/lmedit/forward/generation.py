"""Batched greedy generation, with or without the key/value cache.

Evaluation's generation metrics, the methods that score their own
generations (WISE) and the lifelong protocol's held-out answers all decode
through this one loop, so they agree token for token.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lmedit.compat import cache_keyword, output_cache, takes_cache
from lmedit.forward.batching import ProgressFn, SharedPrefix, build_inputs
from lmedit.forward.prefix import checked_prefix, shared_prefix_groups
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
    share_prefix: bool = False,
) -> list[tuple[int, ...]]:
    """Greedy continuation of each prompt, ``max_new_tokens[i]`` tokens long (shorter if EOS comes first).

    Batches are formed from prompts that want the same number of new tokens
    (then similar prompt lengths), so no batch decodes steps that only one
    member needs; decoding stops as soon as every member is done.
    ``use_cache=False`` feeds the whole sequence at every step (EasyEdit's
    ``vanilla_generation``): the same tokens for an ordinary model, but a
    method that reads its whole input on each call (WISE's routing, DEFER's
    gate) then sees prompt and answer so far, not only the newest token.

    ``share_prefix`` (for a causal model whose edit acts position by
    position, with the cache, batch size above 1): prompts that start with
    the same long run of tokens (an in-context editor's demonstrations) are
    grouped, and the run is prefilled once as the cache of every batch of
    the group (:mod:`lmedit.forward.prefix`), if a check on one member agrees.
    """
    encoded = [tuple(tok(p).input_ids) for p in prompts]
    outputs: list[tuple[int, ...]] = [()] * len(encoded)
    pad = pad_id_of(tok)
    for length, members in _prompt_groups(model, encoded, share_prefix and use_cache and batch_size > 1):
        prefix = _checked_prompt_prefix(model, encoded, members, length, pad) if length else None
        order = sorted(members, key=lambda i: (max_new_tokens[i], len(encoded[i])))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            generated = _greedy_batch(model, [encoded[i] for i in batch], [max_new_tokens[i] for i in batch],
                                      pad, tok.eos_token_id, use_cache, stop, prefix)
            for index, tokens in zip(batch, generated):
                outputs[index] = tokens
            if progress:
                progress(len(batch))
    return outputs


def _prompt_groups(model: torch.nn.Module, encoded: Sequence[Sequence[int]], share: bool) -> list[tuple[int, list[int]]]:
    """Prompts grouped by a shared start (its length per group), or one group sharing nothing."""
    if share and len(encoded) > 1 and takes_cache(model):
        # the last prompt token stays out of the prefix: its logits give the first new token
        return shared_prefix_groups(encoded, [len(e) - 1 for e in encoded])
    return [(0, list(range(len(encoded))))]


def _checked_prompt_prefix(model: torch.nn.Module, encoded: Sequence[Sequence[int]], members: Sequence[int],
                           length: int, pad: int) -> SharedPrefix | None:
    """The group's shared start as a cache, checked on the next-token logits of its shortest prompt."""
    probe = encoded[min(members, key=lambda i: len(encoded[i]))]
    return checked_prefix(model, probe, length, [len(probe) - 1], pad, torch.float32)


def _greedy_batch(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], wanted: Sequence[int], pad_id: int, eos: int | None,
    use_cache: bool = True, stop: Callable[[Sequence[int]], bool] | None = None,
    prefix: SharedPrefix | None = None,
) -> list[tuple[int, ...]]:
    """Left-padded prefill, then one token per step with the key/value cache (or the whole sequence again).

    With ``prefix`` the prompts start with its tokens: the rows hold the rest, and its keys and values (one
    copy per row) are the cache the prefill extends.
    """
    device = next(model.parameters()).device
    shift = prefix.length if prefix is not None else 0
    inputs = build_inputs([[i] for i in range(len(prompts))], [p[shift:] for p in prompts], pad_id, torch.float32,
                          prefix)
    width = inputs.input_ids.shape[1]
    last = torch.arange(len(prompts)) * width + width - 1
    mask = inputs.attention_mask.to(device)
    ids, all_positions = inputs.input_ids.to(device), inputs.position_ids.to(device)
    cache = prefix.cache_for(model, len(prompts)) if prefix is not None else None
    logits, cache = _step(model, ids, mask, all_positions, cache, last, use_cache)
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
