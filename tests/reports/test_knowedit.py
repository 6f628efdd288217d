"""KnowEdit's table from run summaries, printed as KnowEdit prints it."""

from __future__ import annotations

import pytest

from lmedit.reports.knowedit import cost_table, knowedit_rows, knowedit_table, run_cost


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


def test_cost_counts_edits_and_scores_of_every_session_and_the_last_capture():
    timing = {"edit_seconds_total": 100.0, "post_eval_seconds_total": 320.0, "pre_eval_seconds_this_session": 40.0,
              "edit_seconds_per_request": 2.0, "wall_seconds_this_session": 12.0}
    assert run_cost({"timing": timing}) == {"seconds_per_edit": 2.0, "work_minutes": pytest.approx(460 / 60)}
    assert run_cost({"timing": {"edit_seconds_per_request": 2.0}})["work_minutes"] is None  # an old summary
    runs = [_run("FT-M", "/d/ZsRE-test-all.json", {}), _run("ROME", "/d/ZsRE-test-all.json", {}),
            _run("ROME", "/d/wikibio-test-all.json", {})]
    for run, seconds in zip(runs, (60.0, 600.0, 1200.0)):
        run["summary"]["timing"] = {**timing, "edit_seconds_total": seconds, "edit_seconds_per_request": seconds / 10}
    table = cost_table(knowedit_rows(runs))
    assert table.splitlines()[0] == "| Dataset | FT-M | ROME | total min |"
    assert "| ZsRE | 6.0 · 7.0 | 60.0 · 16.0 | 23.0 |" in table  # (60 + 320 + 40) / 60 and (600 + 360) / 60
    assert "| WikiBio | — | 120.0 · 26.0 | 26.0 |" in table


def test_groups_and_realistic_scores_get_their_own_rows():
    runs = [
        _run("FT-M", "/d/recent_test.json", {"rewrite_acc": 0.9, "portability": 0.5, "portability/Reasoning": 0.4,
                                             "portability/Subject_Aliasing": 0.6, "locality": 0.7,
                                             "locality/Relation_Specificity": 0.65, "locality/Forgetfulness": 0.75,
                                             "rewrite_qa_em": 0.3, "rewrite_qa_f1": 0.45}),
        _run("ROME", "/d/recent_test.json", {"rewrite_acc": 0.8, "locality": 0.5, "locality/Relation_Specificity": 0.2}),
    ]
    table = knowedit_table(knowedit_rows(runs))
    lines = [line.split(" | ")[1] for line in table.splitlines()[2:]]
    assert lines == ["Edit Succ.", "Edit Succ. (QA EM)", "Edit Succ. (QA F1)", "Portability", "· Reasoning",
                     "· Subject_Aliasing", "Locality", "· Relation_Specificity", "· Forgetfulness"]
    assert "|  | · Relation_Specificity | 65.00 | 20.00 |" in table
    assert "|  | Edit Succ. (QA EM) | 30.00 | — |" in table
    assert table.splitlines()[2].startswith("| WikiData_recent (n=10) | Edit Succ. |")


def test_qa_layout_puts_realistic_scores_beside_teacher_forced_ones():
    from lmedit.reports import get_layout

    runs = [_run("EMMET", "/d/zsre.json", {"rewrite_acc": 0.998, "rephrase_acc": 0.94, "locality": 0.97,
                                            "rewrite_qa_contains": 0.42, "rewrite_qa_em": 0.07, "locality_qa_em": 0.75}),
            _run("FT-M", "/d/zsre.json", {"rewrite_acc": 0.95})]
    layout = get_layout("qa")
    table = layout.table(layout.rows(runs))
    assert table.splitlines()[0].startswith("| method | protocol | n | rewrite | rephrase | locality | portability | QA rewrite contains")
    assert "| EMMET | single | 10 | 0.998 | 0.940 | 0.970 | — | 0.420 | 0.070 | — | — | — | 0.750 |" in table
    assert "| FT-M | single | 10 | 0.950 | — |" in table


def test_the_easyedit_sanitation_row_reads_generated_success_and_locality():
    """EasyEdit's Sanitation script scores test questions and kept questions by generation; other rows teacher-forced."""
    from lmedit.reports.knowedit import SANITATION_EASYEDIT, dataset_label, knowedit_values

    summary = {"post": {"rewrite_acc": 1.0, "rephrase_qa_contains": 0.5, "locality": 0.7, "locality_qa_f1": 0.2,
                        "rewrite_qa_em": 0.9, "fluency": 4.0}}
    easyedit = knowedit_values(summary, SANITATION_EASYEDIT)
    assert (easyedit["Edit Succ."], easyedit["· edited questions"]) == (50.0, 100.0)
    assert (easyedit["Locality"], easyedit["· teacher-forced"], easyedit["Fluency"]) == (20.0, 70.0, 400.0)
    assert easyedit["Edit Succ. (QA EM)"] is None
    plain = knowedit_values(summary, "Sanitation")
    assert (plain["Edit Succ."], plain["Locality"], plain["Edit Succ. (QA EM)"]) == (100.0, 70.0, 90.0)
    assert plain["· edited questions"] is None and plain["· teacher-forced"] is None
    config = {"data": "x/trivia_qa_train.json", "extra": {"data_format": "sanitation-easyedit"}}
    assert dataset_label(config) == SANITATION_EASYEDIT
    assert dataset_label({"data": "x/trivia_qa_train.json"}) == "Sanitation (train)"
