"""``lmedit train mend|serac``: train a meta-learned editor into ``$LMEDIT_HOME/checkpoints/<method>/<model>/``.

The presets' ``archive`` points at that folder, so ``lmedit run --method MEND``
works after ``lmedit train mend``. Training is resumable: running the same
command again continues (or reports that the run is finished). Kept cheap to
import: torch and the library load only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()

train_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Train the networks of meta-learned editors (MEND, SERAC); resumable.")

DEFAULT_TRAIN = Path("counterfact") / "counterfact-train.json"
DEFAULT_VAL = Path("counterfact") / "counterfact-val.json"


@train_app.callback()
def _group() -> None:
    """Train MEND's hypernetwork or SERAC's scope classifier and counterfactual model on CounterFact edits."""


def _options() -> dict[str, Any]:
    return dict(
        model=typer.Option("smollm2-135m", help="Model preset, Hugging Face id or local folder."),
        train_data=typer.Option(None, "--train-data", help="Training edits (default: shared/data/counterfact/counterfact-train.json)."),
        val_data=typer.Option(None, "--val-data", help="Validation edits (default: shared/data/counterfact/counterfact-val.json)."),
        out=typer.Option(None, help="Checkpoint folder (default: $LMEDIT_HOME/checkpoints/<method>/<model>)."),
        max_minutes=typer.Option(None, "--max-minutes", help="Stop this call after about this many minutes (run again to continue)."),
        set_=typer.Option([], "--set", help="Override a training setting, key=value (repeatable; e.g. max_steps=200)."),
        progress=typer.Option(True, help="Show a progress bar."),
        verbose=typer.Option(False, "--verbose", "-v"),
    )


_OPT = _options()


@train_app.command("mend")
def train_mend_command(
    model: str = _OPT["model"], train_data: Optional[Path] = _OPT["train_data"], val_data: Optional[Path] = _OPT["val_data"],
    out: Optional[Path] = _OPT["out"], max_minutes: Optional[float] = _OPT["max_minutes"], set_: list[str] = _OPT["set_"],
    progress: bool = _OPT["progress"], verbose: bool = _OPT["verbose"],
) -> None:
    """Train MEND's gradient-editing hypernetwork (edited weights: the last 3 MLP down-projections by default)."""
    _train("MEND", model, train_data, val_data, out, max_minutes, set_, progress, verbose)


@train_app.command("serac")
def train_serac_command(
    model: str = _OPT["model"], train_data: Optional[Path] = _OPT["train_data"], val_data: Optional[Path] = _OPT["val_data"],
    out: Optional[Path] = _OPT["out"], max_minutes: Optional[float] = _OPT["max_minutes"], set_: list[str] = _OPT["set_"],
    progress: bool = _OPT["progress"], verbose: bool = _OPT["verbose"],
) -> None:
    """Train SERAC's scope classifier (a head on all-MiniLM-L6-v2) and counterfactual model (top blocks of a copy)."""
    _train("SERAC", model, train_data, val_data, out, max_minutes, set_, progress, verbose)


def _train(method: str, model: str, train_data: Optional[Path], val_data: Optional[Path], out: Optional[Path],
           max_minutes: Optional[float], set_: list[str], progress: bool, verbose: bool) -> None:
    from lmedit.commands.common import fail as _fail, parse_overrides as _parse_overrides, setup_logging as _setup_logging

    _setup_logging(verbose)
    try:
        from lmedit.training.paths import default_checkpoint_dir

        overrides = _parse_overrides(set_)
        if max_minutes is not None:
            overrides["max_minutes"] = max_minutes
        train_path = _data_file(train_data, DEFAULT_TRAIN, "--train-data")
        val_path = _data_file(val_data, DEFAULT_VAL, "--val-data")
        folder = out or default_checkpoint_dir(method, model)
        result = run_training(method, model, train_path, val_path, folder, overrides, show_progress=progress)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
    _print_result(method, result)


def _data_file(given: Optional[Path], default: Path, option: str) -> Path:
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
                 overrides: dict[str, Any], *, show_progress: bool = True) -> Any:
    """Load the model and the data, then train (or continue) ``method``'s networks into ``out``."""
    from lmedit.models import load_model
    from lmedit.runner import file_sha256
    from lmedit.training import load_examples

    params_class, train_fn = _method_entry(method)
    params = params_class.from_dict(overrides, source=f"lmedit train {method.lower()} --set")
    with console.status(f"loading {model_name} and the training data..."):
        model, tok = load_model(model_name)
        train = load_examples(train_path, limit=params.train_examples)
        val = load_examples(val_path, limit=params.val_examples)
    identity = {"model": model_name, "train_data": {"path": str(train_path), "sha256": file_sha256(train_path)},
                "val_data": {"path": str(val_path), "sha256": file_sha256(val_path)}}
    console.print(f"training {method} on {model_name}: {len(train)} training edits, {len(val)} validation edits → {out}")
    return train_fn(model, tok, params, train, val, out, identity=identity, show_progress=show_progress)


# trainable methods: module, training-params class and train function, imported only when used
TRAINABLE = {
    "MEND": ("lmedit.methods.mend", "MENDTrainingParams", "train_mend"),
    "SERAC": ("lmedit.methods.serac", "SERACTrainingParams", "train_serac"),
}


def _method_entry(method: str) -> tuple[Any, Any]:
    import importlib

    if method not in TRAINABLE:
        raise ValueError(f"{method} has no networks to train; trainable: {', '.join(TRAINABLE)}")
    module_name, params_name, train_name = TRAINABLE[method]
    module = importlib.import_module(module_name)
    return getattr(module, params_name), getattr(module, train_name)


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
