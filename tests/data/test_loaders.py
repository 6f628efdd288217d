"""Benchmark loaders: each real file maps exactly as EasyEdit reads it, and the demo set is sound."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from lmedit.data import (
    DATA_FORMATS,
    DataError,
    demo_path,
    detect_format,
    load_irrelevant_prompts,
    load_requests,
)
from lmedit.data.loaders import empty_selection_reason
from lmedit.requests import EditRequest, Probe


def _shared_data() -> Path:
    env = os.environ.get("LMEDIT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def shared() -> Path:
    root = _shared_data()
    if not root.is_dir():
        pytest.skip(f"shared benchmark data not found at {root} (set LMEDIT_SHARED_DATA)")
    return root


def _raw(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(tmp_path: Path, records: Any, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _zsre_record(**overrides: Any) -> dict[str, Any]:
    record = {
        "subject": "Widget",
        "src": "Who made Widget?",
        "pred": "Acme",
        "rephrase": "Widget was made by whom?",
        "alt": "Globex",
        "answers": ["Acme", "Acme Corp"],
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
        "cond": "Acme >> Globex || Who made Widget?",
    }
    record.update(overrides)
    return record


# --------------------------------------------------------------------------- zsRE


def test_zsre_first_record_maps_exactly(shared: Path) -> None:
    path = shared / "zsre" / "zsre_mend_eval_portability_gpt4.json"
    raw = _raw(path)[0]
    request = load_requests(path, limit=1)[0]
    assert request.prompt == raw["src"]
    assert request.target_new == raw["alt"]
    assert request.ground_truth == raw["answers"][0]
    assert request.subject == raw["subject"]
    assert request.rephrase == (raw["rephrase"],)
    assert request.case_id == "0"
    assert raw["loc"].startswith("nq question: ")
    assert request.locality == {"neighborhood": (Probe(raw["loc"], raw["loc_ans"]),)}
    port = raw["portability"]
    assert request.portability == {"one_hop": (Probe(port["New Question"], port["New Answer"]),)}


def test_zsre_full_file_count_and_case_ids(shared: Path) -> None:
    path = shared / "zsre" / "zsre_mend_eval_portability_gpt4.json"
    raw = _raw(path)
    requests = load_requests(path)
    kept = [i for i, r in enumerate(raw) if r["alt"] != ""]
    assert [r.case_id for r in requests] == [str(i) for i in kept]


def test_zsre_inverse_relation_answer_is_subject(shared: Path) -> None:
    path = shared / "zsre" / "zsre_inverse_relation.json"
    raw = _raw(path)[1]
    request = load_requests(path, offset=1, limit=1)[0]
    assert request.case_id == "1"
    assert request.target_new == raw["alt"]
    assert request.locality == {}
    assert request.portability == {"inverse_relation": (Probe(raw["inverse question"], raw["subject"]),)}


def test_zsre_subject_replace_group(shared: Path) -> None:
    path = shared / "zsre" / "zsre_subject_replace.json"
    raw = _raw(path)[0]
    request = load_requests(path, limit=1)[0]
    assert request.portability == {"subject_replace": (Probe(raw["alter_subject_question"], raw["alt"]),)}
    assert request.locality == {}


def test_zsre_skips_empty_alt_and_logs_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, [_zsre_record(), _zsre_record(alt=""), _zsre_record(alt="Initech"), _zsre_record(alt="")])
    with caplog.at_level(logging.INFO, logger="lmedit.data.loaders"):
        requests = load_requests(path)
    assert [(r.case_id, r.target_new) for r in requests] == [("0", "Globex"), ("2", "Initech")]
    assert any("skipped 2" in message for message in caplog.messages)


def test_an_empty_selection_names_its_cause(tmp_path: Path) -> None:
    """Each empty selection says which option to change: --limit 0, an --offset past the end, or only empty alts."""
    path = _write(tmp_path, [_zsre_record(), _zsre_record(alt=""), _zsre_record(alt="")])
    assert load_requests(path, offset=1) == []
    assert "records 1..2 all have an empty target (alt)" in empty_selection_reason(path, limit=None, offset=1)
    assert "records 1..1 all have" in empty_selection_reason(path, limit=1, offset=1)
    assert "--offset 3 is past the end" in empty_selection_reason(path, limit=None, offset=3)
    assert "pass an --offset below 3" in empty_selection_reason(path, limit=None, offset=3)
    assert "--limit is 0" in empty_selection_reason(path, limit=0, offset=0)


def test_zsre_record_without_portability_has_no_groups(tmp_path: Path) -> None:
    request = load_requests(_write(tmp_path, [_zsre_record()]))[0]
    assert request.portability == {}
    assert request.ground_truth == "Acme"


# --------------------------------------------------------------------------- CounterFact


def test_counterfact_flat_first_record(shared: Path) -> None:
    path = shared / "counterfact" / "counterfact-val.json"
    raw = _raw(path)[0]
    request = load_requests(path, limit=1)[0]
    assert request.prompt == raw["prompt"]
    assert request.target_new == raw["target_new"]
    assert request.subject == raw["subject"]
    assert request.ground_truth == raw["ground_truth"]
    assert request.rephrase == (raw["rephrase_prompt"],)
    assert request.locality == {"neighborhood": (Probe(raw["locality_prompt"], raw["locality_ground_truth"]),)}
    assert request.portability == {}
    assert request.case_id == str(raw["case_id"])


def test_counterfact_rome_portability_first_record(shared: Path) -> None:
    path = shared / "counterfact" / "counterfact_portability_gpt4.json"
    raw = _raw(path)[0]
    rewrite = raw["requested_rewrite"]
    request = load_requests(path, limit=1)[0]
    assert request.prompt == rewrite["prompt"].format(rewrite["subject"])
    assert request.subject == rewrite["subject"]
    assert request.target_new == rewrite["target_new"]["str"]
    assert request.ground_truth == rewrite["target_true"]["str"]
    assert request.rephrase == tuple(raw["paraphrase_prompts"])
    truth = rewrite["target_true"]["str"]
    assert request.locality == {"neighborhood": tuple(Probe(p, truth) for p in raw["neighborhood_prompts"])}
    port = raw["portability"]
    assert request.portability == {"one_hop": (Probe(port["New Question"], port["New Answer"]),)}
    assert request.case_id == str(raw["case_id"])


def test_counterfact_rome_subject_replace_first_record(shared: Path) -> None:
    path = shared / "counterfact" / "counterfact_subject_replace.json"
    raw = _raw(path)[0]
    rewrite = raw["requested_rewrite"]
    request = load_requests(path, limit=1)[0]
    expected = rewrite["prompt"].format(raw["alternative_subject"])
    assert request.portability == {"subject_replace": (Probe(expected, rewrite["target_new"]["str"]),)}
    assert request.prompt == rewrite["prompt"].format(rewrite["subject"])


# --------------------------------------------------------------------------- KnowEdit


def test_knowedit_zsre_first_record(shared: Path) -> None:
    path = shared / "knowedit" / "ZsRE" / "ZsRE-test-all.json"
    raw = _raw(path)[0]
    request = load_requests(path, limit=1)[0]
    assert request.prompt == raw["prompt"]
    assert request.subject == raw["subject"]
    assert request.target_new == raw["target_new"]
    assert isinstance(raw["ground_truth"], list)
    assert request.ground_truth == raw["ground_truth"][0]
    assert request.rephrase == (raw["rephrase_prompt"],)
    spec = raw["locality"]["Relation_Specificity"]
    assert request.locality == {
        "Relation_Specificity": tuple(Probe(item["prompt"], item["ground_truth"][0]) for item in spec)
    }
    reasoning = raw["portability"]["Reasoning"]
    assert request.portability == {
        "Reasoning": tuple(Probe(item["prompt"], item["ground_truth"]) for item in reasoning)
    }


def test_knowedit_portability_groups_use_knowedit_names(shared: Path) -> None:
    path = shared / "knowedit" / "ZsRE" / "ZsRE-test-all.json"
    raw = _raw(path)
    requests = load_requests(path)
    assert len(requests) == len(raw)
    names = {name for request in requests for name in request.portability}
    assert names == {name for record in raw for name in record["portability"]}
    assert names <= {"Reasoning", "Subject_Aliasing", "Logical_Generalization"}


def test_knowedit_wikibio_first_record(shared: Path) -> None:
    path = shared / "knowedit" / "WikiBio" / "wikibio-test-all.json"
    raw = _raw(path)[0]
    request = load_requests(path, limit=1)[0]
    assert request.prompt == raw["text"]
    assert request.target_new == raw["labels"]
    assert request.subject == raw["concept"]
    assert request.ground_truth is None
    assert request.rephrase == ()
    spec = raw["locality"]["Relation_Specificity"]
    assert request.locality["Relation_Specificity"] == tuple(
        Probe(item["prompt"], item["ground_truth"][0]) for item in spec
    )


def test_knowedit_nested_answers_and_list_prompts(tmp_path: Path) -> None:
    record = {
        "subject": "Widget",
        "prompt": "Widget was made by",
        "target_new": "Globex",
        "ground_truth": [["Acme", "Acme Corp"]],
        "rephrase": ["Who made Widget?"],
        "portability": {
            "Reasoning": [{"prompt": "Globex is based in", "ground_truth": [["Springfield"], ["Ohio"]]}],
            "Subject_Aliasing": [{"prompt": ["The Widget was made by", "Widgets are made by"], "ground_truth": "Globex"}],
            "Logical_Generalization": [{"prompt": "Dropped probe", "ground_truth": [[]]}],
        },
        "locality": {
            "Relation_Specificity": [
                {"prompt": "Widget weighs", "ground_truth": ["2 kg"]},
                {"prompt": "Empty answer", "ground_truth": ""},
            ],
            "Forgetfulness": [{"prompt": "Widget is coloured", "ground_truth": [["red"]]}],
        },
    }
    request = load_requests(_write(tmp_path, [record]), format="knowedit")[0]
    assert request.ground_truth == "Acme"
    assert request.rephrase == ("Who made Widget?",)
    assert request.portability == {
        "Reasoning": (Probe("Globex is based in", "Springfield", ("Ohio",)),),  # every listed answer counts in qa
        "Subject_Aliasing": (Probe("The Widget was made by", "Globex"), Probe("Widgets are made by", "Globex")),
    }
    assert request.locality == {
        "Relation_Specificity": (Probe("Widget weighs", "2 kg"),),
        "Forgetfulness": (Probe("Widget is coloured", "red"),),
    }


# --------------------------------------------------------------------------- WISE


def test_wise_hallucination_first_record(shared: Path) -> None:
    path = shared / "wise" / "hallucination" / "hallucination-edit.json"
    raw = _raw(path)[0]
    request = load_requests(path, limit=1)[0]
    assert (request.prompt, request.target_new, request.subject) == (raw["prompt"], raw["target_new"], raw["subject"])
    assert request.locality == {"neighborhood": (Probe(raw["locality_prompt"], raw["locality_ground_truth"]),)}
    assert request.rephrase == ()
    assert request.case_id == "0"


def test_wise_temporal_ood_rephrase(shared: Path) -> None:
    path = shared / "wise" / "temporal" / "temporal-edit.json"
    raw = _raw(path)[0]
    request = load_requests(path, limit=1)[0]
    assert request.rephrase == (raw["ood_rephrase"],)
    assert request.target_new == raw["target_new"]
    assert request.locality == {"neighborhood": (Probe(raw["locality_prompt"], raw["locality_ground_truth"]),)}


def test_irrelevant_prompts(shared: Path) -> None:
    zsre = shared / "zsre" / "zsre_mend_eval_portability_gpt4.json"
    raw = _raw(zsre)
    assert load_irrelevant_prompts(zsre, offset=3, limit=2) == [f"{r['loc']} {r['loc_ans']}" for r in raw[3:5]]
    wise = shared / "wise" / "temporal" / "temporal-train.json"
    raw = _raw(wise)
    texts = load_irrelevant_prompts(wise)
    assert texts == [f"{r['locality_prompt']} {r['locality_ground_truth']}" for r in raw]
    with pytest.raises(DataError, match="irrelevant"):
        load_irrelevant_prompts(shared / "knowedit" / "WikiBio" / "wikibio-test-all.json")


# --------------------------------------------------------------------------- detection, windows, errors


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("zsre/zsre_mend_eval_portability_gpt4.json", "zsre"),
        ("zsre/zsre_inverse_relation.json", "zsre"),
        ("counterfact/counterfact-edit.json", "counterfact"),
        ("counterfact/counterfact_portability_gpt4.json", "counterfact-rome"),
        ("knowedit/ZsRE/ZsRE-test-all.json", "knowedit"),
        ("knowedit/WikiBio/wikibio-train-all.json", "knowedit"),
        ("wise/hallucination/hallucination-train.json", "wise"),
        ("wise/temporal/temporal-edit.json", "wise"),
    ],
)
def test_detect_format_real_files(shared: Path, relative: str, expected: str) -> None:
    assert detect_format(_raw(shared / relative)[:3]) == expected


def test_detect_format_demo_and_unknown() -> None:
    assert detect_format(_raw(demo_path())) == "lmedit"
    assert detect_format([{"ent": "x", "pos": [], "neg": []}]) == "convsent"  # ConvSent loads now
    with pytest.raises(DataError):
        detect_format([{"topic": "x", "good": [], "bad": []}])
    with pytest.raises(DataError):
        detect_format([])
    assert {"zsre", "counterfact", "counterfact-rome", "knowedit", "wise", "demo", "lmedit"} <= set(DATA_FORMATS)


def test_lmedit_record_with_knowedit_group_name_stays_lmedit(tmp_path: Path) -> None:
    record = EditRequest("A is in", "B", locality={"Relation_Specificity": [("C is in", "D")]}).to_dict()
    assert detect_format([record]) == "lmedit"
    assert load_requests(_write(tmp_path, [record]))[0].locality == {"Relation_Specificity": (Probe("C is in", "D"),)}


def test_limit_and_offset(tmp_path: Path) -> None:
    path = _write(tmp_path, [_zsre_record(alt=f"Alt{i}") for i in range(6)])
    assert [r.case_id for r in load_requests(path, offset=2, limit=3)] == ["2", "3", "4"]
    assert [r.case_id for r in load_requests(path, offset=4)] == ["4", "5"]
    assert [r.case_id for r in load_requests(path, limit=2)] == ["0", "1"]
    assert load_requests(path, limit=0) == []
    assert load_requests(path, offset=10) == []
    with pytest.raises(ValueError):
        load_requests(path, offset=-1)


def test_limit_and_offset_on_real_file(shared: Path) -> None:
    path = shared / "counterfact" / "counterfact-edit.json"
    raw = _raw(path)
    requests = load_requests(path, offset=5, limit=4)
    assert [r.case_id for r in requests] == [str(r["case_id"]) for r in raw[5:9]]
    assert [r.prompt for r in requests] == [r["prompt"] for r in raw[5:9]]


def test_malformed_record_names_its_index(tmp_path: Path) -> None:
    records = [_zsre_record(), _zsre_record(), _zsre_record()]
    del records[2]["src"]
    with pytest.raises(DataError, match=r"record 2\b") as info:
        load_requests(_write(tmp_path, records))
    assert "src" in str(info.value)


def test_malformed_record_type_error_names_its_index(tmp_path: Path) -> None:
    records = [_zsre_record(), _zsre_record(alt=["not", "a", "string"])]
    with pytest.raises(DataError, match=r"record 1\b"):
        load_requests(_write(tmp_path, records))


def test_unknown_file_names_file_and_formats(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"topic": "x", "good": ["a"], "bad": ["b"]}], name="unknown.json")
    with pytest.raises(DataError) as info:
        load_requests(path)
    message = str(info.value)
    assert "unknown.json" in message and "zsre" in message and "counterfact-rome" in message


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(DataError, match="missing.json"):
        load_requests(missing)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="garbage.json.*accepted formats"):
        load_requests(garbage)
    mapping = _write(tmp_path, {"K_F": []}, name="dict.json")
    with pytest.raises(DataError, match="dict.json"):
        load_requests(mapping)
    with pytest.raises(DataError, match="unknown data format"):
        load_requests(demo_path(), format="mquake")


def test_json_lines_input(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(_zsre_record(alt=f"A{i}")) for i in range(3)) + "\n", encoding="utf-8")
    assert [r.target_new for r in load_requests(path)] == ["A0", "A1", "A2"]


# --------------------------------------------------------------------------- demo set


def test_demo_set_is_default_and_complete() -> None:
    requests = load_requests()
    assert requests == load_requests(demo_path(), format="demo")
    assert len(requests) >= 50
    assert len({r.case_id for r in requests}) == len(requests)
    for request in requests:
        assert request.case_id is not None and request.case_id.startswith("demo-")
        assert request.subject is not None and request.subject in request.prompt, request.case_id
        assert request.require_subject() == request.subject
        assert request.ground_truth and request.ground_truth != request.target_new
        assert len(request.rephrase) >= 2, request.case_id
        assert len(request.locality.get("neighborhood", ())) >= 2, request.case_id
        assert request.portability.get("one_hop"), request.case_id
        assert 1 <= len(request.target_new.split()) <= 3, request.case_id


def test_demo_set_round_trips() -> None:
    raw = _raw(demo_path())
    requests = load_requests()
    assert len(raw) == len(requests)
    for record, request in zip(raw, requests):
        assert request.to_dict() == record
        assert EditRequest.from_dict(request.to_dict()) == request
        assert EditRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


def test_demo_locality_probes_do_not_mention_any_edited_subject() -> None:
    requests = load_requests()
    subjects = [r.subject.lower() for r in requests if r.subject]
    for request in requests:
        for probe in request.locality["neighborhood"]:
            assert not any(s in probe.prompt.lower() for s in subjects), (request.case_id, probe.prompt)
