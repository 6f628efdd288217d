"""Prefixes shared by many sequences: find them, and compute each one once as a key/value cache.

An in-context editor puts the same demonstrations (hundreds of tokens) in
front of every probe of an edit, and a memory method may put the same
retrieved fact in front of several. Teacher-forced answer passes
(:mod:`.answers`) and greedy generation (:mod:`.generation`) both group
such sequences and feed each group's common start once, as the cache of
every batch of the group. In a causal model a token's keys and values depend
on the tokens before it only, so this is the same computation; each group's
shortcut is still checked against one full pass before it is used.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from lmedit.compat import cache_tensors, output_cache
from lmedit.forward.batching import SharedPrefix, build_inputs
from lmedit.forward.reading import forward_reading, logits_at
from lmedit.spec import ModelSpec

LOG = logging.getLogger(__name__)

MIN_SHARED_TOKENS = 32
"""Shorter common starts are recomputed per sequence: caching them saves less than it costs."""


def shared_prefix_groups(sequences: Sequence[Sequence[int]], limits: Sequence[int],
                         min_shared: int = MIN_SHARED_TOKENS) -> list[tuple[int, list[int]]]:
    """Group the sequences that start alike; per group, how many leading tokens all its members share.

    Sequences are sorted by their tokens, so those with a common start are
    neighbours. A neighbour joins the current group while the group keeps
    at least ``min_shared`` and at least half of the tokens it shared so far
    (so one loosely similar sequence does not shrink a long shared prefix).
    ``limits[i]`` caps what sequence ``i`` may share. The sequences of the
    groups that share fewer than ``min_shared`` tokens, or have one member,
    come last, as one group that shares 0.
    """
    order = sorted(range(len(sequences)), key=lambda i: tuple(sequences[i]))
    groups: list[tuple[int, list[int]]] = []
    for index in order:
        if groups:
            shared, members = groups[-1]
            common = min(shared, limits[index], _common_length(sequences[members[-1]], sequences[index]))
            if common >= max(min_shared, shared // 2):
                groups[-1] = (common, members + [index])
                continue
        groups.append((max(limits[index], 0), [index]))
    shared_groups = [(shared, sorted(members)) for shared, members in groups if len(members) > 1 and shared >= min_shared]
    rest = sorted(i for shared, members in groups if not (len(members) > 1 and shared >= min_shared) for i in members)
    return shared_groups + ([(0, rest)] if rest else [])


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def checked_prefix(model: torch.nn.Module, sequence: Sequence[int], length: int, columns: Sequence[int],
                   pad_id: int, mask_dtype: torch.dtype) -> SharedPrefix | None:
    """The first ``length`` tokens of ``sequence`` as a cache, if reading ``columns`` through it matches a full pass.

    One full pass of ``sequence`` gives both the reference logits at
    ``columns`` (all at or after ``length``) and the prefix's keys and values
    (a causal model's cache of its first ``length`` columns is the prefix's
    own). ``None`` when the model's cache has an unexpected layout or the
    two disagree beyond 1e-4 (a dtype that rounds the two layouts apart, a
    model that ignores the cache): the caller then feeds every sequence whole.
    """
    device = next(model.parameters()).device
    full = build_inputs([[0]], [sequence], pad_id, mask_dtype)
    reference, output = forward_reading(model, torch.tensor(list(columns), dtype=torch.long),
                                        input_ids=full.input_ids.to(device),
                                        attention_mask=full.attention_mask.to(device),
                                        position_ids=full.position_ids.to(device), use_cache=True)
    kv = cache_tensors(output_cache(output), ModelSpec.from_model(model).num_layers, len(sequence))
    if kv is None:
        LOG.debug("shared prefix: the model's cache has an unexpected layout; going without it")
        return None
    prefix = SharedPrefix(length, tuple((k[..., :length, :].clone(), v[..., :length, :].clone()) for k, v in kv))
    after = build_inputs([[0]], [sequence[length:]], pad_id, mask_dtype, prefix)
    shortcut = logits_at(model, after, torch.tensor([c - length for c in columns], dtype=torch.long))
    if not torch.allclose(shortcut, reference, rtol=1e-4, atol=1e-4):
        LOG.debug("shared prefix: logits through the cached prefix differ from a full pass (max %.2e); "
                  "going without it", float((shortcut - reference).abs().max()))
        return None
    return prefix
