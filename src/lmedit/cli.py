"""The ``lmedit`` command line: one-off edits, benchmark runs, listings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from lmedit.commands.common import (DEVICE_HELP, DTYPE_HELP, checked_placement, console, discard_new_folder,
                                    err_console, fail, first_missing, parse_overrides, setup_logging, writable_folder)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Edit knowledge in language models and measure it.")

MAIN_METRICS = ("rewrite_acc", "rephrase_acc", "locality", "portability", "locality_acc", "rewrite_ppl")


TRUST_REMOTE_CODE_HELP = "Run the Python code a model folder or hub repository ships (only for code you trust)."


def _make_editor(method: str, model: str, preset: Optional[str], hparams: Optional[Path], overrides: dict, eval_config: Any,
                 trust_remote_code: bool = False, device: str = "cpu", dtype: str = "float32") -> Any:
    from lmedit.editor import Editor
    from lmedit.registry import get_method, list_presets

    info = get_method(method)
    if preset is None and hparams is None and model in list_presets(info.name):
        preset = model
    with console.status(f"loading {model}..."):
        from lmedit.models import load_model

        loaded, tok = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    return Editor(loaded, tok, info.name, preset=preset, hparams_file=hparams, overrides=overrides,
                  eval_config=eval_config, model_name=model)


def _run_settings(hparams: Optional[Path], method: Optional[str], model: Optional[str]) -> tuple[str, str]:
    """Method and model as given, else as an EasyEdit --hparams file names them, else the defaults."""
    from lmedit.compat.easyedit_hparams import run_settings

    try:
        return run_settings(hparams, method, model, default_method="FT-M", default_model="smollm2-135m")
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))


@app.command()
def run(
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Editing method (see `lmedit methods`); default: the --hparams file's method (alg_name in EasyEdit's), else FT-M."),
    model: Optional[str] = typer.Option(None, help="Model preset, Hugging Face id or local folder; default: an EasyEdit --hparams file's model_name, else smollm2-135m."),
    data: Optional[Path] = typer.Option(None, help="Benchmark file (zsRE, CounterFact, KnowEdit, WISE, lmedit JSON); default: the demo set."),
    data_format: Optional[str] = typer.Option(None, "--format", help="Data format; detected from the file when omitted."),
    limit: Optional[int] = typer.Option(None, help="Use only this many requests (after --offset)."),
    offset: int = typer.Option(0, help="Skip this many requests first."),
    protocol: str = typer.Option("single", help="single | batch | sequential."),
    T: Optional[int] = typer.Option(None, "--T", "-T", help="Sequential: edits per chunk before evaluation."),
    batch_size: int = typer.Option(1, help="Requests per edit call (batch protocol, or sequential batches)."),
    preset: Optional[str] = typer.Option(None, help="Packaged hyperparameter preset (default: the model's, if any)."),
    hparams: Optional[Path] = typer.Option(None, help="Hyperparameter YAML file (lmedit's, or EasyEdit's as it is)."),
    set_: list[str] = typer.Option([], "--set", help="Override one hyperparameter, key=value (repeatable)."),
    eval_mode: str = typer.Option("teacher", help="teacher | generate | both."),
    eval_batch_size: int = typer.Option(128, help="Most prompts per evaluation forward pass."),
    eval_max_tokens: int = typer.Option(2048, help="Most tokens per teacher-forced evaluation forward pass."),
    packing: bool = typer.Option(True, help="Pack several prompts per row in teacher-forced evaluation."),
    chat_template: bool = typer.Option(False, help="Wrap edit prompts in the tokenizer's chat template."),
    suite: list[str] = typer.Option([], "--suite", help="Metric suite NAME[:key=value,...] (repeatable): fluency, convsent, counterfact; data that needs one (ConvSent) switches it on."),
    eval_each: bool = typer.Option(False, help="Also score each request right after its own edit (EasyEdit HEAD's 'sequential')."),
    retention_every: int = typer.Option(0, help="Also record retention curves (ERR/TRR) every k edits of a chunk; 0: off."),
    retention_items: int = typer.Option(50, help="Held-out probes for test retention (TRR), from the records after the edited ones."),
    retention_data: Optional[Path] = typer.Option(None, help="Draw the held-out probes from this file instead (a run that edits a whole file leaves no records after it); edited prompts are left out."),
    seed: int = typer.Option(0, help="Seed; chunk c uses seed + c."),
    checkpoint_minutes: float = typer.Option(15.0, help="A sequential chunk writes its state this often while it edits, and a rerun continues it from there; 0: never."),
    max_memory: Optional[str] = typer.Option(None, help="Memory budget, e.g. 16GiB: a model whose weights do not fit is refused before loading, and the key statistics a method computes shrink their batches to fit."),
    out: Optional[Path] = typer.Option(None, help="Run folder (resumes if it holds the same run); default runs/<time>-<method>."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a benchmark: edit every request under a protocol, evaluate, write a run folder."""
    setup_logging(verbose)
    from lmedit.data import load_requests
    from lmedit.data.loaders import empty_selection_reason
    from lmedit.evaluation import EvalConfig
    from lmedit.experiment import RetentionSettings, make_spec, run_experiment
    from lmedit.runner import RunFolderBusy, default_out_dir, ensure_run_folder_free
    from lmedit.safe_files import file_sha256

    checked_placement(device, dtype)  # a device this machine lacks fails before any data or model is read
    method, model = _run_settings(hparams, method, model)
    if retention_every < 0 or (retention_every and retention_items < 1):
        fail("--retention-every must be 0 (off) or positive, and --retention-items at least 1")
    if checkpoint_minutes < 0:
        fail(f"--checkpoint-minutes must be 0 (never) or positive, got {checkpoint_minutes}")
    if retention_data is not None and not retention_data.is_file():
        fail(f"--retention-data {retention_data} is not a file; pass a data file to draw held-out probes from")
    folder = writable_folder(out or default_out_dir(_canonical_method(method)), "--out")
    created = first_missing(folder)  # what a run that fails before its first record must not leave behind
    try:
        ensure_run_folder_free(folder)  # another process's run: stop before loading anything
        from lmedit.limits import budget_before_loading, set_memory_budget

        budget = budget_before_loading(max_memory, model, dtype) if max_memory else None
        requests = load_requests(data, limit=limit, offset=offset, format=data_format)
        if not requests:
            fail(empty_selection_reason(data, limit=limit, offset=offset))
        from lmedit.evaluation.suites import required_specs  # --suite hook: selected + data-required suites

        retention = None  # held-out probes from the records after the edited ones, in <run folder>/held_out.json
        if retention_every:
            retention = RetentionSettings(every=retention_every, items=retention_items, data=data, data_format=data_format,
                                          held_out_data=retention_data)
        editor = _make_editor(method, model, preset, hparams, parse_overrides(set_),
                              EvalConfig(mode=eval_mode, batch_size=eval_batch_size, use_chat_template=chat_template,
                                         max_batch_tokens=eval_max_tokens, packing=packing,
                                         suites=required_specs(requests, suite)), trust_remote_code, device, dtype)
        set_memory_budget(editor.model, budget)
        spec = make_spec(editor, requests, protocol=protocol, T=T, batch_size=batch_size, seed=seed, eval_each=eval_each,
                         data=str(data) if data else "demo", data_sha256=file_sha256(data) if data else None,
                         offset=offset, limit=limit, extra={"data_format": data_format} if data_format else None)
        summary, folder = run_experiment(editor, requests, spec, folder, retention=retention, show_progress=progress,
                                         checkpoint_minutes=checkpoint_minutes)
    except RunFolderBusy as exc:  # the folder is another process's: leave it alone
        fail(str(exc))
    except (ValueError, RuntimeError, OSError) as exc:
        discard_new_folder(created, folder)
        fail(str(exc))
    _print_summary(summary, f"{editor.method.name} on {model}, {protocol}" + (f" T={T}" if T else "") + f", {eval_mode} scoring")
    console.print(f"results: [bold]{folder}[/]")


def _canonical_method(name: str) -> str:
    """The registered spelling of a method name (for the default run folder); an unknown name is kept for the error."""
    from lmedit.registry import MethodError, get_method

    try:
        return get_method(name).name
    except MethodError:
        return name


def _print_summary(summary: dict[str, Any], title: str) -> None:
    phases = [p for p in ("pre", "post", "post_each") if p in summary]
    metrics = [m for m in summary.get("post", {}) if "/" not in m]
    ordered = [m for m in MAIN_METRICS if m in metrics] + sorted(m for m in metrics if m not in MAIN_METRICS)
    table = Table(title=f"{title} (n={summary['n']})")
    table.add_column("metric")
    for phase in phases:
        table.add_column(phase, justify="right")
    for metric in ordered:
        table.add_row(metric, *(_fmt(summary[p].get(metric)) for p in phases))
    console.print(table)
    chunks = summary.get("chunks", [])
    if len(chunks) > 1 and any(chunk["n"] > 1 for chunk in chunks):
        shown = [m for m in ("rewrite_acc", "rephrase_acc", "locality", "portability") if m in metrics]
        per_chunk = Table(title="post metrics per chunk")
        per_chunk.add_column("chunk", justify="right")
        per_chunk.add_column("n", justify="right")
        for metric in shown:
            per_chunk.add_column(metric, justify="right")
        for chunk in chunks:
            per_chunk.add_row(str(chunk["chunk"]), str(chunk["n"]), *(_fmt(chunk["post"].get(m)) for m in shown))
        per_chunk.add_row("mean", "", *(_fmt(summary["chunk_mean"]["post"].get(m)) for m in shown), style="bold")
        console.print(per_chunk)
    timing = summary.get("timing", {})
    memory = summary.get("memory", {})
    peak = ", ".join(f"{label} {memory[key] / 2**20:,.0f} MiB" for key, label in
                     (("cpu_peak_rss_bytes", "peak RSS"), ("cuda_peak_allocated_bytes", "CUDA peak")) if key in memory)
    console.print(f"edit time per request: {timing.get('edit_seconds_per_request', 0):.2f} s" + (f"; {peak}" if peak else ""))


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


@app.command()
def edit(
    prompt: str = typer.Option(..., help="The prompt to edit, e.g. 'The Eiffel Tower is in the city of'."),
    target: str = typer.Option(..., help="The new completion, e.g. 'Rome'."),
    subject: Optional[str] = typer.Option(None, help="The subject inside the prompt (needed by ROME-style methods)."),
    rephrase: Optional[str] = typer.Option(None, help="A paraphrase of the prompt, to check generalisation."),
    locality_prompt: Optional[str] = typer.Option(None, help="An unrelated prompt that should not change."),
    locality_answer: Optional[str] = typer.Option(None, help="Its answer (defaults to the model's own greedy answer)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Default: an EasyEdit --hparams file's alg_name, else FT-M."),
    model: Optional[str] = typer.Option(None, help="Default: an EasyEdit --hparams file's model_name, else smollm2-135m."),
    preset: Optional[str] = typer.Option(None),
    hparams: Optional[Path] = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", help="Override one hyperparameter, key=value."),
    max_new_tokens: int = typer.Option(8, help="Tokens to generate for the before/after answers."),
    save: Optional[Path] = typer.Option(None, help="Save the edit to this folder (re-apply with the library's load_edit)."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Make one edit and show the model's greedy answers before and after."""
    setup_logging(verbose)
    writable_folder(save, "--save")
    checked_placement(device, dtype)
    from lmedit.evaluation import EvalConfig
    from lmedit.forward.tokens import check_fits_context
    from lmedit.requests import EditRequest
    from lmedit.routing import generate_routed  # greedy answers as the (possibly routed) model is really fed

    method, model = _run_settings(hparams, method, model)
    try:
        # The request is built (and so checked: empty prompt or target) before the model loads, and checked
        # against the method and the model's context before anything is generated.
        request = EditRequest(prompt, target, subject=subject, rephrase=(rephrase,) if rephrase else (),
                              locality={"neighborhood": [(locality_prompt, locality_answer or "?")]} if locality_prompt else {})
        overrides = parse_overrides(set_)
        editor = _make_editor(method, model, preset, hparams, overrides, EvalConfig(), trust_remote_code, device, dtype)
        editor.method.check_requests([request])
        check_fits_context(editor.model, editor.tok, [request])
        shown = [("prompt", prompt)] + ([("rephrase", rephrase)] if rephrase else []) + (
            [("locality", locality_prompt)] if locality_prompt else [])
        before = _answers(editor, [p for _, p in shown], max_new_tokens, generate_routed)
        if locality_prompt and not locality_answer:  # the model's own answer is what must not move
            request = dataclasses.replace(request, locality={"neighborhood": [(locality_prompt, before[-1].strip() or "?")]})
        pre = editor.capture([request])
        with console.status(f"editing with {editor.method.name}..."):
            handle = editor.apply(request)
        after = _answers(editor, [p for _, p in shown], max_new_tokens, generate_routed)
        metrics = editor.evaluate([request], pre)[0]
        if save:
            handle.save(save)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    table = Table(title=f"{editor.method.name} on {model}: greedy answers")
    for column in ("probe", "prompt", "before", "after"):
        table.add_column(column)
    for (kind, text), b, a in zip(shown, before, after):
        table.add_row(kind, text, repr(b), repr(a))
    console.print(table)
    console.print("  ".join(f"{k}: {pre.metrics[0].get(k, float('nan')):.3f} → {v:.3f}" if k in pre.metrics[0] else f"{k}: {v:.3f}"
                            for k, v in metrics.items() if "/" not in k))
    if save:
        console.print(f"edit saved to [bold]{save}[/]")
    handle.restore()


def _answers(editor: Any, prompts: list[str], max_new_tokens: int, generate: Any) -> list[str]:
    tokens = generate(editor.model, editor.tok, prompts, [max_new_tokens] * len(prompts))
    return [editor.tok.decode(t, skip_special_tokens=True) for t in tokens]


@app.command()
def methods() -> None:
    """List the registered editing methods and their presets."""
    from lmedit.registry import list_methods, list_presets

    table = Table(title="editing methods")
    for column in ("name", "batch", "needs subject", "train first", "presets", "what it does"):
        table.add_column(column)
    for info in list_methods():
        table.add_row(info.name, "yes" if info.supports_batch else "no", "yes" if info.needs_subject else "no",
                      f"lmedit train {info.name.lower()}" if info.trainer else "—",
                      ", ".join(list_presets(info.name)) or "—", info.summary)
    console.print(table)


@app.command()
def models() -> None:
    """List the model presets and whether they are installed here."""
    from lmedit.models import lmedit_home, preset_status

    table = Table(title=f"model presets (cache: {lmedit_home()})")
    for column in ("name", "state", "description", "licence"):
        table.add_column(column)
    for row in preset_status():
        table.add_row(row["name"], row["state"], row["description"], row["licence"])
    console.print(table)
    console.print("Any Hugging Face model id or local folder also works with --model.")


from lmedit.commands.stats import stats_command  # noqa: E402  (cheap: imports torch only when run)

app.command("stats")(stats_command)


@app.command()
def report(
    folders: Optional[list[Path]] = typer.Argument(None, help="Run folders written by `lmedit run` or `lmedit reproduce` "
                                                              "(a folder of run folders stands for all of them)."),
    out: Optional[Path] = typer.Option(None, help="Also write the table here (.md), the rows as JSON (.json) and, "
                                                  "for layouts that draw one, the plot (.png)."),
    layout: str = typer.Option("default", help="Table layout from the layout registry, e.g. knowedit, counterfact, "
                                               "wise-table; `--layout list` shows them all."),
    sweep: Optional[Path] = typer.Option(None, "--sweep", help="A sweep folder (`lmedit sweep`): one table over its jobs, "
                                         "with chunks written / all for a sweep still running."),
    html_file: Optional[Path] = typer.Option(None, "--html", help="Also write one self-contained HTML page (tables, "
                                             "per-chunk means, retention curves, trace heatmaps; opens offline)."),
) -> None:
    """Compare finished runs side by side (default: pre → post per metric, edit time) as a markdown table."""
    from lmedit.reports import (ReportError, RunNotStarted, describe_layout, expand_run_folders, get_layout,
                                list_layouts, load_run)

    if layout == "list":
        typer.echo("\n".join(f"{name}: {describe_layout(name)}" for name in list_layouts()))
        return
    if sweep is not None:
        from lmedit.sweep.plan import SweepError
        from lmedit.sweep.status import sweep_rows, sweep_table

        try:
            typer.echo(sweep_table(sweep_rows(sweep)), nl=False)
        except (SweepError, ReportError) as exc:
            fail(str(exc))
        if not folders:
            return
    if not folders:
        fail("give at least one run folder, e.g. `lmedit report runs/a runs/b`")
    if out is not None:
        writable_folder(out.parent, "--out")
    if html_file is not None:
        writable_folder(html_file.parent, "--html")
    from lmedit.app import AppError

    try:
        if html_file is not None:  # written first: trace folders may be among the folders, which tables skip
            from lmedit.reports.html import write_html_report

            write_html_report(folders, html_file, layout)
            console.print(f"HTML report written to [bold]{html_file}[/]", highlight=False)
            folders = [f for f in folders if not (f / "trace.json").is_file()]
            if not folders:
                return
        chosen = get_layout(layout)
        runs, not_started = [], []
        for folder in expand_run_folders(folders):
            try:
                runs.append(load_run(folder))
            except RunNotStarted as exc:  # a run just begun: show the others, say which was left out
                not_started.append(str(exc))
        if not runs:
            raise ReportError("; ".join(not_started))
        for reason in not_started:
            err_console.print(f"[yellow]left out:[/] {reason}", highlight=False, soft_wrap=True)
        rows = chosen.rows(runs)
        text = chosen.table(rows)
    except (ReportError, AppError) as exc:
        fail(str(exc))
    typer.echo(text, nl=not text.endswith("\n"))  # plain text: markdown is never wrapped or read as rich markup
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        plot = getattr(chosen, "plot", None)
        if plot is not None:
            plot(rows, out.with_suffix(".png"))


from lmedit.commands.reproduce import reproduce_app  # noqa: E402  (cheap: the library loads only when run)

app.add_typer(reproduce_app, name="reproduce")
from lmedit.commands.train import train_command  # noqa: E402  (train METHOD; the library loads only when run)

app.command("train")(train_command)


from lmedit.commands.trace import trace_command  # noqa: E402  (causal tracing; torch loads only when run)

app.command("trace")(trace_command)
from lmedit.commands.app import app_command  # noqa: E402  (the web app; Gradio and torch load only when run)

app.command("app")(app_command)
from lmedit.commands.sweep import sweep_command  # noqa: E402  (grids of runs; the library and Ray load only when run)

app.command("sweep")(sweep_command)
from lmedit.commands.hparams import hparams_app  # noqa: E402  (EasyEdit hyperparameter files; cheap)

app.add_typer(hparams_app, name="hparams")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
