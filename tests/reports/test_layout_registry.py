"""The layout registry: built-in layouts by name, layouts registered from outside, run folders expanded."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmedit.cli import app
from lmedit.reports import ReportError, expand_run_folders, get_layout, list_layouts, register_layout

runner = CliRunner()


def test_the_built_in_layouts_are_registered():
    assert list_layouts()[0] == "default"
    assert {"default", "knowedit", "counterfact", "wise-table"} <= set(list_layouts())
    with pytest.raises(ReportError, match="unknown layout 'nope'; available layouts: default, .*wise-table"):
        get_layout("nope")


def test_a_registered_layout_is_used_by_the_report_command(tmp_path):
    @register_layout("test-methods-only")
    class MethodsOnly:
        """Only the method names."""

        def rows(self, runs):
            return [{"method": run["config"]["method"]} for run in runs]

        def table(self, rows):
            return "| method |\n|---|\n" + "".join(f"| {row['method']} |\n" for row in rows)

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"method": "ROME", "protocol": "single"}))
    (folder / "summary.json").write_text(json.dumps({"n": 1}))
    result = runner.invoke(app, ["report", "--layout", "test-methods-only", str(folder)])
    assert result.exit_code == 0 and result.output == "| method |\n|---|\n| ROME |\n"
    listing = runner.invoke(app, ["report", "--layout", "list"])
    assert "test-methods-only: Only the method names." in listing.output
    with pytest.raises(ValueError, match="already registered"):
        register_layout("test-methods-only")(type("Other", (MethodsOnly,), {}))
    with pytest.raises(TypeError, match="rows"):
        register_layout("test-broken")(object())


def test_an_unknown_layout_or_no_folder_is_an_error_that_says_what_to_do(tmp_path):
    result = runner.invoke(app, ["report", "--layout", "nope", str(tmp_path)])
    assert result.exit_code == 2 and "available layouts: default" in " ".join(result.output.split())
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 2 and "give at least one run folder" in result.output


def test_a_folder_of_run_folders_stands_for_them(tmp_path):
    for name in ("b", "a"):
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / "config.json").write_text("{}")
    (tmp_path / "out" / "notes").mkdir()
    assert expand_run_folders([tmp_path / "out"]) == [tmp_path / "out" / "a", tmp_path / "out" / "b"]
    assert expand_run_folders([tmp_path / "out" / "b", tmp_path / "x"]) == [tmp_path / "out" / "b", tmp_path / "x"]
    (tmp_path / "out" / "wise-table.md").write_text("")  # a glob over a reproduction passes its files too
    assert expand_run_folders(sorted((tmp_path / "out").glob("*"))) == [tmp_path / "out" / n for n in ("a", "b", "notes")]
    with pytest.raises(ReportError, match="no run folders among"):
        expand_run_folders([tmp_path / "out" / "wise-table.md"])
