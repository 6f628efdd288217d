"""``lmedit hparams convert``: an EasyEdit hyperparameter file as the equivalent lmedit preset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmedit.commands.common import console, fail, setup_logging

hparams_app = typer.Typer(no_args_is_help=True, help="Hyperparameter files: convert EasyEdit's into lmedit presets.")


@hparams_app.command("convert")
def convert_command(
    file: Path = typer.Argument(..., help="An EasyEdit hyperparameter YAML (hparams/<METHOD>/<model>.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Write the lmedit preset here (default: print it)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Write the lmedit preset equivalent to an EasyEdit file, with a comment naming every mapping and ignored key."""
    setup_logging(verbose)
    from lmedit.compat.easyedit_hparams import is_easyedit_hparams, read_easyedit_hparams, to_lmedit_preset

    import yaml

    try:
        values = yaml.safe_load(file.read_text()) if file.is_file() else None
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        values = None  # the reader below names what is wrong with the file
    if isinstance(values, dict) and not is_easyedit_hparams(values):
        fail(f"{file} is not an EasyEdit hyperparameter file (no alg_name with EasyEdit's keys such as device "
             "or a module template); an lmedit file needs no conversion")
    try:
        text = to_lmedit_preset(read_easyedit_hparams(file))
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    console.print(f"lmedit preset written to [bold]{out}[/]")
