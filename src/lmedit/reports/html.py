"""``lmedit report --html FILE``: one self-contained HTML file of runs, to open offline or send to a colleague.

Everything the page shows is inside the file: the styles inline, every plot
a base64 PNG. The page has the layout's table (with its plot where the layout
draws one), then one section per run folder: settings, progress, per-chunk
means and the retention curves; trace folders (``lmedit trace``) add their
causal-trace heatmaps and suggested layers; plots a reproduction wrote beside
its run folders (``reproduce wise-table``'s table, cost and retention plots)
come first. Text from run folders is escaped, never trusted as HTML.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#1d1d1f;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1em}table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;margin:.5em 0}
.muted{color:#666;font-size:.85em}details{margin:.5em 0}.bar{background:#eee;height:.6em;width:14em;display:inline-block}
.bar>span{background:#3a7bd5;height:100%;display:block}
"""


def png_tag(path: Path, alt: str) -> str:
    """An <img> with the PNG inside it (data URI), so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.3f}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape('—' if value is None else str(value))}</td>"


def rows_table(rows: Sequence[dict[str, Any]]) -> str:
    """A list of dicts as an HTML table (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    """The markdown the report layouts write (pipe tables, headings, paragraphs) as escaped HTML."""
    out: list[str] = []
    block: list[str] = []

    def flush_table() -> None:
        if not block:
            return
        rows = [_split_row(line) for line in block if not set(line.replace("|", "").strip()) <= set("-: ")]
        head, body = rows[0], rows[1:]
        out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                   + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
                   + "</tbody></table>")
        block.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        flush_table()
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            level = min(6, 2 + len(stripped) - len(stripped.lstrip("#")))
            out.append(f"<h{level}>{html.escape(stripped.lstrip('#').strip())}</h{level}>")
        else:
            out.append(f"<p>{html.escape(stripped)}</p>")
    flush_table()
    return "\n".join(out)


def _progress_html(progress: dict[str, Any]) -> str:
    done, total = progress["done"], max(1, progress["total"])
    state = "complete" if progress["complete"] else "still running or stopped"
    width = 100 * min(done, total) / total
    return (f'<p>chunks {done} / {progress["total"]} ({state}) '
            f'<span class="bar"><span style="width:{width:.0f}%"></span></span></p>')


def _run_section(folder: Path, run: dict[str, Any]) -> str:
    from lmedit.app.runs import run_details

    details = run_details(folder, run)
    parts = [f"<h2>{html.escape(folder.name)}</h2>", f'<p class="muted">{html.escape(str(folder))}</p>',
             rows_table([details["settings"]]), _progress_html(details["progress"])]
    chunks = details["chunks"]
    if chunks:
        table = rows_table(chunks)
        parts.append(f"<h3>Per-chunk means ({len(chunks)} chunks)</h3>")
        parts.append(table if len(chunks) <= 20 else f"<details><summary>show all {len(chunks)}</summary>{table}</details>")
    if details["retention_plot"] is not None:
        parts += ["<h3>Retention curves</h3>", png_tag(details["retention_plot"], f"retention curves of {folder.name}")]
    return "\n".join(parts)


def _trace_section(folder: Path, scratch: Path) -> str:
    """A trace folder: its heatmaps (drawn from trace.json when the PNGs were not written) and suggested layers."""
    data = json.loads((folder / "trace.json").read_text())
    parts = [f"<h2>Causal trace: {html.escape(folder.name)}</h2>",
             f'<p>{int(data.get("num_facts", 0))} facts, {float(data.get("seconds", 0)):.0f} s</p>']
    suggestion = data.get("suggestion")
    if isinstance(suggestion, dict):
        parts.append(f"<p>suggested layers: ROME {html.escape(str(suggestion.get('rome_layer')))}, "
                     f"MEMIT {html.escape(str(suggestion.get('memit_layers')))}</p>")
    pictures = sorted(folder.glob("trace_avg_*.png")) + sorted(folder.glob("trace_fact*.png"))
    if not pictures:
        pictures = _draw_trace(data, folder, scratch)
    parts += [png_tag(p, p.stem) for p in pictures]
    return "\n".join(parts)


def _draw_trace(data: dict[str, Any], folder: Path, scratch: Path) -> list[Path]:
    from lmedit.analysis.plots import plot_summary_heatmap
    from lmedit.analysis.tracing import report_from_dict

    report = report_from_dict(data)
    target = scratch / folder.name
    window = int(report.settings.get("window", 10))
    return [plot_summary_heatmap(s, target / f"trace_avg_{k}.png", window=window, model_name=folder.name)
            for k, s in report.summaries.items()]


def html_report(folders: Sequence[str | Path], layout: str = "default", title: str = "lmedit report") -> str:
    """The page for ``folders`` (run folders, folders of run folders, trace folders), tabulated by ``layout``."""
    with tempfile.TemporaryDirectory(prefix="lmedit-html-") as scratch:  # plots drawn for the page, removed after
        return _page(folders, layout, title, Path(scratch))


def _page(folders: Sequence[str | Path], layout: str, title: str, scratch: Path) -> str:
    from lmedit import __version__
    from lmedit.reports import ReportError, expand_run_folders, get_layout, load_run

    given = [Path(f) for f in folders]
    traces = [f for f in given if (f / "trace.json").is_file()]
    runs = expand_run_folders([f for f in given if f not in traces]) if len(traces) < len(given) else []
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="muted">lmedit {html.escape(__version__)}, {stamp}; {len(runs)} runs, {len(traces)} traces</p>']
    loaded, waiting = [], []
    for folder in runs:
        try:
            loaded.append((folder, load_run(folder)))
        except ReportError as exc:  # a run with no finished chunk yet is listed, not fatal
            waiting.append(f"<li>{html.escape(folder.name)}: {html.escape(str(exc))}</li>")
    if waiting:
        parts.append("<h2>Runs without results yet</h2><ul>" + "".join(waiting) + "</ul>")
    runs = [folder for folder, _ in loaded]
    if runs:
        chosen = get_layout(layout)
        rows = chosen.rows([run for _, run in loaded])
        parts += [f"<h2>Table ({html.escape(layout)} layout)</h2>", markdown_to_html(chosen.table(rows))]
        plot = getattr(chosen, "plot", None)
        if plot is not None:
            target = scratch / "layout.png"
            drawn = plot(rows, target)
            if Path(drawn or target).is_file():
                parts.append(png_tag(Path(drawn or target), f"{layout} plot"))
    beside = [p for folder in given if folder.is_dir() and folder not in traces and not (folder / "config.json").is_file()
              for p in sorted(folder.glob("*.png")) if not (runs and p.stem == layout)]  # the layout plot is above
    if beside:  # plots a reproduction wrote beside its run folders (cost, retention)
        parts += ["<h2>Plots written with these runs</h2>"] + [png_tag(p, p.stem) for p in beside]
    parts += [_run_section(folder, run) for folder, run in loaded]
    parts += [_trace_section(f, scratch) for f in traces]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_html_report(folders: Sequence[str | Path], out: str | Path, layout: str = "default",
                      title: str = "lmedit report") -> Path:
    """Write :func:`html_report` to ``out`` (atomically: a reader never sees half a page)."""
    from lmedit.safe_files import atomic_write_text

    path = Path(out)
    atomic_write_text(path, html_report(folders, layout, title))
    path.chmod(0o644)  # a page to share: readable like any document, not private like a temporary file
    return path
