"""Training meta-learned editors (MEND, MALMEN, SERAC): one loop, resumable, keeping the best checkpoint."""

from lmedit.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lmedit.training.data import EditExample, TrainingDataError, batch_indices, examples_from_requests, load_examples
from lmedit.training.loop import (EditorTrainingParams, Trainer, TrainerConfig, TrainingTask, TrainResult,
                                  fit_method_task)
from lmedit.training.paths import default_checkpoint_dir, resolve_archive

__all__ = [
    "CheckpointError",
    "EditExample",
    "EditorTrainingParams",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "TrainingDataError",
    "TrainingTask",
    "batch_indices",
    "default_checkpoint_dir",
    "examples_from_requests",
    "fit_method_task",
    "load_checkpoint",
    "load_examples",
    "resolve_archive",
    "save_checkpoint",
]
