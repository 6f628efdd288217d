"""Checkpoints inside a sequential chunk, so that a long chunk survives the end of its process.

A chunk of the sequential protocol is the unit the runner writes: its records
appear when its last edit is scored. At T=1000 one chunk is hours of editing
(WISE on this machine, or any method on a 7B model), and a crash, a killed job
or a session's time limit used to throw all of it away. Every few minutes of
editing the runner now writes the chunk's state to ``<run>/checkpoints/chunk-<c>``:

* the model as the chain of edits has left it: the current values of every
  weight the chain touched (weight-editing methods), or every adapter it built
  as :func:`lmedit.adapters.save_adapter` writes it (GRACE, DEFER, WISE, ...);
* the method's per-model session state (:func:`lmedit.locate.core.session_state`:
  AlphaEdit's keys of earlier edits, UltraEdit's running statistics, the context
  templates of the unedited model) through codecs the methods register, and the
  fingerprint the statistics service took of the unedited weights;
* the random generators' state and what the chunk has recorded so far.

A rerun loads it into the unedited model, continues with the next edit and gives
the records an uninterrupted run gives (tests check this per method, bit for bit).
Loading returns handles that undo it like any other edits, so the chunk still
ends on the original model. A chain this module cannot write (a method with
state it has no codec for: LoRA's peft session, a probe router) is simply not
checkpointed; the chunk then restarts from its first edit, as before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from lmedit import model_state
from lmedit.adapters import AdapterEditHandle, LoadedAdapterHandle, load_adapter_edit, save_adapter
from lmedit.handles import EditHandle, WeightSnapshotHandle
from lmedit.registry import with_hparam_defaults

LOG = logging.getLogger(__name__)
DEFAULT_CHECKPOINT_MINUTES = 15.0  # a sequential chunk's state is written this often while it edits (0: never)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_FORMAT = "lmedit-chunk-checkpoint"
CHECKPOINT_VERSION = 1
_PROGRESS = "progress.json"  # written last: a folder without it is not a checkpoint
_SESSION_OWNER = "locate"  # lmedit.locate.core.session_state
_FINGERPRINT_OWNER = "stats-fingerprint"  # lmedit.locate.stats.model_fingerprint
_CAPTURES_OWNER = "pre-edit captures"  # lmedit.evaluation.captures: scores of the unedited model, not edit state


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says why and what to do."""


# --------------------------------------------------------------------------- session-state codecs


@dataclass(frozen=True)
class SessionCodec:
    """How one entry of a model's session state is written and read back (tensors + JSON, no pickle)."""

    dump: Callable[[Any], tuple[dict[str, torch.Tensor], Any]]
    load: Callable[[dict[str, torch.Tensor], Any], Any]
    cache: bool = False  # a cache recomputed on demand: left out of the checkpoint


_CODECS: dict[str, SessionCodec] = {}


def register_session_codec(name: str, dump: Callable[[Any], tuple[dict[str, torch.Tensor], Any]] | None = None,
                           load: Callable[[dict[str, torch.Tensor], Any], Any] | None = None, *,
                           cache: bool = False) -> None:
    """Let checkpoints carry the session-state entry ``name`` (a string key, or the first item of a tuple key).

    ``cache=True`` declares an entry that is recomputed when missing and is never written.
    """
    if not cache and (dump is None or load is None):
        raise ValueError(f"session codec {name!r} needs dump and load (or cache=True)")
    _CODECS[name] = SessionCodec(dump or (lambda v: ({}, None)), load or (lambda t, m: None), cache)


def _codec_name(key: Any) -> str:
    return key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else str(key)


def _key_to_json(key: Any) -> Any:
    if isinstance(key, tuple):
        return {"tuple": [_key_to_json(k) for k in key]}
    return key


def _key_from_json(value: Any) -> Any:
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_key_from_json(v) for v in value["tuple"])
    if isinstance(value, list):
        return tuple(_key_from_json(v) for v in value)
    return value


# --------------------------------------------------------------------------- what can be written


def unsupported_reason(model: torch.nn.Module, handles: Sequence[EditHandle]) -> str | None:
    """Why this chain cannot be checkpointed, or None when it can."""
    handles = _edits(handles)
    if not handles:
        return None
    weight = all(isinstance(h, WeightSnapshotHandle) for h in handles)
    adapter = all(isinstance(h, (AdapterEditHandle, LoadedAdapterHandle)) for h in handles)
    if not (weight or adapter):
        kinds = sorted({type(h).__name__ for h in handles})
        return f"its edits ({', '.join(kinds)}) are neither weight snapshots nor adapters"
    for owner in model_state.owners(model):
        if owner not in (_SESSION_OWNER, _FINGERPRINT_OWNER, _CAPTURES_OWNER):
            return f"the model carries {owner!r} state that checkpoints cannot write"
    for key in model_state.slot(model, _SESSION_OWNER) or {}:
        if _codec_name(key) not in _CODECS:
            return f"no checkpoint codec is registered for the session state {_codec_name(key)!r}"
    return None


def _edits(handles: Sequence[EditHandle]) -> list[EditHandle]:
    """The chain without the session-state handle of a checkpoint it continues (written anew from the session)."""
    return [h for h in handles if not isinstance(h, _SessionStateHandle)]


def _touched_weights(handles: Sequence[EditHandle]) -> list[str]:
    names: dict[str, None] = {}
    for handle in handles:
        assert isinstance(handle, WeightSnapshotHandle)
        names.update(dict.fromkeys(handle.param_names))
        names.update(dict.fromkeys(handle.released_names))
    return list(names)


def _adapters(handles: Sequence[EditHandle]) -> list[Any]:
    seen: dict[int, Any] = {}
    for handle in handles:
        adapter = handle.adapter  # type: ignore[attr-defined]
        seen.setdefault(id(adapter), adapter)
    return list(seen.values())


# --------------------------------------------------------------------------- writing


def write_chain(model: torch.nn.Module, handles: Sequence[EditHandle], method: str, folder: Path) -> None:
    """Write the model state the chain ``handles`` produced, and the session state, into ``folder`` (new)."""
    folder.mkdir(parents=True)
    handles = _edits(handles)
    meta: dict[str, Any] = {"method": method}
    if handles and isinstance(handles[0], WeightSnapshotHandle):
        params = dict(model.named_parameters())
        names = _touched_weights(handles)
        save_file({n: params[n].detach().contiguous().clone() for n in names}, str(folder / "weights.safetensors"))
        meta["weights"] = names
    elif handles:
        adapters = _adapters(handles)
        for i, adapter in enumerate(adapters):
            save_adapter(adapter, folder / f"adapter-{i}", method)
        meta["adapters"] = len(adapters)
    tensors, entries = {}, []
    for n, (key, value) in enumerate((model_state.slot(model, _SESSION_OWNER) or {}).items()):
        codec = _CODECS[_codec_name(key)]
        if codec.cache:
            continue
        parts, data = codec.dump(value)
        tensors.update({f"{n}/{name}": t.detach().contiguous().cpu().clone() for name, t in parts.items()})
        entries.append({"slot": n, "key": _key_to_json(key), "data": data})
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = state
    save_file(tensors, str(folder / "state.safetensors"))
    meta["session"] = entries
    meta["fingerprint"] = model_state.slot(model, _FINGERPRINT_OWNER)
    (folder / "chain.json").write_text(json.dumps(meta, indent=1))


# --------------------------------------------------------------------------- reading


class _SessionStateHandle(EditHandle):
    """Puts back the session-state entries a checkpoint replaced, when the chunk's edits are undone."""

    touches_model = False

    def __init__(self, model: torch.nn.Module, before: dict[Any, Any]) -> None:
        super().__init__("checkpoint")
        self.model = model
        self._before = before

    def _restore(self) -> None:
        state = model_state.slot(self.model, _SESSION_OWNER, dict)
        for key, value in self._before.items():
            if value is _ABSENT:
                state.pop(key, None)
            else:
                state[key] = value


_ABSENT = object()


def read_chain(model: torch.nn.Module, folder: Path) -> list[EditHandle]:
    """Bring the unedited ``model`` to the state written in ``folder``; the handles undo it, newest first."""
    meta = json.loads((folder / "chain.json").read_text())
    _check_fingerprint(model, meta.get("fingerprint"))
    handles: list[EditHandle] = []
    if "weights" in meta:
        saved = load_file(str(folder / "weights.safetensors"))
        handle = WeightSnapshotHandle(meta["method"], model, meta["weights"])
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in meta["weights"]:
                params[name].copy_(saved[name].to(params[name].device, params[name].dtype))
        handles.append(handle)
    for i in range(meta.get("adapters", 0)):
        path = folder / f"adapter-{i}"
        handles.append(load_adapter_edit(model, path, json.loads((path / "edit.json").read_text())))
    tensors = load_file(str(folder / "state.safetensors"))
    state = model_state.slot(model, _SESSION_OWNER, dict)
    before: dict[Any, Any] = {}
    for entry in meta["session"]:
        key = _key_from_json(entry["key"])
        prefix = f"{entry['slot']}/"
        parts = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        before[key] = state.get(key, _ABSENT)
        state[key] = _CODECS[_codec_name(key)].load(parts, entry["data"])
    handles.append(_SessionStateHandle(model, before))
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = [tensors[f"rng/cuda{i}"] for i in range(len(tensors)) if f"rng/cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return handles


def _check_fingerprint(model: torch.nn.Module, saved: str | None) -> None:
    """The statistics service must keep mapping this model to the statistics of its *unedited* weights."""
    if saved is None:
        return
    current = model_state.slot(model, _FINGERPRINT_OWNER)
    if current is None:
        model_state.put(model, _FINGERPRINT_OWNER, saved)  # hashing now would hash the checkpoint's edited weights
    elif current != saved:
        raise CheckpointError("the checkpoint was written for a model with other weights; delete the run folder's "
                              f"{CHECKPOINTS_DIR}/ folder to start its chunk again")


# --------------------------------------------------------------------------- the chunk's checkpoints


@dataclass
class ChunkProgress:
    """What a chunk has done so far, beside the model state: enough to continue it as if never stopped."""

    steps_done: int = 0
    edit_seconds: float = 0.0
    eval_seconds: float = 0.0
    step_info: dict[int, dict[str, Any]] = field(default_factory=dict)
    step_seconds: dict[int, float] = field(default_factory=dict)
    post_each: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "edit_seconds": self.edit_seconds, "eval_seconds": self.eval_seconds,
                "step_info": {str(k): v for k, v in self.step_info.items()},
                "step_seconds": {str(k): v for k, v in self.step_seconds.items()},
                "post_each": {str(k): v for k, v in self.post_each.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChunkProgress":
        return cls(int(data["steps_done"]), float(data["edit_seconds"]), float(data["eval_seconds"]),
                   {int(k): v for k, v in data["step_info"].items()},
                   {int(k): float(v) for k, v in data["step_seconds"].items()},
                   {int(k): v for k, v in data["post_each"].items()})


@dataclass
class ChunkCheckpoints:
    """Writes a chunk's checkpoint every ``minutes`` of editing into ``<run>/checkpoints`` and reads it back.

    ``identity`` ties a checkpoint to its run (method, hyperparameters, data, seed): one written by another run
    is never loaded. Chunks with fewer than ``min_steps`` steps are not worth a checkpoint.
    """

    folder: Path
    identity: dict[str, Any]
    minutes: float | None = None  # None: DEFAULT_CHECKPOINT_MINUTES
    min_steps: int = 2
    _last: float = field(default_factory=time.perf_counter, init=False)
    _warned: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.identity = json.loads(json.dumps(self.identity))  # compared with the JSON a checkpoint stores
        if self.minutes is None:
            self.minutes = DEFAULT_CHECKPOINT_MINUTES

    @classmethod
    def discard_written(cls, folder: Path, chunk_index: int) -> None:
        """The chunk's records are written: its checkpoint in ``folder`` has served (any run's)."""
        cls(folder, {}).discard(chunk_index)

    def path(self, chunk_index: int) -> Path:
        return self.folder / f"chunk-{chunk_index}"

    def wanted(self, n_steps: int) -> bool:
        return self.minutes > 0 and n_steps >= self.min_steps

    def due(self, steps_done: int, n_steps: int) -> bool:
        """Time for a checkpoint: enough editing since the last one, and the chunk not about to end anyway."""
        return (self.wanted(n_steps) and steps_done < n_steps
                and time.perf_counter() - self._last >= 60.0 * self.minutes)

    def start(self) -> None:
        """The chunk starts (or resumes): the clock to the next checkpoint starts now."""
        self._last = time.perf_counter()

    def save(self, model: torch.nn.Module, handles: Sequence[EditHandle], chunk_index: int, steps: Sequence[Any],
             progress: ChunkProgress) -> bool:
        """Write the chunk's checkpoint, replacing the previous one only once the new one is complete."""
        reason = unsupported_reason(model, handles)
        if reason is not None:
            if not self._warned:
                LOG.warning("%s chunks are not checkpointed: %s. A stopped chunk restarts from its first edit.",
                            self.identity.get("method"), reason)
                self._warned = True
            return False
        started = time.perf_counter()
        final = self.path(chunk_index)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_chain(model, handles, str(self.identity.get("method")), partial)
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "identity": self.identity,
                   "chunk": chunk_index, "steps": [list(s) for s in steps], "progress": progress.to_json()}
        (partial / _PROGRESS).write_text(json.dumps(payload))
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        self._last = time.perf_counter()
        LOG.info("checkpoint of chunk %d after %d steps (%.1f s)", chunk_index, progress.steps_done,
                 self._last - started)
        return True

    def load(self, model: torch.nn.Module, chunk_index: int, steps: Sequence[Any]
             ) -> tuple[list[EditHandle], ChunkProgress] | None:
        """Continue the chunk from its checkpoint: the handles that undo it and the progress; None: start afresh."""
        final = self.path(chunk_index)
        old, partial = final.with_name(final.name + ".old"), final.with_name(final.name + ".partial")
        if not (final / _PROGRESS).is_file() and (old / _PROGRESS).is_file():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)  # stopped between the two renames: the previous checkpoint is whole
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        if not (final / _PROGRESS).is_file():
            return None
        payload = json.loads((final / _PROGRESS).read_text())
        if (payload.get("format") != CHECKPOINT_FORMAT
                or with_hparam_defaults(payload.get("identity") or {}) != self.identity
                or payload.get("steps") != [list(s) for s in steps]):
            LOG.warning("%s belongs to another run or plan; chunk %d starts from its first edit", final, chunk_index)
            return None
        handles = read_chain(model, final)
        progress = ChunkProgress.from_json(payload["progress"])
        LOG.info("chunk %d resumes after step %d of %d from %s", chunk_index, progress.steps_done, len(steps), final)
        return handles, progress

    def discard(self, chunk_index: int) -> None:
        """The chunk's records are written: its checkpoint has served."""
        shutil.rmtree(self.path(chunk_index), ignore_errors=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass
