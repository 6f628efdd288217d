"""The Runs tab reads run folders only below the folder the app was started with."""

from __future__ import annotations

import os

import pytest

from lmedit.app import AppError
from lmedit.app.runs import PathOutsideRoot, RunBrowser
from run_folders import runs_root  # noqa: F401  (fixture)

# Each of these names something outside the root (or is not a relative path) and must be refused.
OUTSIDE = ["..", "../", "../..", "runs/../..", "runs/../../etc", "/etc", "/", "/etc/passwd", "~", "~root",
           "..\\..", "\\etc", "C:\\Windows", "c:/windows", "runs/\x00", "link-out", "runs/../link-out", "./link-out/"]


@pytest.fixture(scope="module")
def browser(runs_root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "config.json").write_text("{}")
    os.symlink(outside, runs_root / "link-out")  # a symbolic link inside the root that points outside it
    return RunBrowser(runs_root)


@pytest.mark.parametrize("text", OUTSIDE)
def test_paths_outside_the_root_are_refused(browser, text):
    with pytest.raises(PathOutsideRoot):
        browser.resolve(text)


@pytest.mark.parametrize("text", OUTSIDE)
def test_the_tab_handlers_refuse_them_too(browser, text):
    with pytest.raises(PathOutsideRoot):
        browser.table([text])
    with pytest.raises(PathOutsideRoot):
        browser.details(text)


@pytest.mark.parametrize("text", ["runs/grace-t2", "./runs/grace-t2", "runs/../runs/grace-t2", "runs\\grace-t2", ""])
def test_paths_inside_the_root_resolve(browser, text):
    assert browser.resolve(text).is_relative_to(browser.root)


def test_listing_finds_runs_and_skips_links_out(browser):
    assert browser.list_runs() == ["runs/going", "runs/grace-t2"]
    with pytest.raises(AppError, match="no folder"):
        browser.resolve("runs/missing")


def test_table_and_details_of_a_finished_run(browser):
    table = browser.table(["runs/grace-t2"])
    assert "GRACE" in table and "|" in table
    details = browser.details("runs/grace-t2")
    assert details["progress"] == {"done": 2, "total": 2, "complete": True}
    assert [row["chunk"] for row in details["chunks"]] == [0, 1] and "rewrite_acc" in details["chunks"][0]
    assert details["retention_plot"].name == "lifelong.png"


def test_a_run_still_going_shows_its_progress(browser):
    details = browser.details("runs/going")
    assert details["progress"] == {"done": 1, "total": 2, "complete": False}
    assert len(details["chunks"]) == 1 and details["retention_plot"] is None


def test_a_folder_of_runs_stands_for_the_runs_in_it(browser):
    assert [f.name for f in browser.expand(["runs"])] == ["going", "grace-t2"]
    with pytest.raises(AppError, match="choose at least one"):
        browser.table([])
