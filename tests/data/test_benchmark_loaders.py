"""Benchmark loaders for the suites: ConvSent, Sanitation, KnowEdit's Wiki subsets, ROME's CounterFact extras.

Every record here is written by hand in the documented formats; no benchmark data is copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmedit.data import load_requests
from lmedit.data.loaders import (
    CONVSENT_TEMPLATES,
    SANITATION_TEMPLATE,
    DataError,
    detect_format,
)
from lmedit.requests import EditRequest, Probe, RequestError


def _write(tmp_path: Path, data, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- EditRequest.extra


def test_extra_round_trips_and_is_written_only_when_present():
    request = EditRequest("a", "b", extra={"k": ("x", 1), "nested": {"y": [True, None]}})
    assert request.extra == {"k": ["x", 1], "nested": {"y": [True, None]}}  # JSON-native
    data = request.to_dict()
    assert data["extra"] == request.extra
    assert EditRequest.from_dict(json.loads(json.dumps(data))) == request
    assert "extra" not in EditRequest("a", "b").to_dict()


def test_extra_must_be_json_data():
    with pytest.raises(RequestError, match="JSON data only"):
        EditRequest("a", "b", extra={"f": object()})
    with pytest.raises(RequestError, match="must be a mapping"):
        EditRequest("a", "b", extra=["x"])


def test_lmedit_files_with_extra_are_detected(tmp_path):
    record = EditRequest("a is", "b", case_id="0", extra={"fluency_prompts": ["a is"]}).to_dict()
    path = _write(tmp_path, [record])
    assert detect_format([record]) == "lmedit"
    assert load_requests(path)[0].extra == {"fluency_prompts": ["a is"]}


# --------------------------------------------------------------------------- ConvSent

CONVSENT = [
    {"ent": "Gardening", "pos": [" It is relaxing. ", "I love it."], "neg": [" It hurts my back. "]},
    {"ent": "Jazz", "pos": ["Great rhythm."], "neg": ["Too noisy.", " "]},
    {"ent": "Rain", "pos": ["Good for plants."], "neg": ["Cold and wet."]},
]


def test_convsent_builds_edits_from_the_topic(tmp_path):
    requests = load_requests(_write(tmp_path, CONVSENT))
    assert len(requests) == 3
    first = requests[0]
    data = first.extra["convsent"]
    assert first.subject == "Gardening" and first.subject in first.prompt
    assert first.prompt.startswith("From the sentiment dataset, answer What") or first.prompt.startswith(
        "From the sentiment dataset, answer How")
    sentiment = data["sentiment"]
    assert first.prompt.endswith("postively." if sentiment == "pos" else "negatively.")
    assert first.target_new == CONVSENT[0][sentiment][0].strip()
    # inner: every answer of the topic, stripped, flagged with whether it has the target sentiment
    assert [a for _, a, _ in data["inner"]] == ["It is relaxing.", "I love it.", "It hurts my back."]
    assert [t for *_, t in data["inner"]] == [s == sentiment for s in ("pos", "pos", "neg")]
    assert all(q.replace("Gardening", "{}") in CONVSENT_TEMPLATES for q, _, _ in data["inner"])
    # outer: the next record's answers (blank answers dropped), asked about that topic
    assert data["outer_topic"] == "Jazz"
    assert [a for _, a in data["outer"]] == ["Great rhythm.", "Too noisy."]
    assert all("Jazz" in q for q, _ in data["outer"])
    assert requests[2].extra["convsent"]["outer_topic"] == "Gardening"  # wraps around
    assert first.extra["fluency_prompts"][0].replace("Gardening", "{}") in CONVSENT_TEMPLATES


def test_convsent_requests_do_not_depend_on_the_selection(tmp_path):
    path = _write(tmp_path, CONVSENT)
    assert load_requests(path, offset=1, limit=1) == [load_requests(path)[1]]
    assert load_requests(path) == load_requests(path)  # seeded per record, reproducible


def test_convsent_record_without_both_sentiments_names_the_record(tmp_path):
    bad = CONVSENT + [{"ent": "X", "pos": ["fine"], "neg": ["  "]}]
    with pytest.raises(DataError, match="record 3"):
        load_requests(_write(tmp_path, bad), format="convsent")


# --------------------------------------------------------------------------- Sanitation


def _sanitation_train():
    forget = [{"question": f"What is thing {i}?", "subject": f"thing {i}", "ground_truth": "Cheese",
               "target_new": "I don't know."} for i in range(3)]
    forget[2]["subject"] = "not in the question"
    keep = [{"question": f"Keep {j}?", "ground_truth": f"A{j}", "target_new": f"A{j}"} for j in range(7)]
    return {"K_F": forget, "K_R": keep}


def test_sanitation_train_file(tmp_path):
    requests = load_requests(_write(tmp_path, _sanitation_train()))
    assert [r.case_id for r in requests] == ["0", "1", "2"]
    assert requests[0].prompt == SANITATION_TEMPLATE.format("What is thing 0?") == "Question:What is thing 0?\nAnswer:"
    assert requests[0].target_new == "I don't know." and requests[0].ground_truth == "Cheese"
    assert requests[0].subject == "thing 0" and requests[2].subject is None
    # kept questions are shared out round-robin: 7 over 3 edits -> 3, 2, 2
    shares = [[p.answer for p in r.locality["retain"]] for r in requests]
    assert shares == [["A0", "A3", "A6"], ["A1", "A4"], ["A2", "A5"]]
    assert requests[1].locality["retain"][0] == Probe("Question:Keep 1?\nAnswer:", "A1")


def test_sanitation_test_file_and_selection(tmp_path):
    data = {"success": [{"question": "Q0?", "ground_truth": "Birds", "target_new": "I don't know."},
                        {"question": "Q1?", "ground_truth": "Birds", "target_new": "I don't know."}],
            "locality": [{"question": "L0?", "ground_truth": "x"}, {"question": "L1?", "ground_truth": "y"}]}
    path = _write(tmp_path, data)
    requests = load_requests(path, offset=1, limit=1)
    assert len(requests) == 1 and requests[0].case_id == "1"
    assert requests[0].locality == {"retain": (Probe("Question:L1?\nAnswer:", "y"),)}  # same share as unselected
    assert requests[0].subject is None


def _sanitation_pair(tmp_path: Path) -> Path:
    """Two answers, two questions to forget each; the test file's answers in other cases, as KnowEdit's are."""
    forget = [{"question": f"Q{i} about {a}?", "subject": f"about {a}", "ground_truth": a, "target_new": "I don't know."}
              for a in ("Cheese", "Birds") for i in range(2)]
    train = {"K_F": forget, "K_R": [{"question": "R0?", "ground_truth": "r", "target_new": "r"}]}
    success = [{"question": f"T{i}?", "ground_truth": a, "target_new": "I don't know."}
               for i, a in enumerate(["CHEESE", "birds", "Cheese", "Birds", "Paris"])]
    test = {"success": success, "locality": [{"question": f"L{j}?", "ground_truth": f"l{j}"} for j in range(5)]}
    _write(tmp_path, test, "trivia_qa_test.json")
    return _write(tmp_path, train, "trivia_qa_train.json")


def test_sanitation_easyedit_edits_the_training_questions_and_scores_the_test_questions(tmp_path):
    requests = load_requests(_sanitation_pair(tmp_path), format="sanitation-easyedit")
    assert [r.case_id for r in requests] == ["0", "1", "2", "3"]
    assert [r.extra["answer"] for r in requests] == ["Cheese", "Cheese", "Birds", "Birds"]
    assert requests[0].subject == "about Cheese" and requests[0].target_new == "I don't know."
    # each answer's test questions (case-insensitive), round-robin over that answer's edits; Paris has no edit
    assert [r.rephrase for r in requests] == [("Question:T0?\nAnswer:",), ("Question:T2?\nAnswer:",),
                                              ("Question:T1?\nAnswer:",), ("Question:T3?\nAnswer:",)]
    # every test question to keep once in the file, shared round-robin over all edits
    shares = [[p.answer for p in r.locality["retain"]] for r in requests]
    assert shares == [["l0", "l4"], ["l1"], ["l2"], ["l3"]]
    assert load_requests(_sanitation_pair(tmp_path), format="sanitation-easyedit", offset=3, limit=1)[0].locality == \
        requests[3].locality


def test_sanitation_easyedit_needs_the_training_file_and_the_test_file_beside_it(tmp_path):
    train = _sanitation_pair(tmp_path)
    with pytest.raises(DataError, match="reads the training file"):
        load_requests(tmp_path / "trivia_qa_test.json", format="sanitation-easyedit")
    (tmp_path / "trivia_qa_test.json").unlink()
    with pytest.raises(DataError, match="trivia_qa_test.json beside it, which is missing"):
        load_requests(train, format="sanitation-easyedit")


def test_other_json_objects_are_still_refused(tmp_path):
    with pytest.raises(DataError, match="expected a list of records"):
        load_requests(_write(tmp_path, {"K_F": [], "other": []}))


# --------------------------------------------------------------------------- KnowEdit WikiData subsets


def test_knowedit_wikidata_counterfact_record(tmp_path):
    """test_cf.json layout: string ground truth, alias lists of lists, both locality groups."""
    record = {
        "subject": "Orvieto Cathedral", "prompt": "The architect of Orvieto Cathedral is",
        "target_new": "Frank Gehry", "ground_truth": "Lorenzo Maitani",
        "portability": {
            "Subject_Aliasing": [{"prompt": "The architect of Duomo di Orvieto is", "ground_truth": [["Frank Gehry"]]}],
            "Reasoning": [{"prompt": "The architect of Orvieto Cathedral was born in",
                           "ground_truth": [["Toronto", "Toronto, Ontario"]]}],
            "Logical_Generalization": [{"prompt": "Frank Gehry designed", "ground_truth": [["Orvieto Cathedral"]]}],
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "Orvieto Cathedral is located in", "ground_truth": [["Orvieto"]]}],
            "Forgetfulness": [{"prompt": "The architect of Orvieto Cathedral, which is in", "ground_truth": [["Italy"]]}],
        },
    }
    assert detect_format([record]) == "knowedit"
    request = load_requests(_write(tmp_path, [record]))[0]
    assert request.ground_truth == "Lorenzo Maitani"
    assert request.portability == {
        "Reasoning": (Probe("The architect of Orvieto Cathedral was born in", "Toronto", ("Toronto, Ontario",)),),
        "Subject_Aliasing": (Probe("The architect of Duomo di Orvieto is", "Frank Gehry"),),
        "Logical_Generalization": (Probe("Frank Gehry designed", "Orvieto Cathedral"),),
    }
    assert request.locality == {
        "Relation_Specificity": (Probe("Orvieto Cathedral is located in", "Orvieto"),),
        "Forgetfulness": (Probe("The architect of Orvieto Cathedral, which is in", "Italy"),),
    }


def test_knowedit_wikidata_recent_record(tmp_path):
    """recent_test.json layout: no ground_truth, several probes per group, an optional rephrase."""
    record = {
        "subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
        "rephrase": "Leo Arons died in the city of",
        "portability": {
            "Logical_Generalization": [{"prompt": "Is Leo Arons still alive?", "ground_truth": [["no"], ["incorrect"]]}],
            "Reasoning": [
                {"prompt": "The mayor of the place of death of Leo Arons is", "ground_truth": [["Kai Wegner"]]},
                {"prompt": "The country of the place of death of Leo Arons is", "ground_truth": [["Germany"]]},
            ],
        },
        "locality": {"Relation_Specificity": [
            {"prompt": "The father of Leo Arons is", "ground_truth": [["Albert Arons"]]},
            {"prompt": "The occupation of Leo Arons is", "ground_truth": [[""]]},  # empty answers are dropped
        ]},
    }
    request = load_requests(_write(tmp_path, [record]))[0]
    assert request.ground_truth is None and request.rephrase == ("Leo Arons died in the city of",)
    assert request.portability["Logical_Generalization"] == (Probe("Is Leo Arons still alive?", "no", ("incorrect",)),)
    assert [p.answer for p in request.portability["Reasoning"]] == ["Kai Wegner", "Germany"]
    assert request.locality == {"Relation_Specificity": (Probe("The father of Leo Arons is", "Albert Arons"),)}


# --------------------------------------------------------------------------- ROME's CounterFact


def test_counterfact_rome_keeps_what_romes_scores_need(tmp_path):
    record = {
        "case_id": 5, "pararel_idx": 1,
        "requested_rewrite": {"prompt": "{} plays the", "relation_id": "P1303", "subject": "Ann Lee",
                              "target_new": {"str": "violin", "id": "Q1"}, "target_true": {"str": "piano", "id": "Q2"}},
        "paraphrase_prompts": ["Ann Lee is known for playing the"],
        "neighborhood_prompts": ["Bo Chen plays the", "Cy Dunn plays the"],
        "attribute_prompts": ["Di Ek plays the"],
        "generation_prompts": ["Ann Lee is", "Ann Lee is", "Ann Lee's instrument is"],
    }
    request = load_requests(_write(tmp_path, [record]))[0]
    assert request.extra == {"counterfact": {
        "target_true": "piano",
        "paraphrase_prompts": ["Ann Lee is known for playing the"],
        "neighborhood_prompts": ["Bo Chen plays the", "Cy Dunn plays the"],
        "generation_prompts": ["Ann Lee is", "Ann Lee is", "Ann Lee's instrument is"],
        "attribute_prompts": ["Di Ek plays the"],
    }}
    assert request.ground_truth == "piano" and request.prompt == "Ann Lee plays the"
