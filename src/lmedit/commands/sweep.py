"""``lmedit sweep SWEEP.yaml``: run a grid of jobs into one folder, here or on a Ray cluster; resumable.

Kept cheap to import: the library, torch and Ray load only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmedit.commands.common import DEVICE_HELP, DTYPE_HELP, checked_placement, console, fail, setup_logging, writable_folder


def _announce(written: int, total: int) -> None:
    console.print(f"{written} of {total} chunks already written; running {total - written} on Ray", highlight=False)


def sweep_command(
    sweep_file: Path = typer.Argument(..., help="The grid: a YAML file of methods, models, data, protocols, T, seeds, eval modes."),
    out: Optional[Path] = typer.Option(None, help="Sweep folder (one run folder per job); default: the file's `out`, "
                                                  "else runs/sweep-<file name>."),
    engine: str = typer.Option("serial", help="serial (one job after another, in this process) or ray (chunks as Ray "
                                              "tasks on --workers actors; the `cluster` extra)."),
    workers: int = typer.Option(2, help="Ray: worker actors, each holding a loaded model."),
    address: Optional[str] = typer.Option(None, help="Ray: join this cluster (auto, host:port or ray://host:port) "
                                                     "instead of starting a local Ray."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per Ray worker (or of this process, serially). "
                                                     "Default: this process's count, so Ray's results equal a serial "
                                                     "run's bit for bit; results match only between equal thread counts."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the file and list the jobs; run nothing."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a sweep: every job of the grid into its own run folder (resumable: finished chunks are skipped)."""
    setup_logging(verbose)
    checked_placement(device, dtype)
    if engine not in ("serial", "ray"):
        fail(f"--engine must be serial or ray, not {engine!r}")
    from lmedit.sweep.plan import SweepError, expand, read_sweep

    try:
        raw = read_sweep(sweep_file)
        jobs = expand(raw)
    except (SweepError, ValueError) as exc:
        fail(str(exc))
    root = writable_folder(out or Path(raw.get("out") or f"runs/sweep-{sweep_file.stem}"), "--out")
    console.print(f"{len(jobs)} jobs into [bold]{root}[/] ({engine})", highlight=False)
    if dry_run:
        for job in jobs:
            typer.echo(f"  {job.name}")
        return
    from lmedit.sweep.engine import run_ray, run_serial

    try:
        if engine == "ray":
            summaries = run_ray(jobs, root, workers=workers, address=address, device=device, dtype=dtype,
                                threads=threads, show_progress=progress, on_plan=_announce)
        else:
            summaries = run_serial(jobs, root, device=device, dtype=dtype, threads=threads, show_progress=progress)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    from lmedit.sweep.status import sweep_rows, sweep_table

    typer.echo(sweep_table(sweep_rows(root)), nl=False)
    console.print(f"{len(summaries)} jobs written under [bold]{root}[/]; `lmedit report --sweep {root}` shows them again",
                  highlight=False)
