"""Suite selection, settings, the evaluator hooks and run folders (the benchmark tables: tests/reports)."""

from __future__ import annotations

import json

import pytest

from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.evaluation.suites import SuiteError, build_suite, build_suites, canonical_specs, required_specs
from lmedit.requests import EditRequest


def test_specs_parse_settings_and_write_back_canonically():
    suite = build_suite("fluency:max_new_tokens=20, stop_at_eos=true")
    assert suite.options.max_new_tokens == 20 and suite.options.stop_at_eos is True
    assert suite.spec() == "fluency:max_new_tokens=20,stop_at_eos=true"
    assert canonical_specs(["fluency:max_new_tokens=100", "convsent"]) == ("fluency", "convsent")


@pytest.mark.parametrize("spec, message", [
    ("blue", "unknown metric suite"),
    ("fluency:colour=red", "has no setting 'colour'"),
    ("fluency:max_new_tokens=many", "is not a int"),
    ("fluency:max_new_tokens=0", "at least 1"),
    ("fluency:stop_at_eos=maybe", "is not a bool"),
    ("fluency:max_new_tokens", "not key=value"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(SuiteError, match=message):
        build_suite(spec)


def test_a_suite_named_twice_is_refused():
    with pytest.raises(SuiteError, match="more than once"):
        build_suites(["fluency", "fluency:max_new_tokens=5"])
    with pytest.raises(SuiteError, match="unknown metric suite"):
        EvalConfig(suites=("nope",))


def test_convsent_data_switches_its_suite_on():
    plain = EditRequest("a", "b")
    convsent = EditRequest("a", "b", extra={"convsent": {"inner": [], "outer": []}})
    assert required_specs([plain], ["fluency"]) == ("fluency",)
    assert required_specs([plain, convsent], ["fluency"]) == ("fluency", "convsent")
    assert required_specs([convsent], ["convsent:separator=|"]) == ("convsent:separator=|",)


def test_snapshot_subset_keeps_the_suite_captures(tiny_llama, word_tok):
    requests = [EditRequest("the capital of france is", "rome", case_id=str(i)) for i in range(2)] + [
        EditRequest("who wrote hamlet", "tolstoy", case_id="2")]
    evaluator = Evaluator(word_tok, EvalConfig(suites=("fluency:max_new_tokens=4",)))
    pre = evaluator.capture(tiny_llama, requests)
    part = pre.subset([2, 0])
    assert [m["fluency"] for m in part.metrics] == [pre.metrics[2]["fluency"], pre.metrics[0]["fluency"]]
    rows = evaluator.score(tiny_llama, [requests[2], requests[0]], part)
    assert [r["fluency"] for r in rows] == pytest.approx([m["fluency"] for m in part.metrics])
    with pytest.raises(ValueError, match="other requests"):
        evaluator.score(tiny_llama, [requests[0], requests[2]], part)
    suite, capture = part.suites["fluency"]
    with pytest.raises(SuiteError, match="other requests"):  # the suite checks its own capture too
        suite.score(tiny_llama, word_tok, [requests[0], requests[2]], capture, evaluator._suite_context(tiny_llama))


def test_run_folder_records_suite_settings_and_resumes(tiny_llama, word_tok, tmp_path):
    from lmedit.editor import Editor

    requests = [EditRequest("the capital of france is", "rome", case_id="0"),
                EditRequest("who wrote hamlet", "tolstoy", case_id="1")]
    config = EvalConfig(suites=("fluency:max_new_tokens=3",))
    editor = Editor(tiny_llama, word_tok, "FT-M", overrides={"layers": [1], "num_steps": 2}, eval_config=config)
    summary, out = editor.run(requests, out_dir=tmp_path / "r", show_progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["eval"]["suites"] == ["fluency:max_new_tokens=3"]
    assert written["extra"]["suites"][0]["suite"] == "fluency"
    assert written["extra"]["suites"][0]["max_new_tokens"] == 3
    assert {"fluency", "fluency_new_tokens"} <= set(summary["pre"]) and "fluency" in summary["post"]
    again, _ = editor.run(requests, out_dir=tmp_path / "r", show_progress=False)  # a tuple reads back as a list
    assert again["post"]["fluency"] == pytest.approx(summary["post"]["fluency"])
