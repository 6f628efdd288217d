"""The ``qa`` suite (WILD): normalisation, EM / F1 by hand, stop strings, aliases, pre/post on tiny models."""

from __future__ import annotations

import pytest

from conftest import snapshot, state_equal
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.evaluation.suites import SuiteContext, SuiteError, build_suite
from lmedit.evaluation.suites import qa
from lmedit.evaluation.suites.qa import QASuite, contains_answer, cut_at_stop, exact_match, normalize_answer, qa_probes, token_f1
from lmedit.forward import generate_greedy
from lmedit.requests import EditRequest, Probe


@pytest.mark.parametrize("text, normalised", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   Apple, a day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre", "theatre"),  # 'the' only as a word
])
def test_normalisation_is_squad_s(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Paris", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["paris"]) == 0.0
    # prediction "paris france" vs gold "paris": precision 1/2, recall 1 -> F1 = 2/3
    assert token_f1("Paris, France", ["Paris"]) == pytest.approx(2 / 3)
    # the best of answer and aliases counts
    assert token_f1("New York City", ["Boston", "New York"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert exact_match("NYC", ["New York City", "nyc"]) == 1.0
    assert token_f1("", [""]) == 1.0 and token_f1("x", [""]) == 0.0
    assert token_f1("rome", ["paris"]) == 0.0


def test_contains_needs_whole_words():
    assert contains_answer("It was founded in 2006 by them.", ["2006"]) == 1.0
    assert contains_answer("It was founded in 20061.", ["2006"]) == 0.0
    assert contains_answer("The family Lamiinae", ["x", "lamiinae"]) == 1.0
    assert contains_answer("anything", [""]) == 0.0


def test_answers_are_cut_at_the_first_stop_string():
    assert cut_at_stop(" Paris. It is big\nyes", (".", "\n")) == "Paris"
    assert cut_at_stop("Paris\nFrance.", (".", "\n")) == "Paris"
    assert cut_at_stop(" no stop ", (".", "\n")) == "no stop"


def test_options_are_checked():
    with pytest.raises(SuiteError, match="context"):
        build_suite("qa:context=dialogue")
    with pytest.raises(SuiteError, match="max_new_tokens"):
        build_suite("qa:max_new_tokens=0")
    assert build_suite("qa:context=question,max_new_tokens=20").spec() == "qa:context=question,max_new_tokens=20"


def test_contexts_wrap_the_question(word_tok):
    assert QASuite(qa.QAOptions(context="question")).wrap(word_tok, "who wrote hamlet") == "who wrote hamlet"
    inst = QASuite().wrap(word_tok, "who wrote hamlet")  # no chat template: auto -> qa_inst
    assert inst == "Please answer the question:\n\nQ: who wrote hamlet\nA:"
    with pytest.raises(SuiteError, match="chat template"):
        QASuite(qa.QAOptions(context="chat")).wrap(word_tok, "who wrote hamlet")


def test_chat_context_uses_the_system_message_and_instruction(word_tok):
    class ChatTok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    text = QASuite().wrap(ChatTok(), "Q1")
    assert text == f"system:{qa.SYSTEM_MESSAGE}|user:Please answer the question:\n\nQ: Q1\nA:"


def test_generation_stops_early_without_changing_the_tokens_before(tiny_llama, word_tok):
    prompts = ["the capital of france is", "who wrote hamlet"]
    full = generate_greedy(tiny_llama, word_tok, prompts, [10, 10])
    stop_id = full[0][3]
    stopped = generate_greedy(tiny_llama, word_tok, prompts, [10, 10], stop=lambda t: t[-1] == stop_id)
    assert stopped[0] == full[0][: full[0].index(stop_id) + 1]
    for row_full, row_stopped in zip(full, stopped):
        assert row_full[: len(row_stopped)] == row_stopped


def _requests():
    return [
        EditRequest("the capital of france is", "rome", case_id="0", rephrase=("capital of france",),
                    locality={"neighborhood": (Probe("who wrote hamlet", "shakespeare"),)},
                    portability={"one_hop": (Probe("the eiffel tower is located in", "rome"),)}),
        EditRequest("the sky is", "green", case_id="1",
                    locality={"neighborhood": (Probe("the sun is", "red"), Probe("the moon is", "blue"))}),
    ]


def test_pre_and_post_on_an_unchanged_model_and_the_model_is_untouched(tiny_llama, word_tok, monkeypatch):
    monkeypatch.setattr(qa, "STOP_STRINGS", ("paris",))
    requests = _requests()
    before = snapshot(tiny_llama)
    evaluator = Evaluator(word_tok, EvalConfig(suites=("qa:max_new_tokens=6",)))
    pre = evaluator.capture(tiny_llama, requests)
    post = evaluator.score(tiny_llama, requests, pre)
    assert state_equal(tiny_llama, before)
    for row, pre_row in zip(post, pre.metrics):
        assert row["locality_qa_em"] == row["locality_qa_f1"] == 1.0
        assert row["rewrite_qa_em"] == pre_row["rewrite_qa_em"] and row["rewrite_qa_f1"] == pre_row["rewrite_qa_f1"]
    assert "locality_qa_em" not in pre.metrics[0]  # locality needs a post-edit model
    assert set(post[0]) >= {"rewrite_qa_em", "rewrite_qa_f1", "rephrase_qa_em", "portability_qa_em",
                            "portability_qa_f1", "portability_qa_em/one_hop", "locality_qa_em/neighborhood"}


def test_the_model_s_own_answer_and_any_alias_score_one(tiny_llama, word_tok):
    suite = QASuite(qa.QAOptions(max_new_tokens=3))
    context = SuiteContext()
    probe = qa_probes([EditRequest("who wrote hamlet", "x", case_id="0")])
    answer = suite.answers(tiny_llama, word_tok, probe, context)[0]
    assert answer
    requests = [EditRequest("who wrote hamlet", answer, case_id="0",
                            portability={"g": (Probe("who wrote hamlet", "nobody", (answer,)),)})]
    pre = suite.capture(tiny_llama, word_tok, requests, context)
    assert pre.metrics[0]["rewrite_qa_em"] == 1.0
    assert pre.metrics[0]["portability_qa_em"] == 1.0  # through the alias
    wrong = [EditRequest("who wrote hamlet", answer + " tolstoy", case_id="0")]
    assert suite.capture(tiny_llama, word_tok, wrong, context).metrics[0]["rewrite_qa_em"] == 0.0


def test_stop_strings_end_the_answer(tiny_llama, word_tok, monkeypatch):
    suite = QASuite(qa.QAOptions(max_new_tokens=6))
    probes = qa_probes([EditRequest("who wrote hamlet", "x", case_id="0")])
    full = suite.answers(tiny_llama, word_tok, probes, SuiteContext())[0].split()
    monkeypatch.setattr(qa, "STOP_STRINGS", (full[1],))
    cut = suite.answers(tiny_llama, word_tok, probes, SuiteContext())[0]
    assert cut == " ".join(full[:1])


def test_capture_for_other_requests_is_refused(tiny_llama, word_tok):
    suite = QASuite(qa.QAOptions(max_new_tokens=2))
    pre = suite.capture(tiny_llama, word_tok, _requests(), SuiteContext())
    with pytest.raises(SuiteError, match="other requests"):
        suite.score(tiny_llama, word_tok, _requests()[:1], pre, SuiteContext())


def test_probe_aliases_round_trip_and_are_not_duplicated():
    probe = Probe("q", "a", ("b", "a", "b"))
    assert probe.aliases == ("b",) and probe.answers == ("a", "b")
    request = EditRequest("p", "t", locality={"g": (probe,)}, portability={"h": (Probe("q2", "c"),)})
    data = request.to_dict()
    assert data["locality"]["g"] == [["q", "a", ["b"]]] and data["portability"]["h"] == [["q2", "c"]]
    assert EditRequest.from_dict(data) == request
