"""Probe routing: the registry, and the evaluator scoring a routed model exactly as its routes dictate."""

from __future__ import annotations

import copy
import gc
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import pytest
import torch

from conftest import LONG_DEMOS, build_tiny_llama
from lmedit.evaluation import EvalConfig, Evaluator, score_teacher_forced
from lmedit.forward import generate_greedy
from lmedit.requests import EditRequest
from lmedit.routing import (
    Route,
    RoutingError,
    attach_router,
    detach_router,
    generate_routed,
    route_prompts,
    router_of,
)

PREFIX = "the sky color is green and "
REQUESTS = [
    EditRequest("the capital of france is", "rome", rephrase=("the city of france is",),
                locality={"n": [("who wrote hamlet", "shakespeare")]},
                portability={"p": [("the river of the capital of france is", "london")]}),
    EditRequest("who wrote hamlet", "tolstoy", locality={"n": [("the capital of germany is", "berlin")]}),
    EditRequest("the sport of the king is", "tennis", rephrase=("the king plays", "the king was born in")),
]

CALLS: list[int] = []  # route calls are logged outside the routers, so the routers themselves stay unchanged


@dataclass
class PrefixRouter:
    """Feeds every prompt that mentions ``word`` behind a fixed prefix; the others pass unchanged."""

    word: str = "france"
    prefix: str = PREFIX
    kind: str = "prefix"

    def route(self, model: Any, tok: Any, prompts: Sequence[str]) -> list[Route]:
        CALLS.append(len(prompts))
        return [Route(self.prefix + p, name="prefixed") if self.word in p else Route(p) for p in prompts]


@dataclass
class SwapRouter:
    """Sends prompts that mention ``word`` to another network (like SERAC's counterfactual model)."""

    other: torch.nn.Module
    word: str = "hamlet"
    seen: list[str] = field(default_factory=list)  # never written by route: the state test checks it
    kind: str = "swap"

    def route(self, model: Any, tok: Any, prompts: Sequence[str]) -> list[Route]:
        CALLS.append(len(prompts))
        return [Route(p, self.other, "other") if self.word in p else Route(p) for p in prompts]


class WrongCountRouter:
    def route(self, model: Any, tok: Any, prompts: Sequence[str]) -> list[Route]:
        return [Route(p) for p in prompts[:-1]]


@pytest.fixture
def other_model(word_tok):
    return build_tiny_llama(len(word_tok), seed=7)


def _teacher(model, tok, prompt, answer):
    return score_teacher_forced(model, tok, [(prompt, answer)], packing=False)[0]


# --------------------------------------------------------------------------- registry


def test_registry_attach_detach_and_refusals(tiny_llama, other_model):
    assert router_of(tiny_llama) is None
    first = PrefixRouter()
    attach_router(tiny_llama, first)
    attach_router(tiny_llama, first)  # the same router again: nothing happens
    assert router_of(tiny_llama) is first
    with pytest.raises(RoutingError, match="prefix router cannot|already carries a prefix router"):
        attach_router(tiny_llama, SwapRouter(other_model))
    with pytest.raises(RoutingError, match="add the new edits to it"):
        attach_router(tiny_llama, PrefixRouter(word="hamlet"))
    with pytest.raises(RoutingError, match="different"):
        detach_router(tiny_llama, PrefixRouter())
    detach_router(tiny_llama, first)
    assert router_of(tiny_llama) is None
    detach_router(tiny_llama, first)  # detaching twice is harmless
    with pytest.raises(RoutingError, match="not a probe router"):
        attach_router(tiny_llama, object())  # type: ignore[arg-type]


def test_registry_is_weak(word_tok):
    model = build_tiny_llama(len(word_tok))
    router = PrefixRouter()
    attach_router(model, router)
    from lmedit import model_state

    assert model_state.owners(model) == ["router"]
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the router's slot does not keep the model alive


def test_wrong_number_of_routes_is_an_error(tiny_llama, word_tok):
    attach_router(tiny_llama, WrongCountRouter())
    try:
        with pytest.raises(RoutingError, match="2 routes for 3 prompts"):
            route_prompts(tiny_llama, word_tok, ["a", "b", "c"])
    finally:
        detach_router(tiny_llama, router_of(tiny_llama))


# --------------------------------------------------------------------------- scoring through routes


def test_prefix_router_changes_scores_as_its_routes_say(tiny_llama, word_tok):
    evaluator = Evaluator(word_tok, EvalConfig(mode="both"))
    pre = evaluator.capture(tiny_llama, REQUESTS)
    router = PrefixRouter()
    attach_router(tiny_llama, router)
    try:
        CALLS.clear()
        probes = evaluator.probes(REQUESTS)
        routed = evaluator.run_probes(tiny_llama, probes)
        assert CALLS == [len(probes)]  # every probe prompt routed in one call
        post = evaluator.score(tiny_llama, REQUESTS, pre)
    finally:
        detach_router(tiny_llama, router)
    changed = 0
    for probe, outcome, bare in zip(probes, routed, pre.outcomes):
        fed = PREFIX + probe.prompt if "france" in probe.prompt else probe.prompt
        expected = _teacher(tiny_llama, word_tok, fed, probe.answer)
        assert outcome.teacher_predicted == expected.predicted_ids
        assert outcome.teacher_nll == pytest.approx(expected.mean_nll, abs=1e-5)
        answer_len = len(expected.target_ids)
        assert outcome.generated == generate_greedy(tiny_llama, word_tok, [fed], [answer_len])[0]
        if fed == probe.prompt:
            assert outcome.teacher_predicted == bare.teacher_predicted
        else:
            changed += outcome.teacher_nll != pytest.approx(bare.teacher_nll, abs=1e-6)
    assert changed >= 2  # the prefix really changed what the france probes saw
    # locality compares the bare pre-edit model with the routed post-edit model: request 1's locality
    # prompt does not mention france, so it is unchanged; the keys of pre and post still line up
    assert post[1]["locality"] == 1.0


def test_swap_router_scores_with_the_route_model(tiny_llama, other_model, word_tok):
    evaluator = Evaluator(word_tok, EvalConfig(mode="teacher"))
    probes = evaluator.probes(REQUESTS)
    attach_router(tiny_llama, SwapRouter(other_model))
    try:
        routed = evaluator.run_probes(tiny_llama, probes)
    finally:
        detach_router(tiny_llama, router_of(tiny_llama))
    swapped = 0
    for probe, outcome in zip(probes, routed):
        scorer = other_model if "hamlet" in probe.prompt else tiny_llama
        expected = _teacher(scorer, word_tok, probe.prompt, probe.answer)
        assert outcome.teacher_predicted == expected.predicted_ids
        assert outcome.teacher_nll == pytest.approx(expected.mean_nll, abs=1e-5)
        swapped += scorer is other_model
    assert swapped == 2


def test_routing_leaves_router_state_unchanged(tiny_llama, other_model, word_tok):
    router = SwapRouter(other_model)
    before_vars = {k: copy.deepcopy(v) for k, v in vars(router).items() if k != "other"}
    before_weights = {k: v.clone() for k, v in other_model.state_dict().items()}
    attach_router(tiny_llama, router)
    try:
        evaluator = Evaluator(word_tok, EvalConfig(mode="both"))
        evaluator.run_probes(tiny_llama, evaluator.probes(REQUESTS))
        generate_routed(tiny_llama, word_tok, ["who wrote hamlet"], [2])
    finally:
        detach_router(tiny_llama, router)
    assert {k: v for k, v in vars(router).items() if k != "other"} == before_vars
    assert all(torch.equal(v, before_weights[k]) for k, v in other_model.state_dict().items())


@pytest.mark.parametrize("packing", [True, False])
def test_batched_routed_scores_equal_one_at_a_time(tiny_llama, other_model, word_tok, packing):
    class Both:
        kind = "both"

        def route(self, model, tok, prompts):
            prefix = PrefixRouter().route(model, tok, prompts)
            return [Route(r.prompt, other_model, "other") if "hamlet" in p else r for p, r in zip(prompts, prefix)]

    probes = Evaluator(word_tok).probes(REQUESTS)
    batched = Evaluator(word_tok, EvalConfig(mode="both", batch_size=64, packing=packing))
    single = Evaluator(word_tok, EvalConfig(mode="both", batch_size=1, packing=packing))
    router = Both()
    attach_router(tiny_llama, router)
    try:
        together = batched.run_probes(tiny_llama, probes)
        alone = [single.run_probes(tiny_llama, [p])[0] for p in probes]
    finally:
        detach_router(tiny_llama, router)
    for a, b in zip(together, alone):
        assert a.teacher_predicted == b.teacher_predicted
        assert a.teacher_target == b.teacher_target
        assert a.generated == b.generated
        assert a.teacher_nll == pytest.approx(b.teacher_nll, abs=1e-5)


def test_generate_routed_without_router_is_generate_greedy(tiny_llama, word_tok):
    prompts = ["the capital of france is", "who wrote hamlet"]
    assert generate_routed(tiny_llama, word_tok, prompts, [3, 2]) == generate_greedy(tiny_llama, word_tok, prompts, [3, 2])
    attach_router(tiny_llama, PrefixRouter())
    try:
        routed = generate_routed(tiny_llama, word_tok, prompts, [3, 2])
    finally:
        detach_router(tiny_llama, router_of(tiny_llama))
    assert routed == generate_greedy(tiny_llama, word_tok, [PREFIX + prompts[0], prompts[1]], [3, 2])


def _long_prefix_requests(demos: str = "") -> list[EditRequest]:
    cf = {"target_true": "paris", "paraphrase_prompts": [], "neighborhood_prompts": [], "attribute_prompts": [],
          "generation_prompts": [demos + "the eiffel tower is", demos + "the eiffel tower was"]}
    return [EditRequest("the capital of france is", "rome", case_id="0", ground_truth="paris",
                        rephrase=("the city of france is",), locality={"n": [("who wrote hamlet", "shakespeare")]},
                        extra={"fluency_prompts": ["the sky is", "the sun is"], "counterfact": cf})]


@pytest.mark.parametrize("config", [{"mode": "generate"}, {"suites": ("qa:max_new_tokens=3,batch_size={b}",)},
                                    {"suites": ("fluency:max_new_tokens=4,batch_size={b}",)},
                                    {"suites": ("counterfact:max_new_tokens=4,batch_size={b}",)}])
def test_every_generation_shares_a_long_prefix_under_packing_only(tiny_llama, word_tok, generation_prefixes, config):
    """IKE feeds every prompt behind the same demonstrations: each generating path prefills them once per group,
    unless packing is off (a method whose edit does not act position by position) or prompts go one at a time."""
    counterfact = "counterfact" in str(config)  # a suite that refuses routed models: its own prompts carry the start
    requests = _long_prefix_requests(LONG_DEMOS if counterfact else "")
    router = PrefixRouter(word="", prefix=LONG_DEMOS)
    if not counterfact:
        attach_router(tiny_llama, router)
    try:
        metrics = {}
        for packing, batch_size in [(True, 64), (False, 64), (True, 1)]:
            generation_prefixes.clear()
            suites = tuple(suite.format(b=batch_size) for suite in config.get("suites", ()))
            evaluator = Evaluator(word_tok, EvalConfig(mode=config.get("mode", "teacher"), suites=suites,
                                                       packing=packing, batch_size=batch_size))
            pre = evaluator.capture(tiny_llama, requests)
            metrics[packing, batch_size] = (pre.metrics, [o.generated for o in pre.outcomes])
            shared = set(generation_prefixes) - {None}
            if packing and batch_size > 1:
                assert shared and min(shared) >= len(word_tok(LONG_DEMOS).input_ids)
            else:
                assert not shared
    finally:
        if not counterfact:
            detach_router(tiny_llama, router)
    assert metrics[True, 64] == metrics[False, 64] == metrics[True, 1]
