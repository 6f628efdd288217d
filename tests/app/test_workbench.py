"""The app's actions without a browser: edit stacks, undo and removal, save/load, sessions, comparison, tracing."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from conftest import build_tiny_llama, snapshot, state_equal
from lmedit.app import AppError
from lmedit.app.workbench import EditStack, Workbench, build_request, greedy_answers
from lmedit.registry import get_method

METHODS = ("FT-M", "GRACE", "ROME")


@pytest.fixture(scope="module")
def tiny_overrides(tmp_path_factory, word_tok):
    """Each method's settings for a tiny model, from its registration (as the contract test takes them)."""
    model = build_tiny_llama(len(word_tok))
    return {m: get_method(m).tiny_setup(model, word_tok, tmp_path_factory.mktemp(m)) for m in METHODS}


def _request(prompt: str = "the capital of france", target: str = "rome", subject: str | None = "france"):
    return build_request(prompt, target, subject, "where is the capital of france", "who wrote hamlet")


def _stack(model, tok, overrides):
    return EditStack(model, tok, "tiny", overrides)


def test_build_request_checks_the_form():
    with pytest.raises(AppError, match="type the prompt"):
        build_request("  ", "rome")
    with pytest.raises(AppError, match="target"):
        build_request("the capital of france", "")
    with pytest.raises(AppError, match="does not occur in the prompt"):
        build_request("the capital of france", "rome", subject="germany")
    request = build_request("the capital of france", "rome", "france", "a\n\n b \n", "x\ny")
    assert request.rephrase == ("a", "b")
    assert [p.prompt for p in request.locality["neighborhood"]] == ["x", "y"]


@pytest.mark.parametrize("method", METHODS)
def test_edit_shows_the_new_answer_and_undo_restores_exactly(method, tiny_llama, word_tok, tiny_overrides):
    original = snapshot(tiny_llama)
    stack = _stack(tiny_llama, word_tok, tiny_overrides)
    outcome = stack.edit(method, None, _request())
    assert [kind for kind, _ in outcome.probes] == ["prompt", "paraphrase", "unrelated"]
    assert outcome.after[0].split()[0] == "rome" != outcome.before[0].split()[0]
    assert outcome.post["rewrite_acc"] == 1.0 and outcome.pre["rewrite_acc"] == 0.0
    assert "locality" in outcome.post  # the unrelated prompt's own answer, captured before the edit
    assert stack.rows()[0][:2] == [1, method]
    assert not state_equal(tiny_llama, original) or method == "GRACE"  # GRACE edits by a wrapper, not the weights
    stack.undo()
    assert state_equal(tiny_llama, original)
    assert greedy_answers(tiny_llama, word_tok, ["the capital of france"])[0] == outcome.before[0]
    with pytest.raises(AppError, match="no edit to undo"):
        stack.undo()


@pytest.mark.parametrize("method", ("FT-M", "GRACE"))
def test_removing_a_middle_edit_equals_never_making_it(method, word_tok, tiny_overrides):
    requests = [_request(), _request("the mother tongue of tolstoy", "italian", "tolstoy"),
                _request("the sport of the king", "tennis", "king")]
    model = build_tiny_llama(len(word_tok))
    original = snapshot(model)
    reference = copy.deepcopy(model)
    stack = _stack(model, word_tok, tiny_overrides)
    for request in requests:
        stack.edit(method, None, request)
    stack.remove(2)
    assert [row[0] for row in stack.rows()] == [1, 3]
    expected = _stack(reference, word_tok, tiny_overrides)
    for request in (requests[0], requests[2]):
        expected.edit(method, None, request)
    prompts = [r.prompt for r in requests]
    assert greedy_answers(model, word_tok, prompts) == greedy_answers(reference, word_tok, prompts)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(AppError, match="no edit #2"):
        stack.remove(2)
    stack.restore_all()
    assert state_equal(model, original)


def test_a_saved_edit_loads_onto_another_copy_and_undoes(tiny_llama, word_tok, tiny_overrides, tmp_path):
    other = copy.deepcopy(tiny_llama)
    original = snapshot(other)
    stack = _stack(tiny_llama, word_tok, tiny_overrides)
    stack.edit("FT-M", None, _request())
    stack.save(1, tmp_path / "eiffel")
    second = _stack(other, word_tok, tiny_overrides)
    entry = second.load(tmp_path / "eiffel")
    assert entry.describe() == "loaded from eiffel"
    assert state_equal(other, snapshot(tiny_llama))
    second.undo()
    assert state_equal(other, original)
    with pytest.raises(AppError, match="no edit #7"):
        stack.save(7, tmp_path / "x")


def test_sessions_get_their_own_copies_up_to_the_limit(tiny_llama, word_tok, tiny_overrides):
    original = snapshot(tiny_llama)
    bench = Workbench(tiny_llama, word_tok, "tiny", max_sessions=2, overrides=tiny_overrides)
    first, second = bench.session("a"), bench.session("b")
    assert bench.session("a") is first and first.stack.model is not second.stack.model
    with pytest.raises(AppError, match="all 2 model copies are in use"):
        bench.session("c")
    first.stack.edit("FT-M", None, _request())
    assert state_equal(tiny_llama, original) and state_equal(second.stack.model, original)
    bench.release("a")
    assert bench.session("c").stack.entries == []


def test_two_sessions_editing_at_once_keep_their_own_edits(tiny_llama, word_tok, tiny_overrides):
    bench = Workbench(tiny_llama, word_tok, "tiny", max_sessions=2, overrides=tiny_overrides)
    jobs = {"a": _request(), "b": _request("the mother tongue of tolstoy", "italian", "tolstoy")}
    errors: list[BaseException] = []

    def work(session_id: str) -> None:
        try:
            found = bench.session(session_id)
            with found.lock:
                found.stack.edit("FT-M", None, jobs[session_id])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for session_id, request in jobs.items():  # each copy holds its own edit and only that
        alone = EditStack(copy.deepcopy(tiny_llama), word_tok, "tiny", tiny_overrides)
        alone.edit("FT-M", None, request)
        assert state_equal(bench.session(session_id).stack.model, snapshot(alone.model)), session_id


def test_compare_runs_each_method_from_the_unedited_model(tiny_llama, word_tok, tiny_overrides):
    original = snapshot(tiny_llama)
    bench = Workbench(tiny_llama, word_tok, "tiny", overrides=tiny_overrides)
    probes, before, rows = bench.compare(["FT-M", "GRACE", "ROME"], _request(subject=None))
    assert state_equal(tiny_llama, original)
    assert len(before) == len(probes) == 3
    by_method = {row.method: row for row in rows}
    assert by_method["FT-M"].answers[0].split()[0] == "rome" and by_method["FT-M"].scores["rewrite_acc"] == 1.0
    assert by_method["GRACE"].answers[0].split()[0] == "rome"
    assert "subject" in by_method["ROME"].error and by_method["ROME"].seconds is None  # its row, not a crash
    with pytest.raises(AppError, match="at least one method"):
        bench.compare([], _request())


def test_trace_reports_a_layer_on_the_sessions_model(tiny_llama, word_tok, tiny_overrides):
    bench = Workbench(tiny_llama, word_tok, "tiny", overrides=tiny_overrides)
    seen: list[float] = []
    trace, info = bench.trace("a", "the capital of france is", "france", samples=2,
                              progress=lambda f, _what: seen.append(f))
    assert 0 <= info["layer"] < 3 and info["edits"] == 0 and info["kind"] == "mlp"
    assert trace.restored["mlp"].shape[1] == 3 and seen and max(seen) <= 1.0
    with pytest.raises(AppError, match="does not occur"):
        bench.trace("a", "the capital of france is", "germany")
