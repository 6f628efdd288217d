"""Run folders: files written as results arrive, summaries, resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lmedit.editor import Editor
from lmedit.runner import RunError, read_records, summarize
from lmedit.requests import EditRequest

REQUESTS = [
    EditRequest("the capital of france is", "rome", rephrase=["the capital of paris is"],
                locality={"nb": [("sky", "blue")]}, portability={"hop": [("who", "wrote")]}, case_id="0"),
    EditRequest("who wrote hamlet", "tolstoy", locality={"nb": [("grass", "green")]}, case_id="1"),
    EditRequest("the eiffel tower is located in", "berlin", case_id="2"),
]


def _editor(model, tok):
    return Editor(model, tok, "FT-M", overrides={"layers": [1], "lr": 5e-2, "num_steps": 20})


def test_run_writes_config_results_and_summary(tiny_llama, word_tok, tmp_path):
    summary, out = _editor(tiny_llama, word_tok).run(REQUESTS, protocol="sequential", T=2, out_dir=tmp_path / "r",
                                                     show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "FT-M" and config["T"] == 2 and config["hparams"]["layers"] == [1]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(l)["chunk"] for l in lines] == [0, 0, 1]
    written = json.loads((out / "summary.json").read_text())
    assert written["n"] == 3 and written["complete"] is True
    assert set(written["post"]) >= {"rewrite_acc", "locality", "portability", "rephrase_acc"}
    assert written["counts"]["post"]["portability"] == 1  # only one request has portability probes
    assert len(written["chunks"]) == 2
    assert summary["post"]["rewrite_acc"] == pytest.approx(
        sum(json.loads(l)["post"]["rewrite_acc"] for l in lines) / 3)


def test_resume_skips_finished_chunks(tiny_llama, word_tok, tmp_path):
    editor = _editor(tiny_llama, word_tok)
    out = tmp_path / "r"
    first, _ = editor.run(REQUESTS, protocol="single", out_dir=out, show_progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # interrupted mid-write
    calls = []
    original_apply = editor.method.apply
    from dataclasses import replace

    editor.method = replace(editor.method, apply=lambda *a: calls.append(1) or original_apply(*a))
    second, _ = editor.run(REQUESTS, protocol="single", out_dir=out, show_progress=False)
    assert len(calls) == 1  # only the chunk whose line was torn is redone
    assert second["post"]["rewrite_acc"] == pytest.approx(first["post"]["rewrite_acc"])


def test_each_start_and_resume_records_its_own_environment(tiny_llama, word_tok, tmp_path):
    import torch

    editor = _editor(tiny_llama, word_tok)
    out = tmp_path / "r"
    threads = torch.get_num_threads()
    editor.run(REQUESTS[:2], protocol="single", out_dir=out, show_progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n")  # the second chunk is lost: the rerun resumes
    torch.set_num_threads(threads + 1)
    try:
        editor.run(REQUESTS[:2], protocol="single", out_dir=out, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert [(s["chunks_done"], s["chunks"]) for s in sessions] == [(0, 2), (1, 2)]
    assert [s["environment"]["threads"] for s in sessions] == [str(threads), str(threads + 1)]
    assert sessions[0]["started"] <= sessions[1]["started"] and sessions[0]["started"].endswith("+00:00")
    assert json.loads((out / "config.json").read_text())["environment"]["threads"] == str(threads)  # the first's


def test_a_folder_of_another_run_is_not_overwritten(tiny_llama, word_tok, tmp_path):
    editor = _editor(tiny_llama, word_tok)
    editor.run(REQUESTS[:1], protocol="single", out_dir=tmp_path / "r", show_progress=False)
    with pytest.raises(RunError, match="differs in"):
        editor.run(REQUESTS[:1], protocol="sequential", T=1, out_dir=tmp_path / "r", show_progress=False)


def test_a_folder_written_before_a_hyperparameter_existed_resumes_at_its_default(tiny_llama, word_tok, tmp_path):
    """A field added to a method later ran, for the old folder, as its default does: the folder resumes."""
    editor = _editor(tiny_llama, word_tok)
    out = tmp_path / "r"
    editor.run(REQUESTS[:1], protocol="single", out_dir=out, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    del config["hparams"]["norm_constraint"]  # as if written before the field existed
    (out / "config.json").write_text(json.dumps(config))
    summary, _ = editor.run(REQUESTS[:1], protocol="single", out_dir=out, show_progress=False)
    assert summary["n"] == 1
    config["hparams"]["lr"] = 1e-3  # a field the folder did record still has to match
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="differs in hparams"):
        editor.run(REQUESTS[:1], protocol="single", out_dir=out, show_progress=False)


def test_summary_means_per_chunk_and_of_chunks():
    records = [
        {"index": 0, "chunk": 0, "pre": {"a": 0.0}, "post": {"a": 1.0}},
        {"index": 1, "chunk": 0, "pre": {"a": 0.0}, "post": {"a": 0.0}},
        {"index": 2, "chunk": 1, "pre": {"a": 0.0}, "post": {"a": 1.0}},
    ]
    s = summarize(records)
    assert s["post"]["a"] == pytest.approx(2 / 3)
    assert [c["post"]["a"] for c in s["chunks"]] == [0.5, 1.0]
    assert s["chunk_mean"]["post"]["a"] == pytest.approx(0.75)


def test_read_records_keeps_the_newest_line_per_request(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"index": 0, "chunk": 0, "v": 1}\n{"index": 0, "chunk": 0, "v": 2}\n{"index": 1,')
    assert read_records(path) == [{"index": 0, "chunk": 0, "v": 2}]


def test_a_folder_written_before_an_evaluation_setting_existed_still_resumes(tiny_llama, word_tok, tmp_path):
    editor = _editor(tiny_llama, word_tok)
    out = tmp_path / "r"
    editor.run(REQUESTS[:2], protocol="single", out_dir=out, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    del config["eval"]["generation_cache"]  # as written by a version without the setting (its default: True)
    (out / "config.json").write_text(json.dumps(config))
    summary, _ = editor.run(REQUESTS[:2], protocol="single", out_dir=out, show_progress=False)
    assert summary["complete"] is True
    uncached = Editor(tiny_llama, word_tok, "FT-M", overrides={"layers": [1]},
                      eval_config=replace(editor.evaluator.config, generation_cache=False))
    with pytest.raises(RunError, match="eval"):
        uncached.run(REQUESTS[:2], protocol="single", out_dir=out, show_progress=False)


@pytest.mark.parametrize("method, cached", [("WISE", False), ("DEFER", False), ("GRACE", True), ("FT-M", True)])
def test_methods_that_read_their_whole_input_are_scored_by_uncached_generation(tiny_llama, word_tok, method, cached):
    assert Editor(tiny_llama, word_tok, method).evaluator.config.generation_cache is cached


def test_the_unedited_model_decodes_with_the_cache_even_for_uncached_methods(tiny_llama, word_tok, monkeypatch):
    """Pre-edit capture of a WISE run uses the KV cache (no adapter yet, same tokens); after the edit it does not."""
    from lmedit.evaluation import evaluator as evaluator_module

    used = []
    original = evaluator_module.generate_greedy

    def spy(*args, **kwargs):
        used.append(kwargs["use_cache"])
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, "generate_greedy", spy)
    editor = Editor(tiny_llama, word_tok, "WISE", overrides={"n_iter": 2, "layer": 1},
                    eval_config=evaluator_module.EvalConfig(mode="both"))
    assert editor.evaluator.config.generation_cache is False
    pre = editor.evaluator.capture(tiny_llama, REQUESTS[:1])
    assert used == [True]
    uncached = original(tiny_llama, word_tok, [p.prompt for p in pre.probes],
                        [len(o.generated) for o in pre.outcomes], use_cache=False)
    assert [list(o.generated) for o in pre.outcomes] == [list(u) for u in uncached]
    handle = editor.apply(REQUESTS[0])
    editor.evaluator.score(tiny_llama, REQUESTS[:1], pre)
    assert used[-1] is False
    handle.restore()


def test_complete_chunks_written_out_of_order_are_kept_without_a_warning(tmp_path, caplog):
    """Ray writes chunks as they finish (2, then 0); an interrupted chunk 1 is the only thing dropped."""
    from lmedit.protocols import plan_chunks
    from lmedit.runner import _keep_complete_chunks

    path = tmp_path / "results.jsonl"
    lines = [{"chunk": 2, "index": 4}, {"chunk": 2, "index": 5}, {"chunk": 0, "index": 0}, {"chunk": 0, "index": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    chunks = plan_chunks(6, "sequential", T=2)
    with caplog.at_level("WARNING"):
        assert _keep_complete_chunks(path, chunks) == {0, 2}
    assert "dropping" not in caplog.text
    assert [r["index"] for r in read_records(path)] == [0, 1, 4, 5]
    with path.open("a") as handle:
        handle.write(json.dumps({"chunk": 1, "index": 2}) + "\n")
    with caplog.at_level("WARNING"):
        assert _keep_complete_chunks(path, chunks) == {0, 2}
    assert "dropping 1 record line(s)" in caplog.text
    assert len(path.read_text().splitlines()) == 4
