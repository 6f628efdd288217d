"""Lifelong methods on the embedded SmolLM2-135M model and the real zsRE file (select with -m embedded).

The tiny-model tests check each invariant; these check that the SmolLM2 presets really edit the real
model: edits accumulate and hold, GRACE rolls one back, locality holds, and restore is bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit.data import load_requests
from lmedit.editor import Editor
from lmedit.handles import restore_all
from lmedit.methods.grace import rollback

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def zsre(shared_data):
    return load_requests(shared_data / "zsre" / "zsre_mend_eval_portability_gpt4.json", offset=100, limit=6)


def _rewrite(editor, requests, pre):
    return [scores["rewrite_acc"] for scores in editor.evaluate(requests, pre)]


def test_grace_edits_accumulate_and_any_one_rolls_back(embedded, zsre):
    model, tok = embedded
    original = snapshot(model)
    editor = Editor(model, tok, "GRACE", preset="smollm2-135m")
    requests = zsre[:3]
    pre = editor.capture(requests)
    handles = [editor.apply(r) for r in requests]
    after = editor.evaluate(requests, pre)
    assert [s["rewrite_acc"] for s in after] == [1.0, 1.0, 1.0]
    assert all(s["locality"] == 1.0 for s in after)
    rollback(model, handles[1].edit_ids[0])  # the middle edit goes, the other two stay
    rolled = _rewrite(editor, requests, pre)
    assert rolled[0] == rolled[2] == 1.0 and rolled[1] == pre.metrics[1]["rewrite_acc"]
    restore_all(handles)
    assert state_equal(model, original)


def test_wise_keeps_every_edit_in_its_own_memory_and_restores_exactly(embedded, zsre, shared_data):
    model, tok = embedded
    original = snapshot(model)
    irrelevant = shared_data / "wise" / "hallucination" / "hallucination-train.json"
    editor = Editor(model, tok, "WISE", preset="smollm2-135m", overrides={"irrelevant_file": str(irrelevant)})
    requests = zsre[3:6]
    pre = editor.capture(requests)
    torch.manual_seed(0)
    handles, right_after = [], []
    for i, request in enumerate(requests):
        handles.append(editor.apply(request))
        right_after.append(_rewrite(editor, [request], pre.subset([i]))[0])
    after = editor.evaluate(requests, pre)
    adapter = handles[-1].adapter
    assert len(adapter.memories) == 3  # the preset stores a memory per edit
    assert [s["rewrite_acc"] for s in after] == right_after  # nothing forgotten as edits accumulate
    assert sum(right_after) > sum(p["rewrite_acc"] for p in pre.metrics) + 1.0
    assert min(s["locality"] for s in after) >= 0.8
    restore_all(handles)
    assert state_equal(model, original)


def test_defer_edits_under_teacher_forcing_and_restores_exactly(embedded, zsre):
    model, tok = embedded
    original = snapshot(model)
    editor = Editor(model, tok, "DEFER", preset="smollm2-135m")
    assert editor.evaluator.config.generation_cache is False  # scored by generation as EasyEdit does
    request = zsre[0]
    pre = editor.capture([request])
    handle = editor.apply(request)
    post = editor.evaluate([request], pre)[0]
    assert post["rewrite_acc"] > pre.metrics[0]["rewrite_acc"]
    handle.restore()
    assert state_equal(model, original)


def test_melo_edits_are_routed_only_to_their_prompts(embedded, zsre):
    """Two MELO edits in a row on the embedded model: both hold, locality is untouched, restore is exact."""
    model, tok = embedded
    original = snapshot(model)
    editor = Editor(model, tok, "MELO", preset="smollm2-135m")
    requests = zsre[:2]
    pre = editor.capture(requests)
    handles = [editor.apply(r) for r in requests]
    post = editor.evaluate(requests, pre)
    for handle in reversed(handles):
        handle.restore()
    assert state_equal(model, original)
    assert all(row["rewrite_acc"] == 1.0 for row in post)
    assert all(row["locality"] == 1.0 for row in post)
