"""`lmedit app`: bad settings fail with one line before the model loads; a non-local address warns."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lmedit.cli import app
from lmedit.commands.app import host_warning


@pytest.mark.parametrize("args, message", [
    (["--root", "/nonexistent/runs"], "is not a folder"),
    (["--sessions", "0"], "at least 1"),
    (["--device", "cuda:7"], "cuda"),
    (["--dtype", "float8"], "float8"),
])
def test_bad_settings_fail_before_anything_loads(args, message):
    result = CliRunner().invoke(app, ["app", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_a_damaged_data_file_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "edits.json"
    bad.write_text("[{not json")
    result = CliRunner().invoke(app, ["app", "--root", str(tmp_path), "--data", str(bad)])
    assert result.exit_code == 2 and "edits.json" in result.output, result.output


def test_only_the_loopback_address_is_quiet():
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "anyone who can reach this machine" in host_warning("0.0.0.0")
