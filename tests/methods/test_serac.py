"""SERAC on a tiny Llama with a bag-of-words encoder: memory accumulates, restores remove exactly their entries."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import capital_edit_examples, build_tiny_llama, snapshot, state_equal
from lmedit.encoders import register_encoder
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.handles import EditHandleError, restore_all
from lmedit.registry import load_edit
from lmedit.methods.serac import SERACHyperParams, SERACTrainingParams, SeracRouter, apply_serac, train_serac
from lmedit.registry import get_method
from lmedit.requests import EditRequest
from lmedit.routing import router_of
from lmedit.training import CheckpointError, EditExample

ENCODER = "test-bag-of-words"


class BagOfWords:
    """Unit-length hashed word counts: deterministic, no model files."""

    name = ENCODER

    def encode(self, texts):
        rows = torch.zeros(len(texts), 64)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                rows[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1.0
        return torch.nn.functional.normalize(rows, dim=-1)


register_encoder(ENCODER, BagOfWords)


def _examples(n: int, seed: int) -> list[EditExample]:
    return capital_edit_examples(n, seed, locality="who wrote {}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, word_tok):
    model = build_tiny_llama(len(word_tok))
    folder = tmp_path_factory.mktemp("serac")
    params = SERACTrainingParams(encoder=ENCODER, head_hidden=16, trainable_layers=1, max_steps=20, batch_size=8,
                                 val_every=10, val_examples=16, lr_counterfactual=1e-3)
    result = train_serac(model, word_tok, params, _examples(120, 0), _examples(16, 1), folder, show_progress=False)
    assert result.status == "finished"
    return folder


@pytest.fixture
def model(word_tok):
    return build_tiny_llama(len(word_tok))


def _hp(archive) -> SERACHyperParams:
    return SERACHyperParams(archive=str(archive))


A = EditRequest("the capital of france is", "rome", rephrase=["where is the capital of france"],
                locality={"n": [("who wrote hamlet", "tolstoy")]}, case_id="a")
B = EditRequest("the mother tongue of tolstoy is", "italian", case_id="b")
C = EditRequest("the sky color is", "green", case_id="c")


def test_training_writes_classifier_and_counterfactual_blocks(archive):
    config = json.loads((archive / "config.json").read_text())
    assert config["method"] == "SERAC" and config["network"]["layers"] == [2]
    assert config["network"]["encoder"] == ENCODER
    curve = json.loads((archive / "training.json").read_text())["curve"]
    assert {"classifier_acc", "cf_acc", "score"} <= set(curve[-1])


def test_memory_accumulates_and_each_restore_removes_exactly_its_entries(archive, model, word_tok):
    weights = snapshot(model)
    h_a = apply_serac(model, word_tok, [A], _hp(archive))
    router = router_of(model)
    assert isinstance(router, SeracRouter) and router.entry_ids == ["a"]
    h_bc = apply_serac(model, word_tok, [B, C], _hp(archive))
    assert router_of(model) is router and router.entry_ids == ["a", "b", "c"]
    assert get_method("SERAC").supports_batch

    routes = router.route(model, word_tok, [A.prompt, B.prompt, "who wrote hamlet"])
    assert routes[0].model is router.counterfactual and routes[0].prompt.startswith("the capital of france is rome")
    assert routes[1].model is router.counterfactual and routes[1].prompt.startswith("the mother tongue of tolstoy is italian")
    assert routes[2].model is None and routes[2].prompt == "who wrote hamlet"

    h_a.restore()  # out of order: only A's entry goes
    assert router.entry_ids == ["b", "c"] and router_of(model) is router
    assert router.route(model, word_tok, [A.prompt])[0].model is None
    with pytest.raises(EditHandleError):
        h_a.restore()
    h_bc.restore()
    assert router_of(model) is None  # the last restore leaves nothing behind
    assert state_equal(model, weights)  # SERAC never touched a base weight


def test_counterfactual_model_shares_the_base_weights_and_copies_only_its_blocks(archive, model, word_tok):
    handle = apply_serac(model, word_tok, [A], _hp(archive))
    cf = router_of(model).counterfactual
    assert cf.model.embed_tokens is model.model.embed_tokens and cf.lm_head is model.lm_head
    assert cf.model.layers[0] is model.model.layers[0] and cf.model.layers[2] is not model.model.layers[2]
    assert model.model.layers[2] is not cf.model.layers[2] and len(model._forward_hooks) == 0
    handle.restore()


def test_evaluation_changes_no_state(archive, model, word_tok):
    evaluator = Evaluator(word_tok, EvalConfig(mode="both"))
    pre = evaluator.capture(model, [A, B])
    handles = [apply_serac(model, word_tok, [A], _hp(archive)), apply_serac(model, word_tok, [B], _hp(archive))]
    router = router_of(model)
    entries = [(e.entry_id, e.prompt, e.target, e.embedding.clone()) for e in router.entries]
    cf_state = snapshot(router.counterfactual)
    base_state = snapshot(model)
    first = evaluator.score(model, [A, B], pre)
    second = evaluator.score(model, [A, B], pre)
    assert first == second
    assert [(e.entry_id, e.prompt, e.target) for e in router.entries] == [x[:3] for x in entries]
    assert all(torch.equal(e.embedding, x[3]) for e, x in zip(router.entries, entries))
    assert state_equal(router.counterfactual, cf_state) and state_equal(model, base_state)
    assert first[0]["locality"] == 1.0  # the unrelated prompt stays on the base model
    restore_all(handles)
    assert router_of(model) is None


def test_save_and_load_round_trip(archive, model, word_tok, tmp_path):
    handle = apply_serac(model, word_tok, [A, B], _hp(archive))
    prompts = [A.prompt, B.prompt, "who wrote hamlet"]
    routes = router_of(model).route(model, word_tok, prompts)
    handle.save(tmp_path / "memory")
    handle.restore()
    fresh = build_tiny_llama(len(word_tok))
    loaded = load_edit(fresh, tmp_path / "memory")
    again = router_of(fresh).route(fresh, word_tok, prompts)
    assert [r.prompt for r in again] == [r.prompt for r in routes]
    assert [r.model is None for r in again] == [r.model is None for r in routes]
    loaded.restore()
    assert router_of(fresh) is None


def test_missing_and_foreign_checkpoints_are_clear_errors(archive, word_tok, tmp_path):
    with pytest.raises(CheckpointError, match="lmedit train serac"):
        apply_serac(build_tiny_llama(len(word_tok)), word_tok, [A], SERACHyperParams(archive=str(tmp_path / "none")))
    with pytest.raises(CheckpointError, match="another model"):
        apply_serac(build_tiny_llama(len(word_tok), seed=4), word_tok, [A], _hp(archive))


@pytest.mark.embedded
def test_embedded_short_training_routes_edits_and_leaves_nothing(embedded, shared_data, tmp_path):
    from lmedit.training import load_examples

    model, tok = embedded
    train = load_examples(shared_data / "counterfact" / "counterfact-train.json", limit=8)
    val = load_examples(shared_data / "counterfact" / "counterfact-val.json", limit=4)
    params = SERACTrainingParams(max_steps=2, batch_size=4, val_every=2, val_examples=4)
    train_serac(model, tok, params, train, val, tmp_path, show_progress=False)
    before = snapshot(model)
    edit = EditRequest("The Eiffel Tower is located in the city of", "Rome")
    handle = apply_serac(model, tok, [edit], SERACHyperParams(archive=str(tmp_path)))
    routes = router_of(model).route(model, tok, [edit.prompt, "The capital of Germany is"])
    assert routes[0].name == "counterfactual" and routes[1].name == "base"
    handle.restore()
    assert router_of(model) is None and state_equal(model, before)
