"""`lmedit report --html`: one self-contained page of runs and traces."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from lmedit.cli import app
from lmedit.reports.html import html_report, markdown_to_html, rows_table
from run_folders import runs_root  # noqa: F401  (fixture)



def test_markdown_tables_become_escaped_html():
    page = markdown_to_html("# Title\n\n| a | b<script> |\n|---|---:|\n| 1 | x |\ntext & more")
    assert "<h3>Title</h3>" in page and "<th>b&lt;script&gt;</th>" in page and "<td>1</td>" in page
    assert "<p>text &amp; more</p>" in page and "<script>" not in page and "---" not in page
    assert rows_table([{"n": 2, "x": 0.12345, "s": None}]) == (
        '<table><thead><tr><th>n</th><th>x</th><th>s</th></tr></thead><tbody><tr><td class="num">2</td>'
        '<td class="num">0.123</td><td>—</td></tr></tbody></table>')


def test_the_page_holds_everything_and_needs_no_other_file(runs_root):
    page = html_report([runs_root / "runs"], title="check")
    assert page.startswith("<!DOCTYPE html>") and "<title>check</title>" in page
    assert "grace-t2" in page and "chunks 2 / 2 (complete)" in page and "chunks 1 / 2 (still running" in page
    assert "Per-chunk means (2 chunks)" in page and "Retention curves" in page
    assert page.count("data:image/png;base64,") >= 1
    assert not re.search(r'(src|href)="(?!data:)', page)  # no link to any file or server


def test_trace_folders_get_their_heatmaps_drawn(runs_root, tmp_path):
    from lmedit.analysis.tracing import Fact, trace_facts
    from conftest import build_tiny_llama, build_word_tokenizer

    tok = build_word_tokenizer()
    report = trace_facts(build_tiny_llama(len(tok)), tok, [Fact("the capital of france is", "capital of france")],
                         kinds=("mlp",), samples=2, window=1, show_progress=False)
    folder = tmp_path / "trace"
    folder.mkdir()
    (folder / "trace.json").write_text(json.dumps(report.to_dict()))
    page = html_report([folder])
    assert "Causal trace: trace" in page and "suggested layers: ROME" in page and "data:image/png;base64," in page


def test_cli_writes_the_page_and_still_prints_the_table(runs_root, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", "--html", str(out), str(runs_root / "runs" / "grace-t2")])
    assert result.exit_code == 0, result.output
    assert "HTML report written" in result.output and "GRACE" in result.output
    assert "<html" in out.read_text() and oct(out.stat().st_mode)[-3:] == "644"
    bad = CliRunner().invoke(app, ["report", "--html", str(out), str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "not a run folder" in bad.output
