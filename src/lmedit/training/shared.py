"""Pieces both meta-learned methods use: teacher-forced sequences, model signatures, a checkpoint cache."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lmedit.forward import tokenize_pair
from lmedit.training.checkpoint import WEIGHTS_FILE, CheckpointError, load_checkpoint


@dataclass(frozen=True)
class ScoredSequence:
    """Input ids (the answer's last token dropped: nothing reads a prediction after it) and the answer.

    ``columns[i]`` is the position (from the sequence start) whose prediction
    is ``targets[i]``: EasyEdit's answer span of ``prompt + " " + answer``.
    """

    ids: tuple[int, ...]
    columns: tuple[int, ...]
    targets: tuple[int, ...]


def scored_sequence(tok: Any, prompt: str, answer: str) -> ScoredSequence:
    pair = tokenize_pair(tok, prompt, answer)
    targets = pair.target_ids
    columns = tuple(range(pair.prompt_len - 1, len(pair.ids) - 1))
    return ScoredSequence(pair.ids[:-1], columns, targets)


def split_rows(logits: torch.Tensor, sequences: Sequence[ScoredSequence]) -> list[torch.Tensor]:
    """Cut the (all columns, vocab) logits of a SequenceLogits call back into one block per sequence."""
    return list(torch.split(logits, [len(s.columns) for s in sequences]))


def target_tensor(sequence: ScoredSequence, device: torch.device) -> torch.Tensor:
    return torch.tensor(sequence.targets, dtype=torch.long, device=device)


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: architecture class, sizes, and a digest of the input embeddings.

    The embeddings are not edited by any method here, so the digest tells a
    different model of the same architecture apart without hashing all weights.
    """
    config = getattr(model, "config", None)
    embed = model.get_input_embeddings().weight.detach()
    rows = embed[:: max(embed.shape[0] // 64, 1)].float().cpu()
    digest = hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest()
    return {
        "architecture": type(model).__name__,
        "num_layers": getattr(config, "num_hidden_layers", getattr(config, "n_layer", None)),
        "hidden_size": getattr(config, "hidden_size", getattr(config, "n_embd", None)),
        "vocab_size": int(embed.shape[0]),
        "embedding_sha256": digest[:16],
        # a few values of the same rows, so that the model loaded in another dtype is still recognised
        "embedding_sample": [float(v) for v in rows[:, :4].reshape(-1)],
    }


def _same_embedding(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Exact digest match, or (for a checkpoint that has them) the sampled values equal to half-precision rounding."""
    if saved.get("embedding_sha256") == current["embedding_sha256"]:
        return True
    sample = saved.get("embedding_sample")
    if not isinstance(sample, list) or len(sample) != len(current["embedding_sample"]):
        return False
    ours, theirs = torch.tensor(current["embedding_sample"]), torch.tensor(sample, dtype=torch.float32)
    return bool(torch.allclose(ours, theirs, rtol=1e-2, atol=1e-3 * float(theirs.abs().max().clamp(min=1e-6))))


def check_signature(model: torch.nn.Module, saved: dict[str, Any], folder: Path, train_command: str) -> None:
    current = model_signature(model)
    compared = {k: v for k, v in current.items() if k not in ("embedding_sha256", "embedding_sample")}
    different = {k: (saved.get(k), v) for k, v in compared.items() if saved.get(k) != v}
    if not _same_embedding(saved, current):
        different["embedding_sha256"] = (saved.get("embedding_sha256"), current["embedding_sha256"])
    if different:
        details = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in different.items())
        raise CheckpointError(
            f"the checkpoint at {folder} was trained for another model ({details}); "
            f"train one for this model with `{train_command}`"
        )


class CheckpointCache:
    """Networks rebuilt from checkpoints, reused while the checkpoint file is unchanged.

    Keyed by the folder and the weights file's size and modification time, so
    retraining into the same folder is picked up. The cached objects are the
    trained networks only, never the model being edited.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, folder: Path, method: str, train_command: str,
            build: Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]) -> Any:
        weights = folder / WEIGHTS_FILE
        stat = weights.stat() if weights.is_file() else None
        key = (str(folder.resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        tensors, config = load_checkpoint(folder, method, train_command)
        value = build(tensors, config)
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()
