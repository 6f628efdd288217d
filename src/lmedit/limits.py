"""Memory limits checked before work starts, so a run too big for the machine is refused, not killed.

A run that needs more memory than the machine has does not fail cleanly: on
Linux the kernel's out-of-memory killer ends the process (no message, no
summary), or the machine swaps for hours. Two things grow with the user's
settings and are known before the first edit:

* the state a lifelong method keeps per edit (WISE's undo copies and
  shards, DEFER's undo copies, GRACE's codebook), times the edits of the
  longest chunk (``--T``);
* one evaluation forward pass: ``max_batch_tokens`` tokens of activations
  under teacher forcing, and under generation a batch of prompts whose first
  step computes logits over the vocabulary at every prompt position.

Both are estimated from the model's shapes and compared with the memory free
on the device the model sits on; a run that would not fit is refused with the
numbers and the option to change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

LOG = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2
_HEADROOM = 0.9
"""Share of the free memory a run may plan to use (the rest: the allocator's slack, other buffers)."""


def size(nbytes: float) -> str:
    """Bytes as a reader wants them: GiB from one GiB up, then MiB, then KiB."""
    if nbytes >= GiB:
        return f"{nbytes / GiB:.1f} GiB"
    return f"{nbytes / MiB:.1f} MiB" if nbytes >= MiB else f"{nbytes / 1024:.1f} KiB"


class MemoryLimitError(ValueError):
    """A run would need more memory than the device has free; the message says how much and what to change."""


def model_device(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for new tensors on ``device``, or None when it cannot be told (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    return _linux_available()


def _linux_available() -> int | None:
    """MemAvailable from /proc/meminfo: what the kernel can hand out without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def activation_bytes_per_token(model: Any) -> int:
    """Bytes one token costs in a no-grad forward pass, hidden states and MLP activations together.

    48 float32 values per unit of hidden size: measured on SmolLM2-135M (hidden
    576, 30 layers) as about 40 between 2,048 and 8,192 tokens per pass, with
    a fifth added as margin (docs/robustness.md, "Limits").
    """
    hidden = int(getattr(_text_config(model), "hidden_size", 0) or getattr(_text_config(model), "n_embd", 0) or 0)
    return 48 * hidden * 4


def logits_bytes_per_token(model: Any) -> int:
    """One row of float32 logits over the vocabulary."""
    return int(getattr(_text_config(model), "vocab_size", 0) or 0) * 4


def teacher_pass_bytes(model: Any, max_batch_tokens: int) -> int:
    """Peak bytes of one teacher-forced pass: the LM head runs only where answers are read, so tokens x activations."""
    return int(max_batch_tokens) * activation_bytes_per_token(model)


def generation_batch_bytes(model: Any, rows: int, longest_tokens: int) -> int:
    """Peak bytes of one greedy-generation batch: the first step computes logits at every prompt position."""
    return int(rows) * int(longest_tokens) * (logits_bytes_per_token(model) + activation_bytes_per_token(model))


def check_eval_memory(model: Any, config: Any, prompts: int, longest_tokens: int) -> None:
    """Refuse evaluation settings whose single forward pass would not fit the free memory.

    ``config`` is an :class:`~lmedit.evaluation.EvalConfig`; ``prompts`` the
    most prompts one generation batch could hold and ``longest_tokens`` the
    longest prompt with its answer. ``--eval-batch-size`` alone cannot exceed
    memory under teacher forcing (``--eval-max-tokens`` caps every pass), but
    it sets the rows of a generation batch.
    """
    free, where = room_for_work(model)
    if free is None:
        return
    budget = _HEADROOM * free
    needed = teacher_pass_bytes(model, config.max_batch_tokens)
    if needed > budget:
        fits = max(int(budget // activation_bytes_per_token(model)), 1)
        raise MemoryLimitError(
            f"--eval-max-tokens {config.max_batch_tokens:,}: one evaluation pass would need about "
            f"{size(needed)}, more than the {size(free)} {where}; use --eval-max-tokens "
            f"{min(fits, 2048):,} or less (the default, 2048, needs about {size(teacher_pass_bytes(model, 2048))})")
    if not config.generate:
        return
    rows = min(config.batch_size, max(prompts, 1))
    needed = generation_batch_bytes(model, rows, longest_tokens)
    if needed > budget:
        fits = max(int(budget // max(generation_batch_bytes(model, 1, longest_tokens), 1)), 1)
        raise MemoryLimitError(
            f"--eval-batch-size {config.batch_size:,} with generation: a batch of {rows:,} prompts of up to "
            f"{longest_tokens:,} tokens would need about {size(needed)} (logits at every prompt position), "
            f"more than the {size(free)} {where}; use --eval-batch-size {fits:,} or less")


_KEPT_OVERHEAD = 1.5
"""Resident memory per byte of kept tensors: WISE's 7.7 MiB of tensors per edit on SmolLM2 grew the process by
11.8 MiB per edit (T=10 against T=60, docs/robustness.md): many weight-sized allocations fragment the heap."""


def check_state_memory(method: str, kept: int, edits: int, model: Any, *, what: str, fix: str) -> None:
    """Refuse a chunk of ``edits`` sequential edits whose kept tensors (``kept`` bytes) would not fit the free memory."""
    needed = int(kept * _KEPT_OVERHEAD)
    if needed <= 0 or edits < 1:
        return
    free, where = room_for_work(model)
    if free is None:
        return
    if needed <= _HEADROOM * free:
        LOG.debug("%s keeps about %.1f MiB for %d edits (%.1f GiB %s)", method, needed / MiB, edits, free / GiB, where)
        return
    fits = int(_HEADROOM * free // (needed / edits))
    raise MemoryLimitError(
        f"{method} keeps {what}: {edits:,} edits in one chunk would need about {size(needed)}, more than the "
        f"{size(free)} {where}; edit at most about {fits:,} in one chunk (lower --T) or {fix}")


def check_eval_memory_for(model: Any, tok: Any, config: Any, requests: Sequence[Any]) -> None:
    """:func:`check_eval_memory` for these requests: their probe count and their longest text, tokenised."""
    from lmedit.forward.tokens import request_texts

    texts = [text for request in requests for _what, text in request_texts(request)]
    if not texts:
        return
    longest = len(tok(max(texts, key=len)).input_ids) + 16  # the answer may be generated a little longer
    check_eval_memory(model, config, len(texts), longest)


# --------------------------------------------------------------------------- a stated memory budget (--max-memory)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024**4}


def parse_memory(text: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"1.5 TiB"`` or a number of bytes, as bytes; anything else is refused."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise MemoryLimitError(f"--max-memory {text!r} is not a size; use e.g. 8GiB, 500MiB or 24GB")
    return int(float(match.group(1)) * _UNITS[unit])


def weights_bytes_on_disk(folder: str | Path, dtype: torch.dtype) -> int | None:
    """The weights of a model folder once loaded in ``dtype``, from its safetensors files (None: cannot tell)."""
    import json
    import struct

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for file in files:
        with file.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count * element
    return total


def statistics_batch_tokens(model: Any, modules_in: Sequence[int], budget: int, requested: int, sample_length: int,
                            weights: int) -> int:
    """The largest ``batch_tokens`` (at most ``requested``) whose statistics pass fits ``budget`` bytes.

    The pass holds the weights, one float64 ``d x d`` sum (and mean) per module,
    and one batch of activations; the sums are fixed, so only the batch can
    shrink, down to one sample. Below that the budget is refused with the numbers.
    """
    sums = sum(8 * (d * d + d) for d in modules_in)
    per_token = activation_bytes_per_token(model)
    room = budget - weights - sums
    fits = int(room // per_token) if room > 0 else 0
    if fits < sample_length:
        raise MemoryLimitError(
            f"--max-memory {size(budget)}: the statistics pass needs the weights ({size(weights)}), the float64 sums "
            f"({size(sums)}) and at least one sample of {sample_length:,} tokens ({size(sample_length * per_token)}), "
            f"about {size(weights + sums + sample_length * per_token)} in all; raise --max-memory, compute fewer "
            "layers per call, or use a shorter --sample-length")
    return min(requested, fits)


def budget_before_loading(max_memory: str, model: str, dtype: str) -> int:
    """``--max-memory`` in bytes; a model whose weights alone exceed it is refused before anything loads."""
    from lmedit.devices import dtype_of
    from lmedit.models import resolve_model_path

    budget = parse_memory(max_memory)
    weights = weights_bytes_on_disk(resolve_model_path(model), dtype_of(dtype))
    if weights is not None and weights > budget:
        raise MemoryLimitError(f"--max-memory {max_memory}: the weights of {model} in {dtype} alone take {size(weights)}; "
                               "raise --max-memory or load in a smaller --dtype (bfloat16 halves float32)")
    return budget


_BUDGET_OWNER = "memory-budget"


def set_memory_budget(model: Any, budget: int | None) -> None:
    """Hold the work on ``model`` to ``budget`` bytes (None: no budget); statistics passes shrink their batches to fit."""
    from lmedit import model_state

    if budget is None:
        model_state.drop(model, _BUDGET_OWNER)
    else:
        model_state.put(model, _BUDGET_OWNER, int(budget))


def memory_budget(model: Any) -> int | None:
    """The budget :func:`set_memory_budget` gave ``model``, if any."""
    from lmedit import model_state

    return model_state.slot(model, _BUDGET_OWNER)


def room_for_work(model: Any) -> tuple[int | None, str]:
    """Bytes left for activations and kept tensors, and how to name them in an error.

    The device's free memory; under a ``--max-memory`` budget no more than the
    budget less the weights, so evaluation and kept edits are held to it as the
    statistics passes are. None when neither can be told (nothing is refused).
    """
    free = available_memory(model_device(model))
    budget = memory_budget(model)
    if budget is None:
        return free, "free"
    left = max(budget - _weights_bytes(model), 0)
    if free is not None and free < left:
        return free, "free"
    return left, f"left under --max-memory {size(budget)} once the weights are loaded"


def _weights_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fitted_batch_tokens(model: Any, modules_in: Sequence[int], requested: int, sample_length: int) -> int:
    """``requested`` tokens per statistics pass, or fewer when the model's memory budget needs it (logged)."""
    budget = memory_budget(model)
    if budget is None:
        return requested
    fitted = statistics_batch_tokens(model, modules_in, budget, requested, sample_length, _weights_bytes(model))
    if fitted < requested:
        LOG.info("--max-memory %s: %d tokens per statistics pass instead of %d", size(budget), fitted, requested)
    return fitted
