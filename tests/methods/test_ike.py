"""IKE invariants: no weight changes, the context EasyEdit feeds, retrieval, memory accumulation,
exact restore, save/load, the pool cache. A bag-of-words encoder stands in for all-MiniLM-L6-v2."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from conftest import build_tiny_llama, snapshot, state_equal
from lmedit.encoders import register_encoder
from lmedit.evaluation import EvalConfig, Evaluator, score_teacher_forced
from lmedit.handles import restore_all
from lmedit.registry import load_edit
from lmedit.hparams import HyperParamsError
from lmedit.methods import ike
from lmedit.registry import get_method
from lmedit.requests import EditRequest
from lmedit.routing import router_of

POOL = [
    {"prompt": "the capital of italy is", "target_new": "paris", "rephrase": ["the city of italy is"],
     "locality": {"n": [["who wrote hamlet", "shakespeare"]]}},
    {"prompt": "the king plays", "target_new": "violin", "rephrase": ["the sport of the king is"],
     "locality": {"n": [["the sky color is", "blue"]]}},
    {"prompt": "the river of london is", "target_new": "madrid", "rephrase": [], "locality": {}},
]
FRANCE = EditRequest("the capital of france is", "rome", case_id="france", rephrase=("the city of france is",),
                     locality={"n": [("who wrote hamlet", "shakespeare")]})
SKY = EditRequest("the sky color is", "green", case_id="sky", rephrase=("the color of the sky is",))


class BagOfWords:
    """Deterministic bag-of-words hashing into 4096 dimensions; counts its encode calls."""

    name = "test-bag-of-words"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = torch.zeros(len(texts), 4096)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                if word in ("new", "fact", "prompt", "the", "of", "is"):
                    continue
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 4096] += 1.0
        return torch.nn.functional.normalize(out + 1e-6, dim=1)


ENCODER = BagOfWords()
register_encoder(ENCODER.name, lambda: ENCODER)


@pytest.fixture
def pool_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    ike._POOLS.clear()
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(POOL))
    return path


def _hparams(pool_file, **overrides):
    info = get_method("IKE")
    values = {"train_file": str(pool_file), "k": 2, "encoder": ENCODER.name, **overrides}
    return info, info.load_hparams(overrides=values)


def test_demo_sentences_are_the_three_ike_kinds():
    request = EditRequest("the king plays", "violin", rephrase=("the sport of the king is",),
                          locality={"n": [("the sky color is", "blue")]})
    assert ike.demo_sentences(request) == [
        "New Fact: the king plays violin\nPrompt: the king plays violin\n\n",  # copy
        "New Fact: the king plays violin\nPrompt: the sport of the king is violin\n\n",  # update
        "New Fact: the king plays violin\nPrompt: the sky color is blue\n\n",  # retain
    ]
    assert ike.retrieval_query(request) == "New Fact: the king plays violin\nPrompt: the king plays\n\n"


def test_edit_changes_no_weight_and_feeds_easyedit_context(tiny_llama, word_tok, pool_file):
    info, hparams = _hparams(pool_file)
    original = snapshot(tiny_llama)
    evaluator = Evaluator(word_tok, EvalConfig(mode="teacher"))
    pre = evaluator.capture(tiny_llama, [FRANCE])
    handle = info.apply(tiny_llama, word_tok, [FRANCE], hparams)
    router = router_of(tiny_llama)
    assert isinstance(router, ike.IKERouter) and state_equal(tiny_llama, original)
    demos = router.facts[0].demos
    assert len(demos) == 2
    assert "italy" in demos[0]  # the pool's nearest sentences to "... capital of france ..."
    probes = evaluator.probes([FRANCE])
    outcomes = evaluator.run_probes(tiny_llama, probes)
    for probe, outcome in zip(probes, outcomes):
        fed = "".join(demos) + f"New Fact: the capital of france is rome\nPrompt: {probe.prompt}"
        expected = score_teacher_forced(tiny_llama, word_tok, [(fed, probe.answer)], packing=False)[0]
        assert outcome.teacher_predicted == expected.predicted_ids
        assert outcome.teacher_nll == pytest.approx(expected.mean_nll, abs=1e-5)
    post = evaluator.score(tiny_llama, [FRANCE], pre)[0]
    assert set(post) >= {"rewrite_acc", "rephrase_acc", "locality"}
    handle.restore()
    assert router_of(tiny_llama) is None and state_equal(tiny_llama, original)
    assert [o.teacher_predicted for o in evaluator.run_probes(tiny_llama, probes)] == [
        o.teacher_predicted for o in pre.outcomes]


def test_demo_order_and_new_fact_demo(tiny_llama, word_tok, pool_file):
    info, first = _hparams(pool_file)
    handle = info.apply(tiny_llama, word_tok, [FRANCE], first)
    nearest_first = router_of(tiny_llama).facts[0].demos
    handle.restore()
    info, last = _hparams(pool_file, demo_order="most_similar_last", new_fact_demo=True)
    handle = info.apply(tiny_llama, word_tok, [FRANCE], last)
    router = router_of(tiny_llama)
    assert router.facts[0].demos == tuple(reversed(nearest_first))
    context = router.route(tiny_llama, word_tok, ["the city of france is"])[0].prompt
    assert context.endswith(
        "New Fact: the capital of france is rome\nPrompt: the capital of france is rome\n\n"
        "New Fact: the capital of france is rome\nPrompt: the city of france is")
    handle.restore()


def test_prompt_method_needs_no_pool(tiny_llama, word_tok):
    info = get_method("IKE")
    hparams = info.load_hparams(overrides={"k": 0, "encoder": ENCODER.name})
    handle = info.apply(tiny_llama, word_tok, [FRANCE], hparams)
    route = router_of(tiny_llama).route(tiny_llama, word_tok, ["who wrote hamlet"])[0]
    assert route.prompt == "New Fact: the capital of france is rome\nPrompt: who wrote hamlet" and route.model is None
    handle.restore()
    with pytest.raises(HyperParamsError, match="train_file"):
        info.load_hparams(overrides={"k": 4})


def test_sequential_edits_accumulate_and_route_to_the_nearest_fact(tiny_llama, word_tok, pool_file):
    info, hparams = _hparams(pool_file)
    original = snapshot(tiny_llama)
    handles = [info.apply(tiny_llama, word_tok, [r], hparams) for r in (FRANCE, SKY)]
    router = router_of(tiny_llama)
    assert [f.fact_id for f in router.facts] == ["france", "sky"]
    routes = router.route(tiny_llama, word_tok, ["the city of france is", "the color of the sky is"])
    assert routes[0].prompt.endswith("New Fact: the capital of france is rome\nPrompt: the city of france is")
    assert routes[1].prompt.endswith("New Fact: the sky color is green\nPrompt: the color of the sky is")
    # any order of restore is exact: the memory is a set of facts
    handles[0].restore()
    assert [f.fact_id for f in router.facts] == ["sky"] and router_of(tiny_llama) is router
    handles[1].restore()
    assert router_of(tiny_llama) is None and state_equal(tiny_llama, original)


def test_nearest_facts_two_adds_the_second_fact_line(tiny_llama, word_tok, pool_file):
    info, hparams = _hparams(pool_file, k=0, nearest_facts=2)
    handle = info.apply(tiny_llama, word_tok, [FRANCE, SKY], hparams)  # a batch goes into the same memory
    context = router_of(tiny_llama).route(tiny_llama, word_tok, ["the city of france is"])[0].prompt
    assert context == ("New Fact: the sky color is green\n"
                       "New Fact: the capital of france is rome\nPrompt: the city of france is")
    handle.restore()


def test_fact_ids_stay_unique(tiny_llama, word_tok):
    info = get_method("IKE")
    hparams = info.load_hparams(overrides={"k": 0, "encoder": ENCODER.name})
    twin = EditRequest("the sky color is", "red", case_id="france")
    first = info.apply(tiny_llama, word_tok, [FRANCE, twin], hparams)
    second = info.apply(tiny_llama, word_tok, [FRANCE], hparams)
    ids = [f.fact_id for f in router_of(tiny_llama).facts]
    assert ids[0] == "france" and len(set(ids)) == 3
    second.restore()
    assert [f.fact_id for f in router_of(tiny_llama).facts] == ids[:2]
    first.restore()
    assert router_of(tiny_llama) is None


def test_routing_does_not_change_the_memory(tiny_llama, word_tok, pool_file):
    info, hparams = _hparams(pool_file)
    handles = [info.apply(tiny_llama, word_tok, [r], hparams) for r in (FRANCE, SKY)]
    router = router_of(tiny_llama)
    facts, keys, made = list(router.facts), router.keys.clone(), router.edits_made
    Evaluator(word_tok, EvalConfig(mode="both")).run_probes(tiny_llama, Evaluator(word_tok).probes([FRANCE, SKY]))
    assert router.facts == facts and torch.equal(router.keys, keys) and router.edits_made == made
    restore_all(handles)


def test_settings_must_match_the_memory(tiny_llama, word_tok, pool_file):
    info, hparams = _hparams(pool_file)
    handle = info.apply(tiny_llama, word_tok, [FRANCE], hparams)
    with pytest.raises(HyperParamsError, match="same settings"):
        info.apply(tiny_llama, word_tok, [SKY], hparams.replace(nearest_facts=3))
    handle.restore()


def test_save_and_load_round_trip(tiny_llama, word_tok, pool_file, tmp_path):
    info, hparams = _hparams(pool_file)
    handles = [info.apply(tiny_llama, word_tok, [r], hparams) for r in (FRANCE, SKY)]
    prompts = ["the city of france is", "the color of the sky is", "who wrote hamlet"]
    expected = [r.prompt for r in router_of(tiny_llama).route(tiny_llama, word_tok, prompts)]
    handles[-1].save(tmp_path / "edit")
    assert json.loads((tmp_path / "edit" / "edit.json").read_text())["format"] == "lmedit-ike"
    restore_all(handles)
    fresh = build_tiny_llama(len(word_tok))
    original = snapshot(fresh)
    loaded = load_edit(fresh, tmp_path / "edit")
    assert [r.prompt for r in router_of(fresh).route(fresh, word_tok, prompts)] == expected
    loaded.restore()
    assert router_of(fresh) is None and state_equal(fresh, original)


def test_pool_embeddings_are_cached_on_disk(pool_file):
    ike._POOLS.clear()
    calls = ENCODER.calls
    first = ike.load_demo_pool(str(pool_file), ENCODER)
    assert ENCODER.calls > calls and len(first.sentences) == 3 + 2 + 2
    cached = list((ike.pool_cache_dir()).glob("*.safetensors"))
    assert len(cached) == 1
    ike._POOLS.clear()
    calls = ENCODER.calls
    second = ike.load_demo_pool(str(pool_file), ENCODER)
    assert ENCODER.calls == calls  # read back, not re-encoded
    assert second.sentences == first.sentences and torch.equal(second.embeddings, first.embeddings)
    ike._POOLS.clear()
    ike.load_demo_pool(str(pool_file), ENCODER, pool_size=1)  # other settings: another cache entry
    assert len(list(ike.pool_cache_dir().glob("*.safetensors"))) == 2


def test_missing_train_file_names_the_fix(tiny_llama, word_tok, tmp_path):
    info = get_method("IKE")
    hparams = info.load_hparams(overrides={"train_file": str(tmp_path / "nope.json"), "encoder": ENCODER.name})
    with pytest.raises(HyperParamsError, match="does not exist"):
        info.apply(tiny_llama, word_tok, [FRANCE], hparams)
    assert router_of(tiny_llama) is None


@pytest.mark.embedded
def test_ike_on_the_embedded_model(embedded, shared_data, tmp_path, monkeypatch):
    """The real encoder and a small real pool (first 100 CounterFact training facts, k=4): IKE installs zsRE edits."""
    from lmedit.data import load_requests

    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    model, tok = embedded
    requests = load_requests(shared_data / "zsre" / "zsre_mend_eval_portability_gpt4.json", limit=3)
    info = get_method("IKE")
    hparams = info.load_hparams("smollm2-135m", overrides={
        "train_file": str(shared_data / "counterfact" / "counterfact-train.json"), "pool_size": 100, "k": 4})
    evaluator = Evaluator(tok, EvalConfig(mode="teacher"))
    pre = evaluator.capture(model, requests)
    original = snapshot(model)
    rewrite = []
    for index, request in enumerate(requests):
        handle = info.apply(model, tok, [request], hparams)
        rewrite.append(evaluator.score(model, [request], pre.subset([index]))[0]["rewrite_acc"])
        handle.restore()
    assert state_equal(model, original) and router_of(model) is None
    before = sum(m["rewrite_acc"] for m in pre.metrics) / len(requests)
    assert sum(rewrite) / len(rewrite) > before + 0.3
