"""EasyEdit's ``*_results.json`` read by ``lmedit report`` beside lmedit run folders.

The results list below is written for this test in the shape EasyEdit's ``BaseEditor.edit``
returns and its scripts ``json.dump`` (case_id, requested_rewrite, time, pre, post).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmedit.reports import ReportError, expand_run_folders, get_layout, load_run
from lmedit.reports.easyedit_results import is_easyedit_results

REQUEST = {"prompt": "p", "target_new": "t", "ground_truth": "g", "portability": {}, "locality": {}, "subject": "s"}
RESULTS = [
    {"case_id": 0, "requested_rewrite": REQUEST, "time": 2.0,
     "pre": {"rewrite_acc": [0.25], "rephrase_acc": [0.5], "portability": {"one_hop_acc": [0.5, 0.0]},
             "locality": {"neighborhood_output": [[1, 2]]}},
     "post": {"rewrite_acc": [1.0], "rephrase_acc": [0.5], "portability": {"one_hop_acc": [1.0, 0.0]},
              "locality": {"neighborhood_acc": [1.0, 0.5]}}},
    {"case_id": 1, "requested_rewrite": REQUEST, "time": 4.0,
     "pre": {"rewrite_acc": [0.0], "rephrase_acc": [0.0], "portability": {"one_hop_acc": [1.0]},
             "locality": {"neighborhood_output": [[3]]}},
     "post": {"rewrite_acc": [0.5], "rephrase_acc": [1.0], "portability": {"one_hop_acc": [0.0]},
              "locality": {"neighborhood_acc": [1.0], "distracting_acc": [0.0]}}},
    {"case_id": 2, "requested_rewrite": REQUEST, "time": 3.0,
     "pre": {"rewrite_acc": 0.5, "rephrase_acc": [0.25], "portability": {}, "locality": {}},
     "post": {"rewrite_acc": 0.75, "rephrase_acc": [0.75], "portability": {}, "locality": {}}},
]


@pytest.fixture
def results_file(tmp_path: Path) -> Path:
    path = tmp_path / "ROME_results.json"
    path.write_text(json.dumps(RESULTS, indent=4))
    return path


def lmedit_run_folder(tmp_path: Path) -> Path:
    """A finished lmedit run folder, written by hand (config.json and summary.json are all a report reads)."""
    folder = tmp_path / "run-ft-m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"method": "FT-M", "protocol": "single", "T": None, "batch_size": 1}))
    summary = {"n": 20, "pre": {"rewrite_acc": 0.2, "rephrase_acc": 0.25, "portability": 0.3},
               "post": {"rewrite_acc": 0.9, "rephrase_acc": 0.8, "locality": 0.95, "portability": 0.35},
               "timing": {"edit_seconds_per_request": 1.5}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_averages_as_easyedit_summarises(results_file: Path) -> None:
    summary = load_run(results_file)["summary"]
    pre, post = summary["pre"], summary["post"]
    assert summary["n"] == 3
    assert pre["rewrite_acc"] == pytest.approx((0.25 + 0.0 + 0.5) / 3)
    assert post["rewrite_acc"] == pytest.approx((1.0 + 0.5 + 0.75) / 3)
    assert post["rephrase_acc"] == pytest.approx((0.5 + 1.0 + 0.75) / 3)
    # portability: a request's list is averaged first (0.5, 0.0), then over the requests that have it
    assert post["portability/one_hop"] == pytest.approx((0.5 + 0.0) / 2)
    assert pre["portability"] == pytest.approx((0.25 + 1.0) / 2)
    # locality: per group as EasyEdit prints it; the column averages a request's groups first
    assert post["locality/neighborhood"] == pytest.approx((0.75 + 1.0) / 2)
    assert post["locality/distracting"] == pytest.approx(0.0)
    assert post["locality"] == pytest.approx((0.75 + 0.5) / 2)
    assert "locality" not in pre  # EasyEdit's pre phase holds outputs, not accuracies
    assert summary["timing"]["edit_seconds_per_request"] == pytest.approx(3.0)


def test_report_shows_easyedit_file_beside_lmedit_run(tmp_path: Path, results_file: Path) -> None:
    from lmedit.cli import app

    folder = lmedit_run_folder(tmp_path)
    result = CliRunner().invoke(app, ["report", str(results_file), str(folder)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| ROME (EasyEdit file) | easyedit | 3 | 0.250 → 0.750 | 0.250 → 0.750 | 0.625 |")
    assert lines[2].startswith("| FT-M | single | 20 | 0.200 → 0.900 |")


def test_results_files_are_recognised_among_folders(tmp_path: Path, results_file: Path) -> None:
    folder = lmedit_run_folder(tmp_path)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"cells": []}))
    assert expand_run_folders([results_file, folder, plan]) == [results_file, folder]
    assert is_easyedit_results(results_file) and not is_easyedit_results(plan)


def test_default_layout_rows(results_file: Path) -> None:
    row = get_layout("default").rows([load_run(results_file)])[0]
    assert row["method"] == "ROME (EasyEdit file)" and row["n"] == 3
    assert row["seconds_per_edit"] == pytest.approx(3.0)


def test_a_json_that_is_not_a_results_list_is_not_read_as_one(tmp_path: Path) -> None:
    other = tmp_path / "x.json"
    other.write_text(json.dumps([{"case_id": 0}]))
    with pytest.raises(ReportError):
        load_run(other)
