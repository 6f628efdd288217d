"""Suite selection, settings, the evaluator hooks, run folders and the benchmark tables."""

from __future__ import annotations

import json

import pytest

from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.evaluation.suites import SuiteError, build_suite, build_suites, canonical_specs, required_specs
from lmedit.evaluation.suites.layouts import counterfact_rows, counterfact_table, knowedit_rows, knowedit_table
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
        suite.score(tiny_llama, word_tok, [requests[0], requests[2]], capture, evaluator._suite_context())


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


def _run(method: str, data: str, post: dict, pre: dict | None = None, n: int = 10) -> dict:
    return {"folder": f"/runs/{method}", "config": {"method": method, "data": data, "protocol": "single"},
            "summary": {"n": n, "pre": pre or {}, "post": post, "complete": True}}


def test_knowedit_table_as_knowedit_prints_it():
    runs = [
        _run("FT-M", "/d/ZsRE-test-all.json", {"rewrite_acc": 0.9, "portability": 0.5, "locality": 0.25, "fluency": 5.5}),
        _run("ROME", "/d/ZsRE-test-all.json", {"rewrite_acc": 0.8, "locality": 0.5}),
        _run("FT-M", "/d/blender_test.json", {"convsent_es": 0.4, "convsent_kl": 0.123, "rewrite_acc": 1.0}),
    ]
    rows = knowedit_rows(runs)
    assert rows[0]["Edit Succ."] == pytest.approx(90.0) and rows[0]["Fluency"] == pytest.approx(550.0)
    assert rows[2]["dataset"] == "ConvSent" and rows[2]["Edit Succ."] == pytest.approx(40.0)
    assert rows[2]["Locality"] == pytest.approx(0.123)  # KL is shown as is
    table = knowedit_table(rows)
    assert table.splitlines()[0] == "| Dataset | Metric | FT-M | ROME |"
    assert "| ZsRE (n=10) | Edit Succ. | 90.00 | 80.00 |" in table
    assert "|  | Portability | 50.00 | — |" in table
    assert "|  | Locality (KL ↓) | 0.1230 | — |" in table
    assert "Portability" not in table.split("ConvSent")[1]


def test_counterfact_table_has_romes_harmonic_score():
    post = {"cf_efficacy": 1.0, "cf_paraphrase": 0.5, "cf_neighborhood": 0.25, "cf_generation_entropy": 6.0}
    rows = counterfact_rows([_run("ROME", "/d/cf.json", post, pre={"cf_efficacy": 0.2, "cf_paraphrase": 0.2,
                                                                      "cf_neighborhood": 0.8})])
    assert rows[0]["S_post"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 25))
    assert rows[0]["GE_post"] == pytest.approx(600.0)
    table = counterfact_table(rows)
    assert "| ROME | 10 | post | 42.9 | 100.0 | 50.0 | 25.0 |" in table
