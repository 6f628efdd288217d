"""``lmedit reproduce``: published tables re-run on one model (``wise-table``: the WISE paper's Table 2;
``knowedit-table``: KnowEdit's Table 4).

Kept cheap to import: torch and the library load only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmedit.commands.common import (DEVICE_HELP, DTYPE_HELP, checked_placement, console, fail, setup_logging,
                                    writable_folder, yaml_value)

reproduce_app = typer.Typer(add_completion=False, no_args_is_help=True,
                            help="Re-run published result tables on a model (resumable).")


@reproduce_app.callback()
def _group() -> None:
    """Re-run published result tables on a model; each run keeps its own folder, so a stopped reproduction resumes."""


def parse_methods(text: Optional[str], default: tuple[str, ...]) -> tuple[str, ...]:
    """``"GRACE,WISE"`` -> ("GRACE", "WISE"); empty or None -> ``default``."""
    if not text:
        return default
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods:
        raise ValueError(f"no methods in {text!r}: use e.g. --methods GRACE,DEFER,WISE")
    return methods


@reproduce_app.command("wise-table")
def wise_table(
    data: Optional[Path] = typer.Option(None, help="zsRE file (default: shared/data/zsre/zsre_mend_eval_portability_gpt4.json if found)."),
    out: Path = typer.Option(Path("runs/wise-table"), help="Output folder: one run folder per (method, T), the table and plot."),
    model: str = typer.Option("smollm2-135m", help="Model preset; every method needs a hyperparameter preset of that name."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated subset, e.g. GRACE,DEFER,WISE (default: all eight)."),
    T: list[int] = typer.Option([], "--T", "-T", help="Edits before evaluation (repeatable; default 1, 10, 100)."),
    all_T: bool = typer.Option(False, "--all-T", help="T = 1, 10, 100 and 1000."),
    limit: int = typer.Option(100, help="Items edited per run (the first --limit records after --offset)."),
    offset: int = typer.Option(0, help="Skip this many records first."),
    eval_mode: str = typer.Option("teacher", help="teacher | generate | both (GRACE, DEFER and WISE always add generation)."),
    eval_batch_size: int = typer.Option(128, help="Most prompts per evaluation forward pass."),
    retention_every: int = typer.Option(0, help="Also record retention curves (ERR/TRR), every k edits; 0: off."),
    retention_items: int = typer.Option(50, help="Held-out probes for test retention (TRR)."),
    retention_data: Optional[Path] = typer.Option(None, help="Draw the held-out probes from this file (default: the records after the edited ones; a run over a whole file needs another); edited prompts are left out."),
    irrelevant_file: Optional[Path] = typer.Option(None, help="WISE's irrelevant prompts (default: shared/data/wise/hallucination/hallucination-train.json if found)."),
    set_: list[str] = typer.Option([], "--set", help="Override a hyperparameter of one method: METHOD.key=value (repeatable)."),
    seed: int = typer.Option(0, help="Seed; chunk c uses seed + c."),
    checkpoint_minutes: float = typer.Option(15.0, help="A chunk writes its state this often while it edits, and a rerun continues it from there; 0: never."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    table_only: bool = typer.Option(False, "--table-only", help="Run nothing: write the table from the run folders already in --out."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run FT-L, FT-M, ROME, MEMIT, AlphaEdit, GRACE, DEFER and WISE sequentially at each T; write the table."""
    setup_logging(verbose)
    checked_placement(device, dtype)
    if table_only and not out.is_dir():
        fail(f"{out} does not exist; --table-only reads the run folders of an earlier reproduction")
    writable_folder(out, "--out")
    try:
        from lmedit.data.shared import find_shared_file
        from lmedit.reproduce import (DEFAULT_TS, WISE_IRRELEVANT_FILE, WISE_TABLE_METHODS, ZSRE_FILE, ReproduceError,
                                      WiseTableConfig, run_wise_table, write_table)

        data = data or find_shared_file(ZSRE_FILE)
        if data is None:
            fail(f"no zsRE file found at shared/data/{ZSRE_FILE}; pass it with --data")
        Ts = tuple(T) or DEFAULT_TS
        if all_T:
            Ts = tuple(sorted(set(Ts) | {1, 10, 100, 1000}))
        config = WiseTableConfig(
            data=data, out=out, model=model, device=device, dtype=dtype, methods=parse_methods(methods, WISE_TABLE_METHODS), Ts=Ts, limit=limit,
            offset=offset, eval_mode=eval_mode, eval_batch_size=eval_batch_size, seed=seed,
            retention_every=retention_every, retention_items=retention_items, retention_data=retention_data,
            irrelevant_file=irrelevant_file or find_shared_file(WISE_IRRELEVANT_FILE),
            overrides=parse_method_overrides(set_), checkpoint_minutes=checkpoint_minutes,
        )
        if table_only:
            payload = write_table(config)
        else:
            console.print(f"{len(config.plan())} runs: {', '.join(config.methods)} at T = {', '.join(map(str, config.Ts))}; "
                          f"{limit} items from {data}", soft_wrap=True)
            payload = run_wise_table(config, show_progress=progress, on_run=_report_run)
    except ReproduceError as exc:
        fail(str(exc))
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    typer.echo((out / "wise-table.md").read_text(), nl=False)  # plain text: markdown is never wrapped or read as markup
    failed = [o for o in payload.get("outcomes", []) if o["status"] == "failed"]
    for outcome in failed:
        console.print(f"[bold red]failed[/] {outcome['method']} T={outcome['T']}: {outcome['error']}", soft_wrap=True)
    console.print(f"table: [bold]{out / 'wise-table.md'}[/] (and .json, .png)")


def parse_method_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set WISE.n_iter=50`` -> {"WISE": {"n_iter": 50}}; values are read as YAML."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not sep or not dot or not method or not name:
            raise ValueError(f"--set expects METHOD.key=value (e.g. WISE.n_iter=50), got {item!r}")
        overrides.setdefault(method, {})[name] = yaml_value("--set", item, value)
    return overrides


def _report_run(outcome: Any) -> None:
    _report_cell(f"{outcome.method} T={outcome.T}", outcome)


def _report_cell(where: str, outcome: Any) -> None:
    """One line per finished cell of a reproduction: already there, done, or failed."""
    if outcome.status == "done":
        console.print(f"{where}: already finished ({outcome.folder})", soft_wrap=True)
    elif outcome.status == "ran":
        console.print(f"{where}: done in {outcome.seconds:.0f} s ({outcome.folder})", soft_wrap=True)
    else:
        console.print(f"[bold red]{where} failed:[/] {outcome.error}", soft_wrap=True)


@reproduce_app.command("knowedit-table")
def knowedit_table(
    root: Optional[Path] = typer.Option(None, help="KnowEdit folder (default: shared/data/knowedit if found)."),
    file: list[str] = typer.Option([], "--file", help="A dataset's test file: NAME=PATH, e.g. WikiData_recent=recent_test.json (repeatable)."),
    sets: Optional[str] = typer.Option(None, help="Comma-separated datasets (default: ZsRE,WikiBio,ConvSent,Sanitation,Sanitation-EasyEdit, plus any --file; Sanitation-EasyEdit is EasyEdit's own Sanitation protocol on the training file)."),
    out: Path = typer.Option(Path("runs/knowedit-table"), help="Output folder: one run folder per (dataset, method), the table and plot."),
    model: str = typer.Option("smollm2-135m", help="Model preset; every method needs a hyperparameter preset of that name."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated subset (default: the twelve fact-editing methods)."),
    limit: int = typer.Option(50, help="Items edited per dataset (the first --limit records after --offset)."),
    offset: int = typer.Option(0, help="Skip this many records of each dataset first."),
    eval_batch_size: int = typer.Option(128, help="Most prompts per evaluation forward pass."),
    set_: list[str] = typer.Option([], "--set", help="Override a hyperparameter of one method: METHOD.key=value (repeatable)."),
    seed: int = typer.Option(0, help="Seed."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    table_only: bool = typer.Option(False, "--table-only", help="Run nothing: write the table from the run folders already in --out."),
    preset: Optional[str] = typer.Option(None, help="The methods' hyperparameter presets (default: the one named like --model)."),
    engine: str = typer.Option("serial", help="serial (one run after another, in this process) or ray (the runs' "
                                              "edits as Ray tasks on --workers actors, as `lmedit sweep`; the `cluster` extra)."),
    workers: int = typer.Option(2, help="Ray: worker actors, each holding a loaded model."),
    address: Optional[str] = typer.Option(None, help="Ray: join this cluster (auto, host:port or ray://host:port)."),
    threads: Optional[int] = typer.Option(None, help="Ray: torch threads per worker (default: this process's count)."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Single edits of every method on each KnowEdit set; KnowEdit's table beside the published one, and the order."""
    setup_logging(verbose)
    checked_placement(device, dtype)
    if engine not in ("serial", "ray"):
        fail(f"--engine must be serial or ray, not {engine!r}")
    if table_only and not out.is_dir():
        fail(f"{out} does not exist; --table-only reads the run folders of an earlier reproduction")
    writable_folder(out, "--out")
    try:
        from lmedit.data.shared import find_shared
        from lmedit.reproduce import ReproduceError
        from lmedit.reproduce_knowedit import (KNOWEDIT_DEFAULT_SETS, KNOWEDIT_TABLE_METHODS, TABLE_NAME,
                                               KnowEditTableConfig, run_knowedit_table, run_knowedit_table_on_ray,
                                               write_table)

        files = parse_named_files(file)
        chosen = tuple(s.strip() for s in sets.split(",") if s.strip()) if sets else (
            KNOWEDIT_DEFAULT_SETS + tuple(n for n in files if n not in KNOWEDIT_DEFAULT_SETS))
        config = KnowEditTableConfig(
            root=root or find_shared("knowedit"), files=files, sets=chosen,
            methods=parse_methods(methods, KNOWEDIT_TABLE_METHODS), out=out, model=model, device=device, dtype=dtype,
            limit=limit, offset=offset, eval_batch_size=eval_batch_size, seed=seed,
            overrides=parse_method_overrides(set_), preset=preset,
        )
        if table_only:
            payload = write_table(config)
        else:
            console.print(f"{len(config.plan())} runs: {', '.join(config.methods)} on {', '.join(config.sets)}; "
                          f"{limit} items each" + ("; Sanitation-EasyEdit its whole training file, one sequence per "
                                                   "answer" if "Sanitation-EasyEdit" in config.sets else ""),
                          soft_wrap=True)
            if engine == "ray":
                payload = run_knowedit_table_on_ray(config, workers=workers, address=address, threads=threads,
                                                    show_progress=progress, on_run=_report_knowedit_run)
            else:
                payload = run_knowedit_table(config, show_progress=progress, on_run=_report_knowedit_run)
    except ReproduceError as exc:
        fail(str(exc))
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    typer.echo((out / f"{TABLE_NAME}.md").read_text(), nl=False)
    for outcome in (o for o in payload.get("outcomes", []) if o["status"] == "failed"):
        console.print(f"[bold red]failed[/] {outcome['method']} on {outcome['dataset']}: {outcome['error']}", soft_wrap=True)
    console.print(f"table: [bold]{out / (TABLE_NAME + '.md')}[/] (and .json, .png)")


def parse_named_files(items: list[str]) -> dict[str, Path]:
    """``--file WikiData_recent=path.json`` -> {"WikiData_recent": Path("path.json")}."""
    files = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--file expects NAME=PATH (e.g. WikiData_recent=recent_test.json), got {item!r}")
        files[name.strip()] = Path(path.strip())
    return files


def _report_knowedit_run(outcome: Any) -> None:
    _report_cell(f"{outcome.method} on {outcome.dataset}", outcome)
