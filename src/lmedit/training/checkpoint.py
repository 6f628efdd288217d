"""Checkpoints of trained editor networks: safetensors for tensors, JSON for everything else.

Nothing is pickled. Optimizer state (Adam's moments and step counts) and the
random-number state are flattened into named tensors, so a resumed run
continues exactly where the interrupted one stopped.

Every file is replaced atomically (temp file, fsync, rename). The deliverable
checkpoint is two files, so ``config.json`` (written second) records the
sha256 of ``model.safetensors``: a kill between the two, or a changed weights
file, is caught on load instead of pairing weights with the wrong description.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from lmedit.safe_files import atomic_write_bytes, atomic_write_text, file_sha256

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RESUME_DIR = "resume"
STATE_WEIGHTS = "state.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT = "lmedit-trained-editor"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or made for something else; the message says what to do."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a torn file would make a resume fail or lie)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` (moved to the CPU), as bytes."""
    return save({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, metadata=metadata)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; return the sha256 of its bytes."""
    data = tensor_bytes(tensors, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """The deliverable checkpoint: ``model.safetensors`` + ``config.json`` (format, method, network, training).

    ``config.json`` is written last and names the weights' sha256, so the pair is checked on load.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = write_tensors(folder / WEIGHTS_FILE, tensors)
    write_json(folder / CONFIG_FILE, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **config,
                                      "weights_sha256": digest})
    return folder


def load_checkpoint(folder: str | Path, method: str, train_command: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` for ``method``; explain how to make one when absent."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"no trained {method} checkpoint at {folder} ({CONFIG_FILE} and {WEIGHTS_FILE} are needed). "
            f"Train one with `{train_command}`, or point `archive` at an existing checkpoint folder."
        )
    config = json.loads(config_path.read_text())
    if config.get("format") != CHECKPOINT_FORMAT or config.get("method") != method:
        raise CheckpointError(
            f"{folder} holds a {config.get('method')!r} checkpoint of format {config.get('format')!r}, "
            f"not a {method} checkpoint; train one with `{train_command}`"
        )
    recorded = config.get("weights_sha256")
    if recorded is not None and recorded != file_sha256(weights_path):
        raise CheckpointError(
            f"{weights_path} does not match {config_path} (an interrupted save, or a changed file); "
            f"run `{train_command}` again to finish the checkpoint, or restore both files"
        )
    return load_file(str(weights_path)), config



# --------------------------------------------------------------------------- optimizer state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into named tensors and a JSON-ready remainder."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
