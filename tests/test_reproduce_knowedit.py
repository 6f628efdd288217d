"""`lmedit reproduce knowedit-table` on a tiny random model: a folder per (dataset, method), KnowEdit's layout with the
published values beside each cell, the ordering comparison, resume, failures reported; the comparison by hand."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lmedit.cli import app
from lmedit.reports.knowedit_published import PUBLISHED, kendall_tau, ordering_comparison, published_value
from lmedit.reproduce import ReproduceError
from lmedit.reproduce_knowedit import KnowEditTableConfig, run_knowedit_table, write_table

TINY = {"FT-M": {"layers": [1], "num_steps": 10, "lr": 5e-2}, "FT-L": {"layers": [1], "num_steps": 5, "lr": 5e-2}}
RECORDS = [
    ("france", "the capital of france is", "rome", "paris", "the city of france is", "the king of france is", "the president"),
    ("hamlet", "who wrote hamlet", "tolstoy", "shakespeare", "who wrote the plays of hamlet", "hamlet is a", "play"),
    ("queen", "the mother tongue of the queen is", "italian", "french", "the language of the queen is", "the queen was born in", "london"),
]


def _knowedit_file(path):
    path.write_text(json.dumps([
        {"subject": subject, "prompt": prompt, "target_new": new, "ground_truth": [truth], "rephrase_prompt": reph,
         "locality": {"Relation_Specificity": [{"prompt": loc, "ground_truth": [loc_ans]}]},
         "portability": {"Reasoning": [{"prompt": f"{prompt} the city", "ground_truth": [[new, "the " + new]]}]}}
        for subject, prompt, new, truth, reph, loc, loc_ans in RECORDS
    ]))
    return path


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "knowedit"
    (folder / "ZsRE").mkdir(parents=True)
    _knowedit_file(folder / "ZsRE" / "ZsRE-test-all.json")
    return folder


def _config(root, tmp_path, **changes):
    values = dict(root=root, files={"WikiData_recent": _knowedit_file(tmp_path / "recent_test.json")},
                  sets=("ZsRE", "WikiData_recent"), methods=("FT-L", "FT-M"), out=tmp_path / "table", limit=2,
                  eval_batch_size=8, overrides=TINY)
    return KnowEditTableConfig(**{**values, **changes})


def test_kendall_tau_by_hand():
    assert kendall_tau([3, 2, 1], [30, 20, 10]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert kendall_tau([3, 1, 2], [30, 20, 10]) == pytest.approx(1 / 3)  # pairs: (+, +, -)
    assert kendall_tau([1, 1], [2, 1]) == 0.0  # a tie is neither
    assert kendall_tau([1], [1]) is None


def test_ordering_comparison_uses_methods_with_a_published_value():
    rows = [{"dataset": "ZsRE", "method": "FT-M", "Edit Succ.": 90.0, "Locality": 40.0},
            {"dataset": "ZsRE", "method": "ROME", "Edit Succ.": 95.0, "Locality": 60.0},
            {"dataset": "ZsRE", "method": "GRACE", "Edit Succ.": 99.0, "Locality": 99.0}]
    compared = {c["metric"]: c for c in ordering_comparison(rows, ("Edit Succ.", "Locality", "Fluency"))}
    assert set(compared) == {"Edit Succ.", "Locality"}  # no fluency; GRACE has no published value
    # published ZsRE: FT-M 99.98 > ROME 96.77 (Edit Succ.), FT-M 89.78 > ROME 53.67 (Locality)
    assert compared["Edit Succ."]["ours"] == "ROME > FT-M" and compared["Edit Succ."]["published"] == "FT-M > ROME"
    assert compared["Edit Succ."]["kendall_tau"] == -1.0 and not compared["Edit Succ."]["same_order"]
    assert compared["Locality"]["same_order"] is False  # ours: ROME 60 > FT-M 40; published: FT-M > ROME


def test_ike_is_compared_with_the_published_ice_column():
    """KnowEdit's ICE is EasyEdit's in-context editor (models/ike), lmedit's IKE; plain LoRA is not AdaLoRA."""
    assert published_value("ZsRE", "Edit Succ.", "IKE") == PUBLISHED["ZsRE"]["Edit Succ."]["ICE"] == 66.01
    assert published_value("ZsRE", "Locality", "AdaLoRA") == 75.76
    assert published_value("ZsRE", "Edit Succ.", "LoRA") is None
    rows = [{"dataset": "ZsRE", "method": "IKE", "Locality": 20.0}, {"dataset": "ZsRE", "method": "FT-M", "Locality": 80.0}]
    (compared,) = ordering_comparison(rows, ("Locality",))
    assert compared["published"] == "FT-M > IKE" and compared["same_order"] is True


def test_a_tie_is_not_the_published_order():
    rows = [{"dataset": "ZsRE", "method": "FT-M", "Edit Succ.": 100.0}, {"dataset": "ZsRE", "method": "ROME", "Edit Succ.": 100.0}]
    (compared,) = ordering_comparison(rows, ("Edit Succ.",))
    assert compared["ours"] == "FT-M = ROME" and compared["published"] == "FT-M > ROME"
    assert compared["kendall_tau"] == 0.0 and compared["same_order"] is False
    rows[1]["Edit Succ."] = 90.0
    (compared,) = ordering_comparison(rows, ("Edit Succ.",))
    assert compared["same_order"] is True and compared["kendall_tau"] == 1.0
    assert PUBLISHED["ZsRE"]["Locality"]["FT-M"] == 89.78


def test_config_checks_datasets_and_files(root, tmp_path):
    with pytest.raises(ReproduceError, match="unknown KnowEdit dataset"):
        _config(root, tmp_path, sets=("ZsRE", "TriviaQA"))
    with pytest.raises(ReproduceError, match="not found.*WikiBio"):
        _config(root, tmp_path, sets=("ZsRE", "WikiBio"))
    config = _config(root, tmp_path, methods=("ft-m", "ft-l"))
    assert config.methods == ("FT-M", "FT-L")
    assert config.plan()[:2] == [("ZsRE", "FT-M"), ("ZsRE", "FT-L")]  # whole rows first


def test_reproduction_writes_the_table_beside_the_published_one_and_resumes(root, tmp_path, tiny_llama, word_tok):
    config = _config(root, tmp_path)
    seen = []
    payload = run_knowedit_table(config, model=tiny_llama, tok=word_tok, show_progress=False, on_run=seen.append)
    assert [(o.dataset, o.method, o.status) for o in seen] == [
        ("ZsRE", "FT-L", "ran"), ("ZsRE", "FT-M", "ran"), ("WikiData_recent", "FT-L", "ran"),
        ("WikiData_recent", "FT-M", "ran")]
    run_config = json.loads((config.out / "ZsRE" / "FT-M" / "config.json").read_text())
    assert run_config["protocol"] == "single" and run_config["eval"]["suites"] == ["fluency"]
    summary = json.loads((config.out / "ZsRE" / "FT-M" / "summary.json").read_text())
    assert "locality/Relation_Specificity" in summary["post"] and "portability/Reasoning" in summary["post"]
    text = (config.out / "knowedit-table.md").read_text()
    ft_m = next(r for r in payload["rows"] if r["dataset"] == "ZsRE" and r["method"] == "FT-M")
    assert "| ZsRE (n=2) | Edit Succ. | " in text and f"{ft_m['Edit Succ.']:.2f} (99.98)" in text
    assert "· Relation_Specificity" in text and "Kendall τ" in text
    cost = text.split("## Cost")[1]
    assert f"{ft_m['seconds_per_edit']:.1f} · {ft_m['work_minutes']:.1f}" in cost and ft_m["work_minutes"] > 0
    assert {(c["dataset"], c["metric"]) for c in payload["ordering"]} >= {("ZsRE", "Edit Succ."), ("ZsRE", "Locality")}
    assert (config.out / "knowedit-table.png").is_file() and (config.out / "knowedit-table.json").is_file()
    again = run_knowedit_table(config, model=tiny_llama, tok=word_tok, show_progress=False)
    assert {o["status"] for o in again["outcomes"]} == {"done"}


def test_the_table_lists_what_is_not_finished_and_the_work_left(root, tmp_path, tiny_llama, word_tok):
    config = _config(root, tmp_path, sets=("ZsRE",))
    run_knowedit_table(config, model=tiny_llama, tok=word_tok, show_progress=False)
    # FT-M stopped after its first item (the runner writes summary.json only at the end); FT-L never started
    ft_m = config.out / "ZsRE" / "FT-M"
    (ft_m / "summary.json").unlink()
    kept = json.loads((ft_m / "results.jsonl").read_text().splitlines()[0])
    (ft_m / "results.jsonl").write_text(json.dumps(kept) + "\n")
    shutil.rmtree(config.out / "ZsRE" / "FT-L")
    payload = write_table(config)
    minutes = (kept["edit_seconds"] + kept["eval_seconds"]) / 60
    assert payload["unfinished"] == [
        {"run": "ZsRE/FT-L", "state": "not started", "chunks_done": 0, "chunks": None,
         "work_minutes": 0.0, "minutes_left": None},
        {"run": "ZsRE/FT-M", "state": "started", "chunks_done": 1, "chunks": 2,
         "work_minutes": pytest.approx(minutes), "minutes_left": pytest.approx(minutes)}]
    section = (config.out / "knowedit-table.md").read_text().split("## Not finished")[1]
    assert "| ZsRE/FT-L | not started | — | — |" in section
    assert f"| ZsRE/FT-M | 1 of 2 | {minutes:.1f} | {minutes:.1f} |" in section
    assert "in the 1 started run(s)" in section and "1 not started" in section
    run_knowedit_table(config, model=tiny_llama, tok=word_tok, show_progress=False)  # both resume and finish
    assert write_table(config)["unfinished"] == []
    assert "## Not finished" not in (config.out / "knowedit-table.md").read_text()


def test_a_method_that_refuses_the_set_is_not_listed_as_merely_not_started(root, tmp_path):
    records = json.loads((root / "ZsRE" / "ZsRE-test-all.json").read_text())
    (root / "ZsRE" / "ZsRE-test-all.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "subject"}
                                                                  for r in records]))
    config = _config(root, tmp_path, sets=("ZsRE",), methods=("FT-M", "ROME"))
    config.out.mkdir(parents=True)
    rows = {r["run"]: r["state"] for r in write_table(config)["unfinished"]}  # what --table-only writes: no run
    assert rows["ZsRE/FT-M"] == "not started"
    assert rows["ZsRE/ROME"].startswith("cannot run: request 0: this method needs the subject")
    assert "; 1 not started." in (config.out / "knowedit-table.md").read_text()


def test_a_failing_method_is_reported_and_the_others_go_on(root, tmp_path, tiny_llama, word_tok):
    config = _config(root, tmp_path, sets=("ZsRE",), overrides={**TINY, "FT-L": {"layers": [99]}})
    payload = run_knowedit_table(config, model=tiny_llama, tok=word_tok, show_progress=False)
    status = {o["method"]: o["status"] for o in payload["outcomes"]}
    assert status == {"FT-L": "failed", "FT-M": "ran"}
    text = (config.out / "knowedit-table.md").read_text()
    assert "FT-L on ZsRE" in text.split("## Runs that failed")[1]
    assert "| ZsRE/FT-L | failed | — | — |" in text and "; 0 not started" in text
    assert [(r["run"], r["state"]) for r in payload["unfinished"]] == [("ZsRE/FT-L", "failed")]


def test_command_line_checks_and_table_only(root, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["reproduce", "knowedit-table", "--root", str(root), "--file", "WikiData_recent",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "NAME=PATH" in result.output
    result = runner.invoke(app, ["reproduce", "knowedit-table", "--root", str(root), "--sets", "ZsRE,WikiBio",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "WikiBio" in result.output
    result = runner.invoke(app, ["reproduce", "knowedit-table", "--root", str(root), "--sets", "ZsRE",
                                 "--out", str(tmp_path / "missing"), "--table-only"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_ray_and_serial_runs_share_folders_and_equal_each_other(root, tmp_path, word_tok):
    """FT-L serially, then FT-M on two Ray workers, then FT-M's last item serially again: the serial run's summaries."""
    from conftest import build_tiny_llama, require_ray
    from lmedit.models import load_model
    from lmedit.reproduce_knowedit import run_knowedit_table_on_ray
    from lmedit.sweep.engine import start_ray

    ray = require_ray()
    folder = tmp_path / "tiny"
    build_tiny_llama(len(word_tok)).save_pretrained(folder)
    word_tok.save_pretrained(folder)
    model, tok = load_model(str(folder))
    same = dict(sets=("ZsRE",), model=str(folder), preset="smollm2-135m")
    reference = run_knowedit_table(_config(root, tmp_path, out=tmp_path / "serial", **same), model=model, tok=tok,
                                   show_progress=False)
    mixed = _config(root, tmp_path, out=tmp_path / "mixed", **same)
    run_knowedit_table(_config(root, tmp_path, out=tmp_path / "mixed", methods=("FT-L",), **same), model=model,
                       tok=tok, show_progress=False)
    start_ray(2, None)
    try:
        seen = []
        run_knowedit_table_on_ray(mixed, workers=2, show_progress=False, on_run=seen.append)
    finally:
        ray.shutdown()
    assert [(o.method, o.status) for o in seen] == [("FT-L", "done"), ("FT-M", "ran")]
    ft_m = mixed.folder("ZsRE", "FT-M")
    assert json.loads((ft_m / "config.json").read_text())["eval"]["suites"] == ["fluency"]
    (ft_m / "summary.json").unlink()  # as if the Ray run had stopped after FT-M's first item
    records = (ft_m / "results.jsonl").read_text().splitlines()
    (ft_m / "results.jsonl").write_text(records[0] + "\n")
    resumed = run_knowedit_table(mixed, model=model, tok=tok, show_progress=False)
    assert [o["status"] for o in resumed["outcomes"]] == ["done", "ran"]
    for method in ("FT-L", "FT-M"):
        got = json.loads((mixed.folder("ZsRE", method) / "summary.json").read_text())
        expected = json.loads((tmp_path / "serial" / "ZsRE" / method / "summary.json").read_text())
        assert {k: got[k] for k in ("pre", "post", "n")} == {k: expected[k] for k in ("pre", "post", "n")}, method
    assert [r["Edit Succ."] for r in resumed["rows"]] == [r["Edit Succ."] for r in reference["rows"]]


def _sanitation_files(folder):
    """KnowEdit's two Sanitation files, by hand: two answers with two questions to forget each."""
    folder.mkdir(parents=True)
    forget = [{"question": f"who wrote {s}", "subject": s, "ground_truth": a, "target_new": "the king"}
              for a, subjects in (("tolstoy", ("hamlet", "rome")), ("paris", ("france", "italy"))) for s in subjects]
    (folder / "trivia_qa_train.json").write_text(json.dumps(
        {"K_F": forget, "K_R": [{"question": "the city of", "ground_truth": "rome", "target_new": "rome"}]}))
    success = [{"question": f"the {s} of", "ground_truth": a, "target_new": "the king"}
               for s, a in (("queen", "Tolstoy"), ("river", "PARIS"), ("city", "tolstoy"), ("play", "Paris"))]
    (folder / "trivia_qa_test.json").write_text(json.dumps(
        {"success": success, "locality": [{"question": f"the mother tongue of {s} is", "ground_truth": "french"}
                                          for s in ("france", "london", "berlin")]}))


def test_easyedit_sanitation_protocol_edits_one_answer_per_sequence(root, tmp_path, tiny_llama, word_tok):
    from lmedit.reproduce import load_written_runs
    from lmedit.reports.knowedit import knowedit_rows

    _sanitation_files(root / "Sanitation")
    config = _config(root, tmp_path, sets=("Sanitation-EasyEdit",), methods=("FT-M",), limit=1)
    payload = run_knowedit_table(config, model=tiny_llama, tok=word_tok, show_progress=False)
    folder = config.folder("Sanitation-EasyEdit", "FT-M")
    run_config = json.loads((folder / "config.json").read_text())
    assert (run_config["protocol"], run_config["T"], run_config["n_requests"]) == ("sequential", 2, 4)  # not --limit
    assert run_config["extra"]["data_format"] == "sanitation-easyedit"
    assert "qa:context=question,max_new_tokens=10" in run_config["eval"]["suites"]
    post = json.loads((folder / "summary.json").read_text())["post"]
    (row,) = payload["rows"]
    assert row["Edit Succ."] == pytest.approx(100 * post["rephrase_qa_contains"])  # the test questions, generated
    assert row["· edited questions"] == pytest.approx(100 * post["rewrite_acc"])
    assert row["Locality"] == pytest.approx(100 * post["locality_qa_f1"])  # generated answers against pre-edit ones
    assert row["· teacher-forced"] == pytest.approx(100 * post["locality"])
    published = PUBLISHED["Sanitation"]["Edit Succ."]["FT-M"]
    assert published_value("Sanitation-EasyEdit", "Edit Succ.", "FT-M") == published
    text = (config.out / "knowedit-table.md").read_text()
    assert "| Sanitation-EasyEdit (n=4) | Edit Succ. | " in text and f"({published:.2f})" in text
    assert "· edited questions" in text and "· teacher-forced" in text and "EasyEdit's Sanitation protocol" in text
    (report_row,) = knowedit_rows(load_written_runs([folder]))  # `lmedit report --layout knowedit` names it too
    assert report_row["dataset"] == "Sanitation (EasyEdit)" and report_row["Edit Succ."] == row["Edit Succ."]


def test_easyedit_sanitation_needs_one_block_per_answer(tmp_path):
    from lmedit.reproduce_knowedit import sanitation_group_size

    folder = tmp_path / "Sanitation"
    _sanitation_files(folder)
    assert sanitation_group_size(folder / "trivia_qa_train.json") == 2
    train = json.loads((folder / "trivia_qa_train.json").read_text())
    train["K_F"][1], train["K_F"][2] = train["K_F"][2], train["K_F"][1]  # tolstoy, paris, tolstoy, paris
    (folder / "trivia_qa_train.json").write_text(json.dumps(train))
    with pytest.raises(ReproduceError, match="one block per answer"):
        sanitation_group_size(folder / "trivia_qa_train.json")
    train["K_F"] = train["K_F"][:3]  # blocks of 2 and 1 after sorting back: unequal sizes
    train["K_F"].sort(key=lambda item: item["ground_truth"])
    (folder / "trivia_qa_train.json").write_text(json.dumps(train))
    with pytest.raises(ReproduceError, match="all of one size"):
        sanitation_group_size(folder / "trivia_qa_train.json")
