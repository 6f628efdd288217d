"""LoRA invariants on tiny random models: the edit takes effect, sequential edits train one adapter and
restore exactly newest first, the last restore removes peft entirely, save/load round-trips."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_gpt2, build_tiny_llama, snapshot, state_equal
from lmedit.evaluation import score_teacher_forced
from lmedit.handles import EditHandleError, restore_all
from lmedit.registry import load_edit
from lmedit.hparams import HyperParamsError
from lmedit.methods.lora import lora_parameters, session_of
from lmedit.registry import get_method
from lmedit.requests import EditRequest

FACTS = [
    EditRequest("the capital of france is", "rome", case_id="france"),
    EditRequest("who wrote hamlet", "tolstoy", case_id="hamlet"),
    EditRequest("the sky color is", "green", case_id="sky"),
]


def _targets(model) -> list[str]:
    return ["q_proj", "v_proj", "down_proj"] if hasattr(model, "model") else ["c_attn", "c_proj"]


def _hparams(model, **overrides):
    info = get_method("LoRA")
    values = {"target_modules": _targets(model), "rank": 4, "lora_alpha": 8, "lr": 5e-2, "num_steps": 40, **overrides}
    return info, info.load_hparams(overrides=values)


def _holds(model, tok, request) -> bool:
    return score_teacher_forced(model, tok, [(request.prompt, request.target_new)])[0].token_accuracy == 1.0


def _structure(model):
    """Every module object (by identity and class) and every parameter's gradient flag."""
    return ([(name, id(m), type(m)) for name, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()}, set(vars(model)))


def test_edit_takes_effect_and_restore_removes_peft_exactly(tiny_model, word_tok):
    info, hparams = _hparams(tiny_model)
    original, structure = snapshot(tiny_model), _structure(tiny_model)
    assert not _holds(tiny_model, word_tok, FACTS[0])
    handle = info.apply(tiny_model, word_tok, [FACTS[0]], hparams)
    assert _holds(tiny_model, word_tok, FACTS[0])
    assert lora_parameters(tiny_model) and hasattr(tiny_model, "peft_config")
    assert handle.info["losses"][-1] < handle.info["losses"][0]
    # the base weights were never touched, only the adapter trained
    base = {k: v for k, v in tiny_model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, original[k.replace(".base_layer", "")]) for k, v in base.items())
    handle.restore()
    assert state_equal(tiny_model, original)
    assert _structure(tiny_model) == structure and session_of(tiny_model) is None
    assert not hasattr(tiny_model, "peft_config")


def test_adalora_trains_an_svd_adapter_and_restore_removes_it_exactly(tiny_llama, word_tok):
    """EasyEdit's default LoRA (KnowEdit's AdaLoRA column): P Λ Q with the orthogonality penalty, rank fixed."""
    info, hparams = _hparams(tiny_llama, lora_type="adalora")
    original, structure = snapshot(tiny_llama), _structure(tiny_llama)
    handles = []
    for request in FACTS[:2]:  # the second edit keeps training the same adapter
        handles.append(info.apply(tiny_llama, word_tok, [request], hparams))
        assert _holds(tiny_llama, word_tok, request)
    singular = {n: p for n, p in lora_parameters(tiny_llama).items() if ".lora_E." in n}
    assert singular and all(p.shape == (4, 1) and p.abs().sum() > 0 for p in singular.values())
    restore_all(handles)
    assert state_equal(tiny_llama, original) and _structure(tiny_llama) == structure
    assert not hasattr(tiny_llama, "peft_config")


def test_the_orthogonality_penalty_by_hand(tiny_llama):
    """Rows of A orthonormal (P Pᵀ = I: 0) and columns of B twice orthonormal (QᵀQ = 4I: ‖3I‖ = 3√r); mean of two."""
    from lmedit.methods.lora import _unload, inject, orthogonality_penalty

    session = inject(tiny_llama, {"lora_type": "adalora", "layers": [1], "target_modules": ["down_proj"], "rank": 4,
                                  "lora_alpha": 8, "lora_dropout": 0.0})
    params = lora_parameters(tiny_llama)
    (a,) = [p for n, p in params.items() if ".lora_A." in n]
    (b,) = [p for n, p in params.items() if ".lora_B." in n]
    with torch.no_grad():
        a.copy_(torch.eye(*a.shape))
        b.copy_(2 * torch.eye(*b.shape))
    assert orthogonality_penalty(tiny_llama).item() == pytest.approx((0 + 3 * 4 ** 0.5) / 2)
    _unload(tiny_llama, session)
    assert orthogonality_penalty(tiny_llama) is None


def test_adalora_training_includes_the_orthogonality_penalty(word_tok):
    """The penalty is in the loss the optimiser follows: weighted up, the trained P and Q end nearer orthonormal."""
    from lmedit.methods.lora import orthogonality_penalty

    penalties = {}
    for weight in (0.0, 10.0):
        model = build_tiny_llama(len(word_tok))
        torch.manual_seed(0)  # the same initial adapter for both weights
        info, hparams = _hparams(model, lora_type="adalora", orth_reg_weight=weight)
        handle = info.apply(model, word_tok, [FACTS[0]], hparams)
        penalties[weight] = orthogonality_penalty(model).item()
        handle.restore()
    assert penalties[10.0] < 0.5 * penalties[0.0], penalties


def test_sequential_edits_train_one_adapter_and_restore_newest_first(tiny_llama, word_tok):
    info, hparams = _hparams(tiny_llama)
    original, structure = snapshot(tiny_llama), _structure(tiny_llama)
    first = info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    after_first = {n: p.detach().clone() for n, p in lora_parameters(tiny_llama).items()}
    second = info.apply(tiny_llama, word_tok, [FACTS[1]], hparams)
    assert set(lora_parameters(tiny_llama)) == set(after_first)  # the same adapter, trained further
    assert _holds(tiny_llama, word_tok, FACTS[1])
    with pytest.raises(EditHandleError, match="newest first"):
        first.restore()
    second.restore()
    assert all(torch.equal(p, after_first[n]) for n, p in lora_parameters(tiny_llama).items())
    first.restore()
    assert state_equal(tiny_llama, original) and _structure(tiny_llama) == structure


def test_batch_edit_installs_every_request(tiny_llama, word_tok):
    info, hparams = _hparams(tiny_llama, num_steps=60)
    original = snapshot(tiny_llama)
    handle = info.apply(tiny_llama, word_tok, FACTS, hparams)
    assert all(_holds(tiny_llama, word_tok, r) for r in FACTS)
    handle.restore()
    assert state_equal(tiny_llama, original)


def test_adapter_settings_must_match(tiny_llama, word_tok):
    info, hparams = _hparams(tiny_llama, num_steps=2)
    handle = info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    with pytest.raises(HyperParamsError, match="same adapter settings"):
        info.apply(tiny_llama, word_tok, [FACTS[1]], hparams.replace(rank=2))
    handle.restore()


def test_layers_choose_where_the_adapter_goes(tiny_llama, word_tok):
    info, hparams = _hparams(tiny_llama, layers=[2], target_modules=["down_proj"], num_steps=1)
    handle = info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    assert {n.split(".lora_")[0] for n in lora_parameters(tiny_llama)} == {"model.layers.2.mlp.down_proj"}
    handle.restore()


def test_unknown_target_modules_name_the_fix(tiny_llama, word_tok):
    info, hparams = _hparams(tiny_llama, target_modules=["no_such_proj"])
    original, structure = snapshot(tiny_llama), _structure(tiny_llama)
    with pytest.raises(HyperParamsError, match="target_modules"):
        info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    assert state_equal(tiny_llama, original) and _structure(tiny_llama) == structure


@pytest.mark.parametrize("lora_type", ["lora", "adalora"])
@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
def test_save_and_load_round_trip(builder, lora_type, word_tok, tmp_path):
    model = builder(len(word_tok))
    info, hparams = _hparams(model, lora_type=lora_type)
    handles = [info.apply(model, word_tok, [r], hparams) for r in FACTS[:2]]
    ids = torch.tensor([word_tok("the capital of france is rome").input_ids])
    with torch.no_grad():
        edited_logits = model(ids).logits
    handles[-1].save(tmp_path / "edit")
    restore_all(handles)
    fresh = builder(len(word_tok), seed=0)
    original, structure = snapshot(fresh), _structure(fresh)
    loaded = load_edit(fresh, tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, edited_logits)
    loaded.restore()
    assert state_equal(fresh, original) and _structure(fresh) == structure


def test_evaluation_does_not_change_the_adapter(tiny_llama, word_tok):
    from lmedit.evaluation import EvalConfig, Evaluator

    info, hparams = _hparams(tiny_llama, num_steps=3)
    handle = info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    before = snapshot(tiny_llama)
    evaluator = Evaluator(word_tok, EvalConfig(mode="both"))
    evaluator.run_probes(tiny_llama, evaluator.probes(FACTS))
    assert state_equal(tiny_llama, before)
    handle.restore()


@pytest.mark.embedded
def test_lora_preset_on_the_embedded_model(embedded, shared_data):
    from lmedit.data import load_requests

    model, tok = embedded
    requests = load_requests(shared_data / "zsre" / "zsre_mend_eval_portability_gpt4.json", limit=2)
    info = get_method("LoRA")
    hparams = info.load_hparams("smollm2-135m")
    original, structure = snapshot(model), _structure(model)
    for request in requests:
        handle = info.apply(model, tok, [request], hparams)
        assert score_teacher_forced(model, tok, [(request.prompt, request.target_new)])[0].token_accuracy >= 0.75
        handle.restore()
    assert state_equal(model, original) and _structure(model) == structure


def test_a_model_with_its_own_peft_adapters_is_refused(tiny_llama, word_tok):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), tiny_llama, adapter_name="user")
    info, hparams = _hparams(tiny_llama, num_steps=1)
    with pytest.raises(HyperParamsError, match="peft adapters of its own"):
        info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    assert "user" in tiny_llama.peft_config and session_of(tiny_llama) is None
