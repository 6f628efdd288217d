"""The page's handlers (what each button calls), on a tiny model, without a browser."""

from __future__ import annotations

import pytest

from conftest import build_tiny_llama, snapshot, state_equal
from lmedit.app import AppError
from lmedit.app.runs import PathOutsideRoot, RunBrowser
from lmedit.app.workbench import Workbench
from lmedit.registry import get_method
from run_folders import runs_root  # noqa: F401  (fixture)

pytest.importorskip("gradio")

from lmedit.app.ui import AppPage, build_page  # noqa: E402


class _Progress:
    def __call__(self, fraction, desc=""):
        return None


@pytest.fixture
def page(runs_root, word_tok, tmp_path):  # noqa: F811
    from lmedit.requests import EditRequest

    model = build_tiny_llama(len(word_tok))
    overrides = {"FT-M": get_method("FT-M").tiny_setup(model, word_tok, tmp_path)}
    items = [EditRequest("the capital of france", "rome", subject="france", rephrase=["where is the capital of france"],
                         locality={"neighborhood": [("who wrote hamlet", "tolstoy")]})]
    bench = Workbench(model, word_tok, "tiny", overrides=overrides)
    return AppPage(bench, RunBrowser(runs_root), items, "tiny items", tmp_path / "edits")


def test_the_page_builds_with_every_tab(page):
    demo = build_page(page)
    assert {"tab-edit", "tab-compare", "tab-trace", "tab-runs"} <= {getattr(b, "elem_id", None) for b in demo.blocks.values()}


def test_fill_apply_save_undo_load(page):
    prompt, target, subject, rephrase, unrelated = page.fill(0)
    assert (prompt, target, subject, unrelated) == ("the capital of france", "rome", "france", "who wrote hamlet")
    with pytest.raises(AppError, match="items 0 to 0"):
        page.fill(3)
    status, answers, scores, stack = page.apply("FT-M", "(model's preset)", prompt, target, subject, rephrase, unrelated,
                                                "s1", _Progress())
    assert status.startswith("edit #1: FT-M") and list(answers["probe"]) == ["prompt", "paraphrase", "unrelated"]
    assert answers["after"][0].split()[0] == "rome" and list(stack["#"]) == [1]
    page.save(1, "france-rome", "s1")
    assert page.saved_edits() == ["france-rome"]
    for bad in ("../x", "/tmp/x", "", ".hidden", "a/b"):
        with pytest.raises(AppError, match="name the edit"):
            page.save(1, bad, "s1")
    with pytest.raises(AppError, match="exists already"):
        page.save(1, "france-rome", "s1")
    edited = snapshot(page.bench.session("s1").stack.model)
    status, answers, stack = page.undo(prompt, rephrase, unrelated, "s1")
    assert "undid edit #1" in status and answers["after undo"][0] != answers["before undo"][0] and stack.empty
    assert state_equal(page.bench.session("s1").stack.model, snapshot(page.bench.base))
    status, stack = page.load("france-rome", "s1")
    assert "loaded 'france-rome'" in status and state_equal(page.bench.session("s1").stack.model, edited)
    with pytest.raises(AppError, match="no saved edit"):
        page.load("missing", "s1")


def test_runs_handler_refuses_paths_outside_the_root(page):
    table, details, chunks, image = page.show_runs(["runs/grace-t2"], "", "default")
    assert "GRACE" in table and "chunks 2 / 2" in details and list(chunks["chunk"]) == [0, 1] and image is not None
    for bad in ("../", "/etc", "runs/../../"):
        with pytest.raises(PathOutsideRoot):
            page.show_runs(None, bad, "default")
    with pytest.raises(AppError, match="choose a run folder"):
        page.show_runs([], " ", "default")
