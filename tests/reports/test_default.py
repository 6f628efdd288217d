"""The default layout: finished runs side by side, read from their run folders."""

from __future__ import annotations

import json

import pytest

from lmedit.reports import ReportError, load_run
from lmedit.reports.default import markdown_table, run_row


def _write_run(folder, method, protocol, T=None, pre=0.2, post=0.9, dtype=None, memory=None):
    folder.mkdir()
    config = {"method": method, "protocol": protocol, "T": T, "batch_size": 1, "eval": {"mode": "teacher"}}
    if dtype:
        config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "summary.json").write_text(json.dumps({
        "n": 10, "complete": True, "timing": {"edit_seconds_per_request": 2.5}, **({"memory": memory} if memory else {}),
        "pre": {"rewrite_acc": pre, "rephrase_acc": pre, "portability": 0.3},
        "post": {"rewrite_acc": post, "rephrase_acc": 0.8, "locality": 0.95, "portability": 0.35},
    }))
    return folder


def test_table_shows_pre_and_post_per_run(tmp_path):
    rows = [run_row(load_run(_write_run(tmp_path / "a", "FT-M", "single"))),
            run_row(load_run(_write_run(tmp_path / "b", "ROME", "sequential", T=10, post=0.5)))]
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    # a folder written before runs recorded dtype and memory: float32, memory unknown
    assert lines[2] == "| FT-M | single | 10 | 0.200 → 0.900 | 0.200 → 0.800 | 0.950 | 0.300 → 0.350 | 2.5 | float32 | — |"
    assert lines[3].startswith("| ROME | sequential T=10 | 10 | 0.200 → 0.500 |")


def test_table_shows_dtype_and_peak_memory(tmp_path):
    cpu = run_row(load_run(_write_run(tmp_path / "a", "FT-M", "single", dtype="bfloat16",
                                      memory={"cpu_peak_rss_bytes": 1536 * 2**20})))
    gpu = run_row(load_run(_write_run(tmp_path / "b", "ROME", "single", dtype="float16",
                                      memory={"cpu_peak_rss_bytes": 3000 * 2**20, "cuda_peak_allocated_bytes": 700 * 2**20})))
    lines = markdown_table([cpu, gpu]).strip().splitlines()
    assert lines[2].endswith("| 2.5 | bfloat16 | 1536 |")
    assert lines[3].endswith("| 2.5 | float16 | 700 |")  # on a GPU the allocator's peak is the figure that matters


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(ReportError, match="not a run folder"):
        load_run(tmp_path)


def test_a_run_in_progress_is_summarised_from_its_chunks(tmp_path):
    folder = _write_run(tmp_path / "a", "ROME", "single")
    (folder / "summary.json").unlink()
    record = {"index": 0, "chunk": 0, "pre": {"rewrite_acc": 0.0}, "post": {"rewrite_acc": 1.0, "locality": 1.0},
              "edit_seconds": 3.0}
    (folder / "results.jsonl").write_text(json.dumps(record) + "\n")
    row = run_row(load_run(folder))
    assert row["n"] == 1 and row["rewrite_acc_post"] == 1.0 and not row["complete"]
    assert "(incomplete)" in markdown_table([row])
