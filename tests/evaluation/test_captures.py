"""Pre-edit captures reused across runs: only on the same unedited model, settings and requests."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmedit import model_state
from lmedit.editor import Editor
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.evaluation.captures import KEPT, capture_reusing
from lmedit.requests import EditRequest
from lmedit.routing import Route, attach_router, detach_router

REQUESTS = [
    EditRequest("the capital of france is", "rome", rephrase=["the capital of paris is"],
                locality={"nb": [("the sky is", "blue")]}, case_id="0"),
    EditRequest("who wrote hamlet", "tolstoy", locality={"nb": [("the grass is", "green")]}, case_id="1"),
    EditRequest("the eiffel tower is located in", "berlin", case_id="2"),
]


@pytest.fixture
def captures(monkeypatch):
    """How many captures were really computed (each one runs every probe)."""
    made: list[int] = []
    real = Evaluator.capture

    def counting(self, model, requests, progress=None):
        made.append(len(requests))
        return real(self, model, requests, progress)

    monkeypatch.setattr(Evaluator, "capture", counting)
    return made


def _same(a, b) -> bool:
    return a.probes == b.probes and a.outcomes == b.outcomes and a.metrics == b.metrics


def test_the_same_requests_or_some_of_them_reuse_the_capture(tiny_llama, word_tok, captures):
    evaluator = Evaluator(word_tok, EvalConfig(mode="both", suites=("qa:max_new_tokens=3",)))
    first = capture_reusing(evaluator, tiny_llama, REQUESTS)
    again = capture_reusing(Evaluator(word_tok, EvalConfig(mode="both", suites=("qa:max_new_tokens=3",))),
                            tiny_llama, REQUESTS)
    some = capture_reusing(evaluator, tiny_llama, [REQUESTS[2], REQUESTS[0]])
    assert captures == [3]
    assert _same(again, first)
    fresh = evaluator.capture(tiny_llama, [REQUESTS[2], REQUESTS[0]])
    assert _same(some, fresh)
    assert some.suites["qa"][1].states == fresh.suites["qa"][1].states
    # what a caller does to its capture never reaches the kept one
    kept = copy.deepcopy(first)
    first.outcomes.clear()
    again.probes.clear()
    assert _same(capture_reusing(evaluator, tiny_llama, REQUESTS), kept)


def test_changed_weights_modules_hooks_settings_or_requests_get_a_fresh_capture(tiny_llama, word_tok, captures):
    evaluator = Evaluator(word_tok, EvalConfig())
    capture_reusing(evaluator, tiny_llama, REQUESTS)
    weight = tiny_llama.model.layers[1].mlp.down_proj.weight
    original = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] += 1e-6  # one value, barely: still another model
    capture_reusing(evaluator, tiny_llama, REQUESTS)
    with torch.no_grad():
        weight[0, 0] = original  # restored exactly: the first capture is valid again
    capture_reusing(evaluator, tiny_llama, REQUESTS)
    assert captures == [3, 3]
    capture_reusing(Evaluator(word_tok, EvalConfig(packing=False)), tiny_llama, REQUESTS)
    capture_reusing(evaluator, tiny_llama, REQUESTS + [EditRequest("the sun is", "red", case_id="3")])
    hook = tiny_llama.model.layers[0].register_forward_hook(lambda *_: None)
    try:
        capture_reusing(evaluator, tiny_llama, REQUESTS)
    finally:
        hook.remove()
    router = Prefixing()
    attach_router(tiny_llama, router)
    try:
        capture_reusing(evaluator, tiny_llama, REQUESTS)
    finally:
        detach_router(tiny_llama, router)
    capture_reusing(evaluator, tiny_llama, [REQUESTS[0], REQUESTS[0]])  # the same request twice: captured as given
    assert captures == [3, 3, 3, 4, 3, 3, 2]


class Prefixing:
    kind = "prefixing"

    def route(self, model, tok, prompts):
        return [Route("the sky is " + p) for p in prompts]


def test_only_a_few_captures_are_kept_per_model(tiny_llama, word_tok, captures):
    for size in range(1, KEPT + 2):
        capture_reusing(Evaluator(word_tok, EvalConfig(batch_size=size)), tiny_llama, REQUESTS)
    assert len(model_state.slot(tiny_llama, "pre-edit captures")) == KEPT
    capture_reusing(Evaluator(word_tok, EvalConfig(batch_size=KEPT + 1)), tiny_llama, REQUESTS)  # the newest: kept
    capture_reusing(Evaluator(word_tok, EvalConfig(batch_size=1)), tiny_llama, REQUESTS)  # the oldest: dropped
    assert captures == [3] * (KEPT + 2)


def test_a_second_method_s_run_reuses_the_first_s_capture_and_writes_the_same_results(tiny_llama, word_tok,
                                                                                       tmp_path, captures):
    def run(method, overrides, folder):
        editor = Editor(tiny_llama, word_tok, method, overrides=overrides)
        editor.run(REQUESTS, out_dir=tmp_path / folder, show_progress=False)
        return [json.loads(line)["pre"] for line in (tmp_path / folder / "results.jsonl").read_text().splitlines()]

    ft = {"layers": [1], "lr": 5e-2, "num_steps": 5}
    first = run("FT-M", ft, "ftm")
    second = run("FT-L", ft, "ftl")  # restored after each edit: the same unedited model
    assert captures == [3]
    model_state.reset(tiny_llama)
    alone = run("FT-L", ft, "ftl-alone")
    assert captures == [3, 3]
    assert first == second == alone
