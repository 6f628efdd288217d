"""Rerun a causal LM from one block upward, for optimisation loops that only change what lies above it.

An edit that trains something at block L (a value vector at ROME's MLP
output, an adapter's memory, GRACE's codebook value) leaves every block below
L untouched, so their output is the same at every step of its loop. One full
pass records the input of block L and the extra arguments the model hands
each block from L up (position embeddings, attention mask: per block, since
Gemma 2/3 give sliding-window layers their own); each later step then runs
only blocks L.. and the final norm and LM head at the positions read. The
shortcut is checked against the full forward once and refused (``None``) if
the two differ, for a model that does something between its blocks that this
misses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lmedit.compat import build_cache, cache_keyword, cache_tensors, output_cache, takes_cache
from lmedit.forward.batching import build_inputs
from lmedit.forward.reading import forward_reading, logits_at
from lmedit.spec import ModelSpec, get_module


@dataclass
class _BlockInput:
    """What the rerun blocks receive: block ``first``'s hidden states and, per block, its other arguments.

    The other arguments are recorded for every block, not only the first: a
    model may hand its layers different ones (Gemma 2/3 give sliding-window
    layers their own attention mask and rotary embeddings).
    """

    hidden: torch.Tensor | None = None
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.hidden is not None and len(self.calls) > 0


@contextmanager
def _recording_block_input(model: nn.Module, spec: ModelSpec, first: int) -> Iterator[_BlockInput]:
    """What blocks ``first``.. receive (hidden states of the first, every block's other arguments) in the
    forward pass run inside this block."""
    captured = _BlockInput()
    blocks = list(get_module(model, spec.layers_path))[first:]

    def grab(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if index == 0:
                captured.hidden = args[0].detach()
                captured.calls.clear()
            if len(captured.calls) == index:
                captured.calls.append((args[1:], dict(kwargs)))
        return hook

    hooks = [block.register_forward_pre_hook(grab(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()
        if len(captured.calls) != len(blocks):
            captured.hidden = None  # a block was skipped or called twice: nothing safe to replay


def _run_blocks(blocks: Sequence[nn.Module], hidden: torch.Tensor,
                calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]) -> torch.Tensor:
    for block, (args, kwargs) in zip(blocks, calls):
        out = block(hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    return hidden


class UpperForward:
    """Float logits at flat positions ``read`` (row * width + column), computed from block ``first`` upward."""

    def __init__(self, model: nn.Module, spec: ModelSpec, first: int, captured: _BlockInput, read: torch.Tensor) -> None:
        self.blocks = list(get_module(model, spec.layers_path))[first:]
        self.norm = get_module(model, spec.final_norm_path)
        self.head = get_module(model, spec.lm_head_path)
        self.captured = captured
        self.read = read

    @classmethod
    def prepare(
        cls, model: nn.Module, spec: ModelSpec, first: int, read: torch.Tensor, **model_inputs: Any
    ) -> "UpperForward | None":
        """Record block ``first``'s input in one full pass; ``None`` if the shortcut does not reproduce it."""
        with _recording_block_input(model, spec, first) as captured, torch.no_grad():
            reference, _ = forward_reading(model, read, use_cache=False, **model_inputs)
        if not captured.complete:
            return None
        return _agreeing(cls(model, spec, first, captured, read), reference)

    def __call__(self) -> torch.Tensor:
        return self.head(self.head_input()).float()

    def head_input(self) -> torch.Tensor:
        """The final-normed hidden states at the positions read: what the LM head is applied to."""
        hidden = self.run_blocks(len(self.blocks))
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.read)
        return self.norm(picked)

    def run_blocks(self, count: int) -> torch.Tensor:
        """The hidden states after the first ``count`` of the rerun blocks (for a loop that reads only inside them)."""
        return _run_blocks(self.blocks[:count], self.captured.hidden, self.captured.calls[:count])


def block_of(spec: ModelSpec, module_path: str) -> int | None:
    """The index of the block that contains ``module_path`` (or is it), if any."""
    for index in range(spec.num_layers):
        block = spec.block(index)
        if module_path == block or module_path.startswith(block + "."):
            return index
    return None


def last_columns_logits(
    model: nn.Module, spec: ModelSpec, first: int, sequences: Sequence[Sequence[int]], pad_id: int, keep: int
) -> Callable[[], torch.Tensor]:
    """A function giving the float logits of the last ``keep`` columns of a left-padded batch, (rows, keep, vocab).

    Reruns only blocks ``first``.. on each call when the shortcut reproduces
    the model (:class:`UpperForward`); full forward passes otherwise.
    """
    inputs = build_inputs([[i] for i in range(len(sequences))], sequences, pad_id, torch.float32)
    device = next(model.parameters()).device
    rows, width = inputs.input_ids.shape
    columns = torch.arange(width - keep, width)
    flat = (torch.arange(rows)[:, None] * width + columns[None]).reshape(-1).to(device)
    model_inputs = {"input_ids": inputs.input_ids.to(device), "attention_mask": inputs.attention_mask.to(device),
                    "position_ids": inputs.position_ids.to(device)}
    upper = UpperForward.prepare(model, spec, first, flat, **model_inputs)
    if upper is not None:
        return lambda: upper().reshape(rows, keep, -1)
    return lambda: logits_at(model, inputs, flat).reshape(rows, keep, -1)


class SuffixForward:
    """Float logits at flat positions ``read``, recomputing only the columns from ``split`` on.

    When a loop changes the model only at column ``split`` or later (v*'s delta
    sits at the subject's last token), the columns before it are the same at
    every step: their keys and values are computed once, and each step feeds
    the model just the remaining columns with those as its cache. In a zsRE
    prompt the subject ends close to the question mark, so this is a small
    share of each row.
    """

    def __init__(self, model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], inputs: dict[str, torch.Tensor],
                 read: torch.Tensor) -> None:
        self.model = model
        self.kv = kv
        self.inputs = inputs
        self.read = read

    @classmethod
    def prepare(
        cls, model: nn.Module, spec: ModelSpec, read: torch.Tensor, split: int, input_ids: torch.Tensor,
        attention_mask: torch.Tensor, first_block: int | None = None,
    ) -> "SuffixForward | None":
        """Cache columns ``..split``; ``None`` if the model cannot take a cache or the result differs.

        With ``first_block`` (the lowest block the loop changes) the remaining
        columns' pass through the blocks below it is also done once: each step
        runs only blocks ``first_block..`` on them (:class:`_SuffixFromBlock`),
        if that reproduces the full pass; otherwise every block, as without it.
        """
        rows, width = input_ids.shape
        if split <= 0 or split >= width or not takes_cache(model) or bool((read % width < split).any()):
            return None
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # restart after left padding
        with torch.no_grad():
            reference, _ = forward_reading(model, read, input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=positions, use_cache=False)
            prefix = model(input_ids=input_ids[:, :split], attention_mask=attention_mask[:, :split],
                           position_ids=positions[:, :split], use_cache=True)
        kv = cache_tensors(output_cache(prefix), spec.num_layers, split)
        if kv is None:
            return None
        inputs = {"input_ids": input_ids[:, split:], "attention_mask": attention_mask,
                  "position_ids": positions[:, split:]}
        suffix_read = (read // width) * (width - split) + (read % width - split)
        suffix = cls(model, [(k.detach(), v.detach()) for k, v in kv], inputs, suffix_read)
        if first_block is not None and first_block > 0:
            upper = _SuffixFromBlock.prepare(suffix, spec, first_block)
            if upper is not None and _agreeing(upper, reference) is not None:
                return upper
        return _agreeing(suffix, reference)

    def __call__(self) -> torch.Tensor:
        cache = build_cache(self.model, self.kv)
        logits, _ = forward_reading(self.model, self.read, use_cache=True, **self.inputs,
                                    **{cache_keyword(self.model): cache})
        return logits


class _SuffixFromBlock:
    """A :class:`SuffixForward` step that also skips the blocks below ``first``.

    Below the lowest block a loop changes, the suffix columns' hidden states
    are the same at every step, so they are recorded once (the input of block
    ``first`` in one cached pass, with everything the model hands its blocks)
    and each step runs blocks ``first..``, the final norm and the LM head at the
    positions read. Each step gets a fresh copy of the prefix cache: blocks
    extend it in place.
    """

    def __init__(self, suffix: SuffixForward, blocks: list[nn.Module], norm: nn.Module, head: nn.Module,
                 captured: _BlockInput, cache_place: int | str) -> None:
        self.suffix = suffix
        self.blocks = blocks
        self.norm = norm
        self.head = head
        self.captured = captured
        self.cache_place = cache_place

    @classmethod
    def prepare(cls, suffix: SuffixForward, spec: ModelSpec, first: int) -> "_SuffixFromBlock | None":
        model = suffix.model
        cache = build_cache(model, suffix.kv)
        with _recording_block_input(model, spec, first) as captured, torch.no_grad():
            model(**suffix.inputs, use_cache=True, **{cache_keyword(model): cache})
        if not captured.complete:
            return None
        # where the blocks get the cache: a keyword (Llama) or a positional argument (GPT-2), the same in every block
        places = {_cache_places(args, kwargs, cache) for args, kwargs in captured.calls}
        if len(places) != 1 or len(next(iter(places))) != 1:
            return None  # no single cache argument to refresh per step
        return cls(suffix, list(get_module(model, spec.layers_path))[first:], get_module(model, spec.final_norm_path),
                   get_module(model, spec.lm_head_path), captured, next(iter(places))[0])

    def __call__(self) -> torch.Tensor:
        cache = build_cache(self.suffix.model, self.suffix.kv)
        calls = [_with_cache(args, kwargs, self.cache_place, cache) for args, kwargs in self.captured.calls]
        hidden = _run_blocks(self.blocks, self.captured.hidden, calls)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.suffix.read)
        return self.head(self.norm(picked)).float()


def _cache_places(args: tuple[Any, ...], kwargs: dict[str, Any], cache: Any) -> tuple[int | str, ...]:
    """Where ``cache`` is among a block's arguments: positions, then keywords."""
    return tuple([i for i, value in enumerate(args) if value is cache]
                 + [key for key, value in kwargs.items() if value is cache])


def _with_cache(args: tuple[Any, ...], kwargs: dict[str, Any], place: int | str,
                cache: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block's recorded arguments with a fresh cache at ``place``."""
    if isinstance(place, int):
        return args[:place] + (cache,) + args[place + 1:], kwargs
    return args, {**kwargs, place: cache}


def _agreeing(shortcut: Any, reference: torch.Tensor) -> Any:
    """``shortcut`` when its logits match the full forward pass (else None: the caller falls back to full passes)."""
    with torch.no_grad():
        logits = shortcut()
    if logits.shape != reference.shape or not torch.allclose(logits, reference, rtol=1e-4, atol=1e-4):
        return None
    return shortcut
