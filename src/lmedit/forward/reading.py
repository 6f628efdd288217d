"""Reading logits out of a forward pass at chosen positions only.

The LM head is a large share of a small model's compute, so every pass in
the framework (scoring, generation, the methods' optimisation loops) asks
for the positions it reads and gets float logits at just those.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lmedit.compat import cache_keyword
from lmedit.forward.batching import BatchInputs, build_inputs


def logits_at(model: torch.nn.Module, inputs: BatchInputs, flat_positions: torch.Tensor) -> torch.Tensor:
    """Float logits at the given flattened (row * width + column) positions only.

    Inputs that follow a shared prefix get its keys and values, one copy per row, as their cache.
    """
    device = next(model.parameters()).device
    cached: dict[str, Any] = {"use_cache": False}
    if inputs.prefix is not None:
        cached = {"use_cache": True, cache_keyword(model): inputs.prefix.cache_for(model, inputs.input_ids.shape[0])}
    logits, _ = forward_reading(
        model, flat_positions, input_ids=inputs.input_ids.to(device),
        attention_mask=inputs.attention_mask.to(device), position_ids=inputs.position_ids.to(device), **cached,
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
