"""What every ``lmedit`` sub-command shares: consoles, logging set-up, ``--set`` parsing, one error line.

Kept cheap to import (typer, yaml and rich only), so ``lmedit --help`` stays fast;
the library loads inside each command when it runs.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import typer
import yaml
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    """Library log records to stderr through rich; transformers' own chatter only with ``--verbose``."""
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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as YAML so numbers and lists work."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def fail(message: str) -> NoReturn:
    """Print one readable error line and exit with status 2 (click's usage-error code)."""
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)
