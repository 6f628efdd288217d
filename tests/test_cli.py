"""The command line, driven through typer's runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmedit.cli import app

runner = CliRunner()


def test_methods_lists_the_registered_methods():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert "FT-M" in result.output and "FT-L" in result.output


def test_models_lists_the_presets():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "smollm2-135m" in result.output


def test_unloadable_model_fails_with_a_message_and_exit_2(tmp_path):
    result = runner.invoke(app, ["run", "--model", str(tmp_path / "none"), "--limit", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "error" in result.output


@pytest.mark.embedded
def test_run_on_the_embedded_model_writes_a_run_folder(embedded, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--method", "FT-M", "--limit", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["post"]["rewrite_acc"] >= 0.9 > summary["pre"]["rewrite_acc"]
    assert len(summary["chunks"]) == 2
    assert "rewrite_acc" in result.output


@pytest.mark.embedded
def test_edit_shows_answers_before_and_after(embedded, tmp_path):
    result = runner.invoke(app, ["edit", "--prompt", "The Eiffel Tower is located in the city of", "--target", "Rome",
                                 "--rephrase", "The Eiffel Tower stands in", "--locality-prompt",
                                 "The capital of Germany is", "--save", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "Rome" in result.output
    assert (tmp_path / "e" / "edit.safetensors").is_file()
