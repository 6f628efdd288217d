"""``lmedit trace``: causal tracing over CounterFact facts, written to a folder (JSON + heatmaps).

Only typer/rich are imported at module level; torch, transformers and
matplotlib load when the command runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from lmedit.commands.common import DEVICE_HELP, DTYPE_HELP, checked_placement, console, fail, setup_logging, writable_folder

DEFAULT_DATA_NAME = "counterfact/counterfact_portability_gpt4.json"
"""The CounterFact file in ROME's layout (``requested_rewrite``) among the shared benchmark data."""


def default_data_path() -> Path | None:
    """The shared CounterFact file (``$LMEDIT_SHARED_DATA`` or ``shared/data`` here or in a parent), if found."""
    from lmedit.data.shared import find_shared_file

    return find_shared_file(DEFAULT_DATA_NAME)


def _parse_kinds(text: str) -> tuple[str, ...]:
    from lmedit.analysis.tracing import KINDS

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        fail(f"--kinds got {text!r}; give a comma-separated subset of {','.join(KINDS)}")
    return tuple(dict.fromkeys(kinds))


def trace_command(
    model: str = typer.Option("smollm2-135m", help="Model preset, Hugging Face id or local folder."),
    data: Optional[Path] = typer.Option(None, help="CounterFact file (ROME or EasyEdit layout); default: the shared counterfact_portability_gpt4.json."),
    limit: int = typer.Option(50, help="Trace this many facts (after --known-only filtering)."),
    offset: int = typer.Option(0, help="Skip this many records of the data file first."),
    kinds: str = typer.Option("hidden,mlp,attn", help="What to restore: comma-separated hidden, mlp, attn."),
    samples: int = typer.Option(10, help="Noise samples per fact (averaged)."),
    noise_multiplier: float = typer.Option(3.0, help="Noise std = this x the std of the subjects' embeddings (ROME: 3)."),
    window: int = typer.Option(10, help="MLP/attention: layers restored together, centred on each layer."),
    known_only: bool = typer.Option(True, "--known-only/--all", help="Keep only facts the model predicts correctly (first token), as ROME's known facts."),
    seed: int = typer.Option(0, help="Seed of the noise samples."),
    max_batch_tokens: int = typer.Option(2048, help="Most tokens per forward pass."),
    examples: int = typer.Option(1, help="Also plot per-fact heatmaps for this many facts."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write heatmap PNGs (needs matplotlib, the 'plot' extra)."),
    out: Optional[Path] = typer.Option(None, help="Output folder; default runs/<time>-trace."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the Python code a model folder or hub repository ships (only for code you trust)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Causal tracing (ROME §2.1): which layers carry facts; suggests layers for ROME/MEMIT."""
    setup_logging(verbose)
    checked_placement(device, dtype)  # before any data or model is read
    kind_list = _parse_kinds(kinds)
    if limit < 1 or samples < 1 or window < 1 or noise_multiplier < 0 or max_batch_tokens < 1 or offset < 0:
        fail("--limit, --samples, --window and --max-batch-tokens must be positive; --noise-multiplier and --offset non-negative")
    if plots:
        from lmedit.analysis.plots import PlotDependencyError, require_matplotlib

        try:
            require_matplotlib()
        except PlotDependencyError as exc:
            fail(f"{exc}; or pass --no-plots to write only trace.json")
    data_path = data or default_data_path()
    if data_path is None:
        from lmedit.data.shared import shared_hint

        fail(f"{shared_hint(DEFAULT_DATA_NAME)}; pass --data <CounterFact JSON>")
    if not data_path.is_file():
        fail(f"data file {data_path} not found; pass --data <CounterFact JSON>")
    folder = writable_folder(out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-trace", "--out")

    from lmedit.analysis import tracing

    scanned = None
    try:
        facts = tracing.load_facts(data_path, offset=offset, limit=None if known_only else limit)
        with console.status(f"loading {model}..."):
            from lmedit.models import load_model

            loaded, tok = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        if known_only:
            with console.status("keeping the facts the model knows..."):
                candidates = facts
                facts = tracing.select_known_facts(loaded, tok, candidates, limit=limit)
            scanned = next((i + 1 for i, f in enumerate(candidates) if facts and f is facts[-1]), len(candidates))
            scanned = scanned if len(facts) >= limit else len(candidates)
            console.print(f"{len(facts)} known facts among the first {scanned} of {len(candidates)} records")
        report = tracing.trace_facts(
            loaded, tok, facts, kinds=kind_list, samples=samples, noise_multiplier=noise_multiplier,
            window=window, seed=seed, max_batch_tokens=max_batch_tokens, show_progress=progress,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    report.extra.update({"model": model, "data": str(data_path), "offset": offset, "limit": limit, "known_only": known_only,
                         "records_scanned_for_known": scanned})
    written = _write(report, folder, model_name=model, plots=plots, examples=examples)
    _print(report, model)
    console.print("wrote: " + ", ".join(str(p) for p in written))


def _write(report: Any, folder: Path, *, model_name: str, plots: bool, examples: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trace.json"
    path.write_text(json.dumps(report.to_dict(), indent=1))
    written = [path]
    if plots:
        from lmedit.analysis.plots import plot_fact_heatmap, plot_summary_heatmap

        window = int(report.settings["window"])
        for kind, summary in report.summaries.items():
            written.append(plot_summary_heatmap(summary, folder / f"trace_avg_{kind}.png", window=window, model_name=model_name))
        for index, trace in enumerate(report.traces[: max(0, examples)]):
            for kind in report.summaries:
                written.append(plot_fact_heatmap(trace, kind, folder / f"trace_fact{index}_{kind}.png", model_name=model_name))
    return written


def _print(report: Any, model: str) -> None:
    table = Table(title=f"causal tracing on {model}: {len(report.traces)} facts, "
                        f"noise std {report.noise_std:.3f}, {report.seconds:.0f} s")
    for column in ("kind", "p clean", "p corrupt", "subj. peak", "AIE", "last peak", "AIE"):
        table.add_column(column, justify="right", no_wrap=True)
    for kind, summary in report.summaries.items():
        subject_layer, subject_effect = summary.peak("last_subject")
        last_layer, last_effect = summary.peak("last")
        table.add_row(kind, f"{summary.mean_p_clean:.3f}", f"{summary.mean_p_corrupted:.3f}", str(subject_layer),
                      f"{subject_effect:.4f}", str(last_layer), f"{last_effect:.4f}")
    console.print(table)
    console.print("subj. peak / last peak: layer with the largest average indirect effect (AIE) "
                  "at the last subject token / the last token")
    suggestion = report.suggestion()
    if suggestion:
        console.print(f"suggested edit layers: ROME [bold]{suggestion['rome_layer']}[/], "
                      f"MEMIT [bold]{suggestion['memit_layers']}[/] (MLP peak at the last subject token)")
