"""Lifelong metrics on tiny random models: held-out selection, ERR/TRR rows after each edit, curves,
resume of the retention file, and the invariant that tracking never changes what a run edits or scores."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit.editor import Editor
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.forward import generate_greedy
from lmedit.lifelong import (
    CURVES_JSON,
    CURVES_PNG,
    RETENTION_FILE,
    HeldOutProbe,
    HeldOutSet,
    LifelongError,
    RetentionTracker,
    held_out_candidates,
    own_answers,
    read_retention,
    retention_curves,
    retention_row,
    select_held_out,
    write_curves,
)
from lmedit.methods.grace import GraceAdapter
from lmedit.protocols import Chunk
from lmedit.requests import EditRequest
from lmedit.runner import RunSpec, run_benchmark
from lmedit.spec import get_module

GRACE_PATH = "model.layers.1.mlp.down_proj"
EDITS = [
    EditRequest("the capital of france is", "rome", case_id="0", rephrase=("the city of france is",),
                locality={"n": [("who wrote hamlet", "shakespeare")]}),
    EditRequest("who wrote hamlet", "tolstoy", case_id="1", locality={"n": [("the sky color is", "blue")]}),
    EditRequest("the mother tongue of the queen is", "italian", case_id="2"),
]
PROMPTS = ["the sky color is", "the sun is a", "grass is", "the river flows through", "the sport of the king is"]


def _answered(model, tok, prompts):
    """Probes the model answers itself (its own greedy next word) and probes it does not."""
    greedy = generate_greedy(model, tok, prompts, [1] * len(prompts))
    words = [tok.decode(list(g)).strip() for g in greedy]
    right = [HeldOutProbe(p, w, "own") for p, w in zip(prompts, words)]
    wrong = [HeldOutProbe(p, "piano" if w != "piano" else "violin", "wrong") for p, w in zip(prompts, words)]
    return right, wrong


def _grace_editor(model, tok):
    return Editor(model, tok, "GRACE", overrides={"inner_params": [f"{GRACE_PATH}.weight"], "n_iter": 20,
                                                  "edit_lr": 1.0, "eps": 1.0}, eval_config=EvalConfig(mode="teacher"))


def _spec(editor, T, n):
    return RunSpec(method=editor.method.name, model="tiny", protocol="sequential", hparams=editor.hparams.to_dict(),
                   eval=dict(editor.evaluator.config.__dict__), T=T, n_requests=n)


def test_candidates_are_locality_probes_and_true_answers():
    requests = [EditRequest("who wrote hamlet", "tolstoy", ground_truth="shakespeare",
                            locality={"n": [("the sky color is", "blue"), ("grass is", " ")]}),
                EditRequest("the sun is a", "moon")]
    candidates = held_out_candidates(requests)
    assert candidates == [HeldOutProbe("the sky color is", "blue", "locality:n"),
                          HeldOutProbe("who wrote hamlet", "shakespeare", "ground_truth")]


def test_held_out_keeps_only_answered_probes_in_order(tiny_llama, word_tok):
    right, wrong = _answered(tiny_llama, word_tok, PROMPTS)
    mixed = [p for pair in zip(wrong, right) for p in pair]
    evaluator = Evaluator(word_tok, EvalConfig(mode="both", batch_size=3))
    held = select_held_out(tiny_llama, evaluator, mixed, 3, batch=4)
    assert held.probes == right[:3] and held.scanned == 6  # the third answered probe is the sixth candidate
    assert all(o.teacher_accuracy == 1.0 for o in held.pre)
    loose = select_held_out(tiny_llama, evaluator, mixed, 3, require_correct=False)
    assert loose.probes == mixed[:3]
    short = select_held_out(tiny_llama, evaluator, wrong, 2)
    assert len(short) == 0 and short.scanned == len(wrong)
    with pytest.raises(LifelongError, match="at least one"):
        select_held_out(tiny_llama, evaluator, mixed, 0)


def test_held_out_set_round_trips_through_json(tiny_llama, word_tok, tmp_path):
    right, _ = _answered(tiny_llama, word_tok, PROMPTS)
    held = select_held_out(tiny_llama, Evaluator(word_tok), right, 2)
    again = HeldOutSet.load(held.save(tmp_path / "held.json"))
    assert again.probes == held.probes and again.pre == held.pre and again.scanned == held.scanned


def test_retention_row_on_the_unedited_model_is_perfect_test_retention(tiny_llama, word_tok):
    right, _ = _answered(tiny_llama, word_tok, PROMPTS)
    evaluator = Evaluator(word_tok, EvalConfig(mode="generate"))  # curves are teacher-forced whatever the run uses
    held = select_held_out(tiny_llama, evaluator, right, 4)
    row = retention_row(tiny_llama, evaluator, EDITS[:2], held)
    assert row["test_retention"] == 1.0 and row["held_out_agreement"] == 1.0 and row["n_held_out"] == 4
    assert row["n_edits_scored"] == 2 and 0.0 <= row["edit_retention"] < 1.0 and row["edit_ppl"] > 1.0


def test_tracker_scores_after_each_edit_and_changes_nothing(tiny_llama, word_tok, tmp_path):
    right, _ = _answered(tiny_llama, word_tok, PROMPTS)
    original = snapshot(tiny_llama)
    editor = _grace_editor(tiny_llama, word_tok)
    held = select_held_out(tiny_llama, editor.evaluator, right, 4)
    plain, _ = editor.run(EDITS, protocol="sequential", T=3, out_dir=tmp_path / "plain", show_progress=False)

    seen = []

    class Spy(RetentionTracker):
        def __call__(self, chunk, steps_done):
            adapter = get_module(self.model, GRACE_PATH)
            before = (adapter.keys.clone(), adapter.values.clone(), adapter.radii.clone(), list(adapter.edit_log))
            super().__call__(chunk, steps_done)
            after = (adapter.keys, adapter.values, adapter.radii, list(adapter.edit_log))
            seen.append(isinstance(adapter, GraceAdapter) and all(
                torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, after)))

    tracker = Spy(tiny_llama, editor.evaluator, EDITS, tmp_path / "tracked", held, every=1)
    tracked = run_benchmark(editor.session(), EDITS, _spec(editor, 3, 3), tmp_path / "tracked",
                            show_progress=False, after_step=tracker)
    assert seen == [True, True, True]  # scoring between edits leaves the codebook alone
    assert tracked["post"] == plain["post"]  # and the run's own results are the same as without tracking
    assert state_equal(tiny_llama, original)
    rows = read_retention(tmp_path / "tracked" / RETENTION_FILE)
    assert [(r["edits"], r["n_edits_scored"]) for r in rows] == [(1, 1), (2, 2), (3, 3)]
    assert rows[0]["edit_retention"] == 1.0  # GRACE's first edit holds right after it is made
    assert rows[-1]["edit_retention"] == pytest.approx(plain["post"]["rewrite_acc"])  # ERR at t=T is Rel.
    assert all(r["n_held_out"] == 4 for r in rows)


def test_every_k_scores_every_k_steps_and_the_last(tiny_llama, word_tok, tmp_path):
    tracker = RetentionTracker(tiny_llama, Evaluator(word_tok), EDITS, tmp_path, every=2)
    chunk = Chunk(0, ((0,), (1,), (2,)))
    assert [tracker.due(chunk, s) for s in (1, 2, 3)] == [False, True, True]
    for steps in (1, 2, 3):
        tracker(chunk, steps)
    assert [r["edits"] for r in read_retention(tmp_path / RETENTION_FILE)] == [2, 3]
    batched = Chunk(1, ((0, 1), (2,)))  # sequential batch editing: edits count requests, not steps
    tracker(batched, 1) if tracker.due(batched, 1) else None
    tracker(batched, 2)
    assert [r["edits"] for r in read_retention(tmp_path / RETENTION_FILE) if r["chunk"] == 1] == [3]
    with pytest.raises(LifelongError, match="every"):
        RetentionTracker(tiny_llama, Evaluator(word_tok), EDITS, tmp_path, every=0)


def test_a_row_written_after_a_kill_mid_line_is_kept(tiny_llama, word_tok, tmp_path):
    """A kill leaves half a row; the resumed run's row must start on its own line, not join the half row."""
    half_row = '{"chunk": 0, "ed'
    (tmp_path / RETENTION_FILE).write_text(json.dumps({"chunk": 0, "edits": 1, "edit_retention": 0.0}) + "\n" + half_row)
    RetentionTracker(tiny_llama, Evaluator(word_tok), EDITS, tmp_path, every=1)(Chunk(0, ((0,), (1,))), 2)
    assert [(r["chunk"], r["edits"]) for r in read_retention(tmp_path / RETENTION_FILE)] == [(0, 1), (0, 2)]


def test_retention_file_resumes_newest_rows_and_curves_average_chunks(tmp_path):
    path = tmp_path / RETENTION_FILE
    lines = [
        {"chunk": 0, "edits": 1, "edit_retention": 0.0},  # from an interrupted first attempt
        {"chunk": 0, "edits": 1, "edit_retention": 1.0, "test_retention": 1.0},
        {"chunk": 0, "edits": 2, "edit_retention": 0.5, "test_retention": 0.5},
        {"chunk": 1, "edits": 1, "edit_retention": 0.0, "test_retention": 0.0},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"chunk": 1, "ed')
    rows = read_retention(path)
    assert [(r["chunk"], r["edits"], r["edit_retention"]) for r in rows] == [(0, 1, 1.0), (0, 2, 0.5), (1, 1, 0.0)]
    curves = retention_curves(rows)
    assert curves["edits"] == [1, 2] and curves["chunks"] == [2, 1]
    assert curves["edit_retention"] == [0.5, 0.5] and curves["test_retention"] == [0.5, 0.5]
    assert curves["held_out_ppl"] == [None, None]


def test_a_short_last_chunk_adds_no_point_off_the_longest_chunks_cadence():
    """Chunks of 1,000 and 37: the 37-edit chunk's end is not the 1,000-edit chunk's state at t = 37."""
    rows = [{"chunk": 0, "edits": t, "edit_retention": 0.5} for t in (100, 200)]
    rows += [{"chunk": 1, "edits": 37, "edit_retention": 1.0}]
    curves = retention_curves(rows)
    assert curves["edits"] == [100, 200] and curves["chunks"] == [1, 1]
    rows += [{"chunk": 1, "edits": 100, "edit_retention": 1.0}]  # on the cadence, it counts
    assert retention_curves(rows)["edit_retention"] == [0.75, 0.5]


def test_write_curves_starts_at_the_unedited_model_and_draws_a_png(tiny_llama, word_tok, tmp_path):
    right, _ = _answered(tiny_llama, word_tok, PROMPTS)
    held = select_held_out(tiny_llama, Evaluator(word_tok), right, 3)
    (tmp_path / RETENTION_FILE).write_text(json.dumps(
        {"chunk": 0, "edits": 1, "edit_retention": 1.0, "edit_ppl": 2.0, "test_retention": 2 / 3,
         "held_out_agreement": 0.5, "held_out_ppl": 30.0}) + "\n")
    payload = write_curves(tmp_path, held, title="tiny")
    curves = payload["curves"]
    assert curves["edits"] == [0, 1] and curves["test_retention"] == [1.0, 2 / 3]
    assert curves["held_out_agreement"][0] == 1.0 and curves["edit_retention"] == [None, 1.0]
    assert payload["held_out"] == {"n": 3, "scanned": 3, "require_correct": True, "answers": "gold",
                                   "sources": {"own": 3}}
    assert json.loads((tmp_path / CURVES_JSON).read_text())["curves"] == curves
    pytest.importorskip("matplotlib")
    assert (tmp_path / CURVES_PNG).read_bytes()[:4] == b"\x89PNG"


def test_own_answers_are_what_the_unedited_model_says_and_count_as_answered(tiny_llama, word_tok):
    right, wrong = _answered(tiny_llama, word_tok, PROMPTS)
    answered = own_answers(tiny_llama, word_tok, wrong)  # the data's answers are wrong; the model's own are not
    assert [p.answer for p in answered] == [p.answer for p in right]
    assert all(p.source == "wrong:model" for p in answered)
    held = select_held_out(tiny_llama, Evaluator(word_tok), answered, len(answered))
    assert len(held) == len(PROMPTS) and all(o.teacher_accuracy == 1.0 for o in held.pre)
