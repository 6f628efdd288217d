"""``lmedit stats``: compute (or load) the E[k kᵀ] statistics that ROME/MEMIT/AlphaEdit need.

Kept cheap to import: torch, transformers and the statistics module load only
when the command runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from lmedit.commands.common import DEVICE_HELP, DTYPE_HELP

console = Console()


def parse_layers(text: str) -> list[int]:
    """``"5,6,7"``, ``"4-8"`` or a mix such as ``"1,3-5"`` -> sorted distinct layer indices."""
    layers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                first, last = (int(x) for x in part.split("-", 1))
                if last < first:
                    raise ValueError
                layers.update(range(first, last + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise ValueError(f"cannot read layers {text!r}: use e.g. '5', '5,6,7' or '4-8'") from None
    if not layers:
        raise ValueError(f"no layers in {text!r}: use e.g. '5', '5,6,7' or '4-8'")
    return sorted(layers)


def stats_command(
    model: str = typer.Option("smollm2-135m", help="Model preset, Hugging Face id or local folder."),
    layers: Optional[str] = typer.Option(None, help="Layers, e.g. '5', '5,6,7' or '4-8'."),
    corpus: str = typer.Option("enwiki2015", help="Corpus folder or file, a name under $LMEDIT_CORPUS_DIR or shared/corpus/, the packaged enwiki2015-sample (used when enwiki2015 is absent), or a hub corpus: wikipedia[:config], wikitext[:config], hf:DATASET[:config]."),
    n_samples: int = typer.Option(1000, help="Documents to average over."),
    sample_length: int = typer.Option(256, help="Tokens taken from the start of each document."),
    batch_tokens: int = typer.Option(2048, help="Most tokens per forward pass (padding included)."),
    max_memory: Optional[str] = typer.Option(None, help="Memory budget, e.g. 16GiB: a model whose weights do not fit is refused before loading, and --batch-tokens shrinks so that the pass fits."),
    cache_dir: Optional[Path] = typer.Option(None, help="Statistics cache (default $LMEDIT_HOME/stats)."),
    list_cache: bool = typer.Option(False, "--list", help="List the cache entries instead of computing."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the Python code a model folder or hub repository ships (only for code you trust)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Compute or load the second moment E(k kᵀ) of the MLP down-projection input (one pass, cached)."""
    from lmedit.commands.common import checked_placement, fail, setup_logging, writable_folder

    setup_logging(verbose)
    checked_placement(device, dtype)  # before any data or model is read
    if list_cache:
        _print_entries(cache_dir)
        return
    if layers is None:
        fail("pass --layers, e.g. --layers 4-8 (or --list to show the cache)")
    if min(n_samples, sample_length, batch_tokens) < 1:
        fail("--n-samples, --sample-length and --batch-tokens must be at least 1")
    writable_folder(cache_dir, "--cache-dir")
    try:
        chosen = parse_layers(layers)
        from lmedit.locate.stats import StatsConfig, layer_stats

        from lmedit.locate.corpus import resolve_corpus

        config = StatsConfig(corpus=corpus, n_samples=n_samples, sample_length=sample_length, batch_tokens=batch_tokens)
        from lmedit.limits import budget_before_loading, set_memory_budget

        budget = budget_before_loading(max_memory, model, dtype) if max_memory else None
        resolve_corpus(config.corpus)  # fail before spending time on the model
        start = time.perf_counter()
        with console.status(f"loading {model}..."):
            from lmedit.models import load_model

            loaded, tok = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        load_seconds = time.perf_counter() - start
        set_memory_budget(loaded, budget)  # the pass shrinks its batches to fit (logged)
        start = time.perf_counter()
        found = layer_stats(loaded, tok, chosen, config, progress=progress, cache_dir=cache_dir)
        total = time.perf_counter() - start
    except (ValueError, RuntimeError, OSError, IndexError) as exc:
        fail(str(exc))
    passes = [s.meta.get("batch_tokens") for s in found.values() if s.source == "computed"]
    if budget is not None and passes and min(passes) < batch_tokens:
        console.print(f"--max-memory: {min(passes):,} tokens per pass instead of {batch_tokens:,}")
    _print_stats(found, model, config, total, load_seconds)


def top_eigenvalue(matrix: Any, iterations: int = 300) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration (a full eigvalsh takes seconds at d=1536)."""
    import torch

    vector = torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        product = matrix @ vector
        norm = torch.linalg.vector_norm(product)
        if norm == 0:
            return 0.0
        vector = product / norm
    return float(vector @ (matrix @ vector))


def _print_stats(found: dict[int, Any], model: str, config: Any, total: float, load_seconds: float) -> None:
    console.print(f"second moments E(k kᵀ) of {model}: corpus {config.corpus}, "
                  f"{config.n_samples} samples x {config.sample_length} tokens", soft_wrap=True)
    table = Table()
    for column in ("layer", "source", "samples", "tokens", "seconds", "trace", "top eig."):
        table.add_column(column, justify="left" if column == "source" else "right", no_wrap=True)
    for layer, stats in sorted(found.items()):
        top = top_eigenvalue(stats.mom2)
        table.add_row(str(layer), stats.source, str(stats.n_samples), f"{stats.tokens:,}", f"{stats.seconds:.2f}",
                      f"{float(stats.mom2.trace()):.4g}", f"{top:.4g}")
    console.print(table)
    computed = [s for s in found.values() if s.source == "computed"]
    if computed:
        console.print(f"computed {len(computed)} layer(s) in one pass: {computed[0].meta['compute_seconds']:.1f} s "
                      f"(model load {load_seconds:.1f} s)")
    else:
        console.print(f"all layers from the cache in {total:.2f} s (model load {load_seconds:.1f} s)")
    console.print(f"cache folder: {next(iter(found.values())).path.parent}", soft_wrap=True)
    for layer, stats in sorted(found.items()):
        console.print(f"  layer {layer}: {stats.path.name}", soft_wrap=True)


def _print_entries(cache_dir: Optional[Path]) -> None:
    from lmedit.locate.stats import default_stats_dir, stats_cache_entries

    root = cache_dir or default_stats_dir()
    entries = stats_cache_entries(root)
    console.print(f"statistics cache {root}: {len(entries)} entries", soft_wrap=True)
    table = Table()
    for column in ("state", "model", "layer", "corpus", "samples", "len", "tokens", "MB"):
        table.add_column(column, no_wrap=True)
    for entry in entries:
        layer = str(entry["layer"]) if "layer" in entry else f"{len(entry.get('modules', []))} layers"
        samples = entry.get("n_samples_used", entry.get("samples_done", ""))
        table.add_row(entry["state"], str(entry.get("model", ""))[:8], layer, str(entry.get("corpus", "")).split(":")[0],
                      f"{samples}/{entry.get('n_samples', '?')}", str(entry.get("sample_length", "")),
                      str(entry.get("tokens", "")), f"{entry['bytes'] / 1e6:.1f}")
    console.print(table)
