"""One small training loop for meta-learned editors (MEND's and MALMEN's hypernetworks, SERAC's networks).

What it guarantees, and what EasyEdit's ``BaseTrainer`` does not (study §1.5):

* **The best checkpoint is kept.** A validation that improves the early-stopping
  metric (by more than ``min_delta``) rewrites ``model.safetensors`` +
  ``config.json``; any other validation leaves them alone. EasyEdit saves at
  every validation and finally "loads the best model" from the *last* save.
* **Early stopping works.** After ``patience`` validations without improvement
  the run stops (EasyEdit's stopper is never updated).
* **Resumable.** Every ``save_every`` steps, and when a call ends (step or time
  budget, early stop), the trainable state, the optimizer state, the step and
  the validation history go to ``resume/state.safetensors`` (one file, the state
  in its metadata, replaced atomically; ``state.json`` mirrors it for reading).
  A crash, Ctrl-C or SIGKILL loses at most ``save_every`` steps, and calling
  again continues. The batches of a step are a pure function of (seed, step),
  and each step runs under its own seeded RNG, so a resumed run gives the same
  weights as an uninterrupted one (on the same machine and thread count).
* **One writer.** The output folder is held for the whole call: a second
  ``lmedit train`` into it stops at once, naming the first one's pid.
* **Bounded.** ``max_steps`` and ``max_minutes`` (per call) bound the work;
  a progress bar shows it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
from safetensors.torch import load_file

from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.progress import progress_bar
from lmedit.safe_files import hold_folder
from lmedit.training.checkpoint import (
    CONFIG_FILE,
    RESUME_DIR,
    STATE_FILE,
    STATE_WEIGHTS,
    CheckpointError,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
    write_json,
    write_tensors,
)
from lmedit.training.data import EditExample, batch_indices

LOG = logging.getLogger(__name__)

TRAINING_FILE = "training.json"
STATE_KEY = "lmedit_resume_state"  # the safetensors metadata entry holding the loop state


@dataclass
class TrainerConfig(HyperParams):
    """How long and how carefully to train; shared by every meta-learned method."""

    max_steps: int = 400
    batch_size: int = 8
    val_every: int = 50
    val_examples: int = 64
    early_stop_metric: str = "score"
    early_stop_mode: Literal["max", "min"] = "max"
    patience: int = 4
    min_delta: float = 0.0
    save_every: int = 25
    grad_clip: float = 100.0
    max_minutes: float | None = None
    seed: int = 0

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "val_every", "val_examples", "patience", "save_every"):
            if getattr(self, name) < 1:
                raise HyperParamsError(f"{name} must be at least 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise HyperParamsError("max_minutes must be positive (or null for no time budget)")


@dataclass
class EditorTrainingParams(TrainerConfig):
    """The loop sized for an editor's networks on the embedded model: about 20 minutes here, at most."""

    train_examples: int = 4000
    max_steps: int = 200
    val_every: int = 25
    val_examples: int = 32
    patience: int = 3


class TrainingTask(Protocol):
    """What a method gives the loop: its trainable module, optimizer groups, a step and a validation."""

    method: str

    def module(self) -> torch.nn.Module:
        """Everything trained (parameters and buffers); saved in checkpoints."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Adam parameter groups, e.g. ``[{"params": [...], "lr": 1e-4}]``."""

    def checkpoint_config(self) -> dict[str, Any]:
        """JSON describing the network, written next to the weights (what an editor needs to rebuild it)."""

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the deliverable checkpoint (usually ``module().state_dict()``)."""

    def train_step(self, batch: Sequence[EditExample], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch (the loop calls backward) and metrics to log."""

    def validate(self, examples: Sequence[EditExample]) -> dict[str, float]:
        """Validation metrics; must not change the trainable state."""


@dataclass
class TrainResult:
    out_dir: Path
    status: str
    steps: int
    best_step: int | None
    best_metric: float | None
    curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


StepCallback = Callable[[int, dict[str, float]], None]


class Trainer:
    """Runs a :class:`TrainingTask` to a kept-best, resumable checkpoint in ``out_dir``."""

    def __init__(self, config: TrainerConfig, *, show_progress: bool = True) -> None:
        self.config = config
        self.show_progress = show_progress

    def fit(
        self,
        task: TrainingTask,
        train: Sequence[EditExample],
        val: Sequence[EditExample],
        out_dir: str | Path,
        *,
        identity: dict[str, Any] | None = None,
        on_step: StepCallback | None = None,
    ) -> TrainResult:
        """Train, or continue a run found in ``out_dir`` with the same ``identity`` (method, settings, data)."""
        with hold_folder(out_dir, "training folder", "wait for it or choose another --out"):
            return self._fit_held(task, train, val, Path(out_dir), identity=identity, on_step=on_step)

    def _fit_held(self, task: TrainingTask, train: Sequence[EditExample], val: Sequence[EditExample], out: Path, *,
                  identity: dict[str, Any] | None, on_step: StepCallback | None) -> TrainResult:
        cfg = self.config
        val = list(val)[: cfg.val_examples]
        identity = {"method": task.method, "trainer": _identity_config(cfg), **(identity or {})}
        module = task.module()
        optimizer = torch.optim.Adam(task.param_groups())
        state = self._resume(out, identity, module, optimizer)
        started = time.perf_counter()
        if state["status"] == "new":  # marks the folder as this run's before any checkpoint exists
            self._save_resume(out, identity, module, optimizer, 0, state, started, "running")
        result = TrainResult(out, state["status"], state["step"], state["best_step"], state["best_metric"],
                             state["curve"], state["seconds"], resumed_from=state["step"])
        if state["status"] == "stopped_early" or (state["status"] == "finished" and state["step"] >= cfg.max_steps):
            LOG.info("%s: training already finished (%s); nothing to do", out, state["status"])
            return result
        params = [p for group in optimizer.param_groups for p in group["params"]]
        deadline = started + cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
        step = state["step"]
        status = "running"
        with progress_bar(f"training {task.method}", cfg.max_steps, enabled=self.show_progress) as advance:
            advance(step)
            while status == "running":
                if step >= cfg.max_steps:
                    status = "finished"
                elif time.perf_counter() > deadline:
                    status = "time_budget"
                else:
                    metrics = self._step(task, module, optimizer, params, train, step)
                    step += 1
                    advance(1)
                    if on_step is not None:
                        on_step(step, metrics)
                    if step % cfg.val_every == 0 and self._validate(task, val, step, state, out, started):
                        status = "stopped_early"
                    elif step % cfg.save_every == 0:
                        self._save_resume(out, identity, module, optimizer, step, state, started, "running")
        validated = bool(state["curve"]) and state["curve"][-1]["step"] == step
        if step > 0 and not validated and (status == "finished" or state["best_step"] is None):
            # the end of the run, or a time budget that ends a call before any checkpoint exists
            self._validate(task, val, step, state, out, started)
        self._save_resume(out, identity, module, optimizer, step, state, started, status)
        result.status, result.steps = status, step
        result.best_step, result.best_metric, result.curve = state["best_step"], state["best_metric"], state["curve"]
        result.seconds = state["seconds"] + time.perf_counter() - started
        return result

    # ------------------------------------------------------------------ steps

    def _step(self, task: TrainingTask, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
              params: list[torch.nn.Parameter], train: Sequence[EditExample], step: int) -> dict[str, float]:
        cfg = self.config
        batch = [train[i] for i in batch_indices(len(train), cfg.batch_size, step, cfg.seed)]
        generator = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        module.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 7_919 + step)
            optimizer.zero_grad(set_to_none=True)
            loss, metrics = task.train_step(batch, generator)
            loss.backward()
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                metrics = {**metrics, "grad_norm": float(norm)}
            optimizer.step()
        return {"loss": float(loss.detach()), **metrics}

    def _validate(self, task: TrainingTask, val: Sequence[EditExample], step: int, state: dict[str, Any],
                  out: Path, started: float) -> bool:
        """Validate; keep the checkpoint if it is the best so far. True when early stopping fires."""
        cfg = self.config
        module = task.module()
        module.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            metrics = task.validate(val)
        if cfg.early_stop_metric not in metrics:
            raise HyperParamsError(
                f"early_stop_metric {cfg.early_stop_metric!r} is not a validation metric of {task.method}; "
                f"choose one of {', '.join(sorted(metrics))}"
            )
        value = metrics[cfg.early_stop_metric]
        best = state["best_metric"]
        sign = 1.0 if cfg.early_stop_mode == "max" else -1.0
        improved = best is None or sign * (value - best) > cfg.min_delta
        elapsed = state["seconds"] + time.perf_counter() - started
        state["curve"].append({"step": step, "seconds": round(elapsed, 1), "improved": improved, **metrics})
        if improved:
            state["best_metric"], state["best_step"], state["bad_validations"] = value, step, 0
            config = {"method": task.method, **task.checkpoint_config(),
                      "training": {"step": step, "metric": cfg.early_stop_metric, "value": value,
                                   "trainer": _identity_config(cfg), "validation": metrics}}
            save_checkpoint(out, task.checkpoint_tensors(), config)
        else:
            state["bad_validations"] += 1
        LOG.info("step %d: %s=%.4f (best %.4f at step %s)%s", step, cfg.early_stop_metric, value,
                 state["best_metric"], state["best_step"], "" if improved else " no improvement")
        write_json(out / TRAINING_FILE, {"curve": state["curve"], "best_step": state["best_step"],
                                         "best_metric": state["best_metric"]})
        return state["bad_validations"] >= cfg.patience

    # ------------------------------------------------------------------ resume

    def _resume(self, out: Path, identity: dict[str, Any], module: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        fresh = {"status": "new", "step": 0, "best_step": None, "best_metric": None, "bad_validations": 0,
                 "curve": [], "seconds": 0.0}
        weights_path = out / RESUME_DIR / STATE_WEIGHTS
        if not weights_path.is_file():
            if (out / CONFIG_FILE).is_file():
                raise CheckpointError(
                    f"{out} holds a checkpoint but no resume state; pass another --out or delete the folder"
                )
            return fresh
        saved, tensors = _read_resume_state(out / RESUME_DIR)
        if saved.get("identity") != _jsonable(identity):
            raise CheckpointError(
                f"{out} holds a different training run (other method, settings or data); "
                "pass another --out, or delete the folder to start over"
            )
        module_state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        module.load_state_dict(module_state)
        restore_optimizer(optimizer, tensors, saved["optimizer"])
        LOG.info("resuming %s from step %d", out, saved["step"])
        return {k: saved[k] for k in fresh}

    def _save_resume(self, out: Path, identity: dict[str, Any], module: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, step: int, state: dict[str, Any], started: float,
                     status: str) -> None:
        folder = out / RESUME_DIR
        folder.mkdir(parents=True, exist_ok=True)
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
        seconds = state["seconds"] + time.perf_counter() - started
        saved = {
            "identity": _jsonable(identity), "step": step, "status": status, "optimizer": opt_meta,
            "best_step": state["best_step"], "best_metric": state["best_metric"],
            "bad_validations": state["bad_validations"], "curve": state["curve"], "seconds": seconds,
        }
        # tensors and state in one file, replaced in one step: a kill cannot pair weights with another step
        write_tensors(folder / STATE_WEIGHTS, {**tensors, **opt_tensors}, {STATE_KEY: json.dumps(saved)})
        write_json(folder / STATE_FILE, saved)  # a readable copy; resuming reads the metadata above


def fit_method_task(
    task: TrainingTask, params: TrainerConfig, train: Sequence[Any], val: Sequence[Any], out_dir: str | Path, *,
    identity: dict[str, Any] | None = None, show_progress: bool = True,
) -> TrainResult:
    """Train ``task`` with the loop settings inside a method's training params (MEND's, SERAC's).

    The params' own (non-loop) settings become part of the run identity, so a folder trained with
    other settings is never resumed; ``params.train_examples``, when present, caps the training set.
    """
    loop_fields = {k: getattr(params, k) for k in TrainerConfig.field_names()}
    trainer = Trainer(TrainerConfig(**loop_fields), show_progress=show_progress)
    settings = {k: v for k, v in params.to_dict().items() if k not in loop_fields}
    cap = getattr(params, "train_examples", None)
    examples = list(train)[:cap] if cap is not None else list(train)
    return trainer.fit(task, examples, val, out_dir, identity={"settings": settings, **(identity or {})})


def _read_resume_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The saved loop state and tensors; folders from before the state lived in the metadata read state.json."""
    from safetensors import SafetensorError, safe_open

    path = folder / STATE_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(STATE_KEY)
        saved = json.loads(text) if text is not None else json.loads((folder / STATE_FILE).read_text())
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read the resume state in {folder} ({exc}); "
                              f"delete {folder.parent} to train from the start, or pass another --out") from None
    return saved, tensors


def _identity_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The settings that define a run; the step and time budgets do not (a resumed call may extend them)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("max_minutes", "max_steps")}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
