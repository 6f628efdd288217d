"""Training and validation examples for meta-learned editors, built from edit requests.

One :class:`EditExample` is an edit (prompt → target), one in-scope query
that should follow it (the rephrasing) and one out-of-scope query with its
own answer that should not change (the locality probe). CounterFact's
EasyEdit files (``counterfact-train.json`` / ``counterfact-val.json``) have
all three for every record. zsRE's training split (``zsre_mend_train.json``)
is not available here, so the default training data is CounterFact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lmedit.requests import EditRequest


class TrainingDataError(ValueError):
    """Training data cannot be used; the message says which records and what they lack."""


@dataclass(frozen=True)
class EditExample:
    prompt: str
    target: str
    rephrase: str
    loc_prompt: str
    loc_answer: str


def examples_from_requests(requests: Sequence[EditRequest]) -> list[EditExample]:
    """Keep the requests that have a rephrasing and a locality probe; fail if none has both."""
    examples = []
    for request in requests:
        if not request.rephrase or not request.locality:
            continue
        probe = next(iter(request.locality.values()))[0]
        examples.append(EditExample(request.prompt, request.target_new, request.rephrase[0], probe.prompt, probe.answer))
    if requests and not examples:
        raise TrainingDataError(
            "none of the training records has both a rephrase prompt and a locality probe; "
            "use CounterFact's EasyEdit files (counterfact-train.json) or zsRE-style records"
        )
    return examples


def load_examples(path: str | Path, limit: int | None = None, offset: int = 0) -> list[EditExample]:
    from lmedit.data import load_requests

    return examples_from_requests(load_requests(Path(path), limit=limit, offset=offset))


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of optimizer step ``step``: a fresh permutation per epoch, a pure function of its arguments.

    Because the order never depends on earlier state, a resumed run sees
    exactly the batches an uninterrupted run would.
    """
    if n_examples < 1:
        raise TrainingDataError("there are no training examples")
    per_epoch = max(n_examples // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    start = position * batch_size
    chosen = order[start : start + batch_size]
    return chosen if len(chosen) == batch_size or n_examples < batch_size else order[:batch_size]
