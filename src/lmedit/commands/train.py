"""``lmedit train METHOD``: train a method's networks into ``$LMEDIT_HOME/checkpoints/<method>/<model>/``.

Which methods have networks to train, with which settings, function and default
data, is read from the registry (``@register(..., trainer=TrainingEntry(...))``),
so a new trainable method needs no change here. The presets' ``archive`` points at
that folder, so ``lmedit run --method MEND`` works after ``lmedit train mend``.
Training is resumable: running the same command again continues (or reports that
the run is finished). Kept cheap to import: torch and the library load only when
the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from lmedit.commands.common import DEVICE_HELP, DTYPE_HELP, checked_placement, console, fail, parse_overrides, setup_logging, writable_folder


def train_command(
    method: str = typer.Argument(..., help="A method with networks to train: MEND, MALMEN or SERAC (`lmedit methods` lists them)."),
    model: str = typer.Option("smollm2-135m", help="Model preset, Hugging Face id or local folder."),
    train_data: Optional[Path] = typer.Option(None, "--train-data", help="Training edits (default: the method's, e.g. shared/data/counterfact/counterfact-train.json)."),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="Validation edits (default: the method's, e.g. shared/data/counterfact/counterfact-val.json)."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: $LMEDIT_HOME/checkpoints/<method>/<model>)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop this call after about this many minutes (run again to continue)."),
    set_: list[str] = typer.Option([], "--set", help="Override a training setting, key=value (repeatable; e.g. max_steps=200)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the Python code a model folder or hub repository ships (only for code you trust)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a meta-learned editor's networks (MEND's and MALMEN's hypernetworks, SERAC's classifier and counterfactual model); resumable."""
    setup_logging(verbose)
    checked_placement(device, dtype)  # before any data or model is read
    writable_folder(out, "--out")
    try:
        from lmedit.registry import MethodError, get_method, trainable_methods
        from lmedit.training.paths import default_checkpoint_dir

        info = get_method(method)
        if info.trainer is None:
            raise MethodError(f"{info.name} has no networks to train; trainable: "
                              f"{', '.join(m.name for m in trainable_methods()) or 'none'}")
        overrides = parse_overrides(set_)
        if max_minutes is not None:
            overrides["max_minutes"] = max_minutes
        train_path = _data_file(train_data, info.trainer.train_data, "--train-data")
        val_path = _data_file(val_data, info.trainer.val_data, "--val-data")
        folder = writable_folder(out or default_checkpoint_dir(info.name, model), "--out")
        result = run_training(info.name, model, train_path, val_path, folder, overrides, show_progress=progress,
                              trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    _print_result(info.name, result)


def _data_file(given: Optional[Path], default: str, option: str) -> Path:
    if given is not None:
        if not given.is_file():
            raise ValueError(f"{option} {given} does not exist")
        return given
    from lmedit.data.shared import find_shared_file

    found = find_shared_file(default)
    if found is None:
        raise ValueError(f"no {default} found in $LMEDIT_SHARED_DATA or shared/data; pass {option}")
    return found


def run_training(method: str, model_name: str, train_path: Path, val_path: Path, out: Path,
                 overrides: dict[str, Any], *, show_progress: bool = True, trust_remote_code: bool = False,
                 device: str = "cpu", dtype: str = "float32") -> Any:
    """Load the model and the data, then train (or continue) ``method``'s networks into ``out``."""
    from lmedit.models import load_model
    from lmedit.registry import get_method
    from lmedit.safe_files import file_sha256
    from lmedit.training import load_examples

    entry = get_method(method).trainer
    if entry is None:
        raise ValueError(f"{method} has no networks to train")
    params = entry.params.from_dict(overrides, source=f"lmedit train {method.lower()} --set")
    with console.status(f"loading {model_name} and the training data..."):
        model, tok = load_model(model_name, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        train = load_examples(train_path, limit=params.train_examples)
        val = load_examples(val_path, limit=params.val_examples)
    identity = {"model": model_name, "train_data": {"path": str(train_path), "sha256": file_sha256(train_path)},
                "val_data": {"path": str(val_path), "sha256": file_sha256(val_path)}}
    console.print(f"training {method} ({entry.summary}) on {model_name}: {len(train)} training edits, {len(val)} validation edits → {out}")
    return entry.train(model, tok, params, train, val, out, identity=identity, show_progress=show_progress)


def _print_result(method: str, result: Any) -> None:
    curve = result.curve
    if curve:
        shown = [k for k in ("score", "rewrite_acc", "rephrase_acc", "locality", "classifier_acc", "cf_acc")
                 if k in curve[-1]]
        table = Table(title=f"{method} validation curve")
        table.add_column("step", justify="right")
        table.add_column("minutes", justify="right")
        for key in shown:
            table.add_column(key, justify="right")
        table.add_column("best")
        for row in curve:
            table.add_row(str(row["step"]), f"{row['seconds'] / 60:.1f}", *(f"{row[k]:.3f}" for k in shown),
                          "✓" if row["step"] == result.best_step else "")
        console.print(table)
    best = "none yet" if result.best_step is None else f"step {result.best_step} ({result.best_metric:.4f})"
    console.print(f"status: [bold]{result.status}[/] after {result.steps} steps, {result.seconds / 60:.1f} min in total; "
                  f"best checkpoint: {best}")
    console.print(f"checkpoint: [bold]{result.out_dir}[/]")
    if result.status == "time_budget":
        console.print("the time budget ended this call; run the same command again to continue")
