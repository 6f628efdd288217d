import pytest

from lmedit.requests import EditRequest, Probe, RequestError


def test_request_normalises_probe_groups_and_rephrase():
    r = EditRequest("Paris is in", "Italy", subject="Paris", rephrase="Paris lies in",
                    locality={"nb": [("Berlin is in", "Germany"), {"prompt": "x", "ground_truth": "y"}]},
                    portability={"hop": ("Q", "A")}, case_id=7)
    assert r.rephrase == ("Paris lies in",)
    assert r.locality["nb"] == (Probe("Berlin is in", "Germany"), Probe("x", "y"))
    assert r.portability["hop"] == (Probe("Q", "A"),)
    assert r.case_id == "7"
    assert EditRequest.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "p", "target_new": "  "}, "target_new is empty"),
    ({"prompt": "", "target_new": "t"}, "prompt is empty"),
    ({"prompt": 3, "target_new": "t"}, "prompt must be a string"),
    ({"prompt": "p", "target_new": "t", "rephrase": [1]}, "rephrase must be"),
    ({"prompt": "p", "target_new": "t", "locality": ["x"]}, "locality must map"),
    ({"prompt": "p", "target_new": "t", "locality": {"g": [("a",)]}}, "probe must be"),
])
def test_invalid_requests_say_what_is_wrong(kwargs, message):
    with pytest.raises(RequestError, match=message):
        EditRequest(**kwargs)


def test_subject_must_occur_in_prompt_for_methods_that_need_it():
    with pytest.raises(RequestError, match="needs the subject"):
        EditRequest("Paris is in", "Italy").require_subject()
    with pytest.raises(RequestError, match="does not occur"):
        EditRequest("Paris is in", "Italy", subject="Rome").require_subject()
    assert EditRequest("Paris is in", "Italy", subject="Paris").require_subject() == "Paris"


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(RequestError, match="unknown request field"):
        EditRequest.from_dict({"prompt": "p", "target_new": "t", "target": "x"})
