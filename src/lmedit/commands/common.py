"""What every ``lmedit`` sub-command shares: consoles, logging set-up, ``--set`` parsing, one error line.

Kept cheap to import (typer, yaml and rich only), so ``lmedit --help`` stays fast;
the library loads inside each command when it runs.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)

DEVICE_HELP = "cpu, cuda, cuda:N or auto (the GPUs via accelerate when there are any, a model too large for one spread over all; else the CPU)."
DTYPE_HELP = "Precision of the model's weights: float32, bfloat16 or float16."


class CommandFailed(SystemExit):
    """What :func:`fail` raises once its line is printed.

    A ``SystemExit`` (exit status 2), not click's ``Exit``: that one is a
    ``RuntimeError``, so the commands' ``except (ValueError, RuntimeError)``
    blocks caught it and printed its status as a second ``error: 2`` line.
    """


def setup_logging(verbose: bool) -> None:
    """Library log records to stderr through rich; transformers' own chatter (and progress bars) only with ``--verbose``."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def yaml_value(option: str, item: str, text: str) -> Any:
    """One ``--set`` value read as YAML, so numbers and lists work; broken YAML is one error line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or "not valid YAML")
        fail(f"{option} {item!r}: the value {text!r} is not valid YAML ({problem}); "
             f"quote text values, e.g. {option} 'key=\"text\"', and close lists, e.g. {option} 'key=[1, 2]'")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as YAML so numbers and lists work."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set expects key=value (e.g. --set lr=0.001), got {item!r}")
        overrides[key.strip()] = yaml_value("--set", item, value)
    return overrides


def writable_folder(path: Path | None, option: str) -> Path | None:
    """Fail with one line, before any model loads, when ``path`` cannot become an output folder.

    An existing file, a read-only folder or a folder whose nearest existing
    parent is read-only (or a file) would otherwise surface as a raw OSError
    from deep inside the run, after minutes of work. ``None`` (the command
    picks its default folder) passes through.
    """
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        fail(f"{option} {path} is a file, not a folder; pass a new or existing folder")
    if path.is_dir():
        if not _writable(path):
            fail(f"{option} {path} is not writable; pass a folder you can write to, or change its permissions")
        return path
    parent = _nearest_existing(path)
    if not parent.is_dir():
        fail(f"{option} {path} cannot be created: {parent} is a file, not a folder")
    if not _writable(parent):
        fail(f"{option} {path} cannot be created: {parent} is not writable; pass a folder you can write to")
    return path


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what a command would create), or None."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def discard_new_folder(created: Path | None, run_folder: Path) -> None:
    """Remove what a failed run created, unless it recorded results (then it resumes on the next call)."""
    if created is None or not created.is_dir():
        return
    results = run_folder / "results.jsonl"
    if results.is_file() and results.stat().st_size > 0:
        return
    shutil.rmtree(created, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")  # pragma: no cover - the root always exists


def _writable(folder: Path) -> bool:
    """Whether new entries can be made in ``folder`` (a read-only mount is refused even to root)."""
    return os.access(folder, os.W_OK | os.X_OK)


def checked_placement(device: str, dtype: str) -> Any:
    """``--device``/``--dtype`` checked against this machine before any model time is spent (one error line)."""
    from lmedit.devices import PlacementError, resolve_placement

    try:
        return resolve_placement(device, dtype)
    except PlacementError as exc:
        fail(str(exc))


def one_line(message: str) -> str:
    """A message as one line: its own lines joined with '; ', surrounding blanks dropped."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "unknown error"


def fail(message: str) -> NoReturn:
    """Print one readable error line (never wrapped, never read as markup) and exit with status 2."""
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", soft_wrap=True, emoji=False)
    raise CommandFailed(2)
