"""The stateful adapter base: module paths, insertion and removal, the training shortcut, edit formats."""

from __future__ import annotations

import json

import pytest
import torch

from lmedit.adapters import (
    AdapterError,
    SequenceLogits,
    ensure_adapter,
    find_adapter,
    frozen_model,
    module_path,
    remove_adapter,
)
from lmedit.handles import EditHandleError
from lmedit.registry import load_edit
from lmedit.methods.defer import DeferAdapter
from lmedit.methods.grace import GraceAdapter
from lmedit.spec import get_module

LLAMA_DOWN = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize(
    "given",
    ["model.layers[1].mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj",
     " model.layers[1].mlp.down_proj.bias"],
)
def test_module_path_accepts_easyedit_and_dotted_spellings(given):
    assert module_path(given) == LLAMA_DOWN


def test_exactly_one_inner_param_is_required():
    from lmedit.adapters import AdapterSite
    from lmedit.hparams import HyperParamsError

    with pytest.raises(HyperParamsError, match="exactly one module"):
        AdapterSite.from_dict({"inner_params": ["a.weight", "b.weight"]})


def test_insert_find_and_remove_keep_the_original_object(tiny_llama):
    original = get_module(tiny_llama, LLAMA_DOWN)
    adapter = ensure_adapter(tiny_llama, LLAMA_DOWN, GraceAdapter, lambda m: GraceAdapter(m, LLAMA_DOWN))
    assert get_module(tiny_llama, LLAMA_DOWN) is adapter and adapter.original is original
    again = ensure_adapter(tiny_llama, LLAMA_DOWN, GraceAdapter, lambda m: pytest.fail("must not build twice"))
    assert again is adapter and find_adapter(tiny_llama, LLAMA_DOWN) is adapter
    with pytest.raises(AdapterError, match="already holds a GRACE adapter"):
        ensure_adapter(tiny_llama, LLAMA_DOWN, DeferAdapter, lambda m: DeferAdapter(m, LLAMA_DOWN))
    remove_adapter(tiny_llama, adapter)
    assert get_module(tiny_llama, LLAMA_DOWN) is original and find_adapter(tiny_llama, LLAMA_DOWN) is None


def test_wrapping_a_non_linear_module_is_refused(tiny_llama):
    with pytest.raises(AdapterError, match="wraps a linear layer"):
        ensure_adapter(tiny_llama, "model.layers.1.mlp", GraceAdapter, lambda m: GraceAdapter(m, "model.layers.1.mlp"))
    with pytest.raises(AdapterError, match="the model has no module"):
        ensure_adapter(tiny_llama, "model.layers.9.mlp.down_proj", GraceAdapter, lambda m: GraceAdapter(m, "x"))


def test_frozen_model_restores_flags_and_gradients(tiny_llama):
    weight = get_module(tiny_llama, LLAMA_DOWN).weight
    weight.requires_grad_(True)
    weight.grad = torch.ones_like(weight)
    with frozen_model(tiny_llama):
        assert not any(p.requires_grad for p in tiny_llama.parameters())
    assert weight.requires_grad and torch.equal(weight.grad, torch.ones_like(weight))


@pytest.mark.parametrize("arch,path", [("llama", LLAMA_DOWN), ("gpt2", "transformer.h.1.mlp.c_proj")])
def test_training_shortcut_equals_the_full_forward(arch, path, word_tok):
    from conftest import build_tiny_gpt2, build_tiny_llama

    model = (build_tiny_llama if arch == "llama" else build_tiny_gpt2)(len(word_tok))
    ids = word_tok("the capital of france is rome").input_ids
    adapter = ensure_adapter(model, path, GraceAdapter, lambda m: GraceAdapter(m, path))
    adapter.edit_log.append("dummy")  # an adapter in place must not break the architecture map
    runner = SequenceLogits(model, path, [ids], [[3, 4]])
    assert runner.uses_shortcut
    full = model(torch.tensor([ids])).logits[0, [3, 4]]
    assert torch.allclose(runner(), full, atol=1e-5)
    # a left-padded batch reads each sequence at its own (unpadded) columns
    short = word_tok("who wrote hamlet").input_ids
    batch = SequenceLogits(model, path, [ids, short], [[3, 4], [1]])
    alone = model(torch.tensor([short])).logits[0, [1]]
    assert batch.uses_shortcut and batch.valid.sum().item() == len(ids) + len(short)
    assert torch.allclose(batch(), torch.cat([full, alone]), atol=1e-5)


def test_load_edit_reports_an_unknown_format(tmp_path, tiny_llama):
    (tmp_path / "edit.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EditHandleError, match="known methods: .*GRACE"):
        load_edit(tiny_llama, tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_site_resolves_a_layer_role_on_every_layout(arch, word_tok):
    from conftest import build_tiny_gpt2, build_tiny_llama
    from lmedit.adapters import AdapterSite

    model = (build_tiny_llama if arch == "llama" else build_tiny_gpt2)(len(word_tok))
    expected = {"llama": "model.layers.2.mlp.down_proj", "gpt2": "transformer.h.2.mlp.c_proj"}[arch]
    assert AdapterSite.from_dict({"layer": -1}).site_path(model) == expected
    assert AdapterSite.from_dict({"layer": 2, "module": "mlp_out"}).site_path(model) == expected
    alias = AdapterSite.from_dict({"layer": 1, "inner_params": ["model.layers[0].mlp.down_proj.weight"]})
    assert alias.layer is None and alias.site_path(model) == "model.layers.0.mlp.down_proj"  # the alias wins


def test_adapter_site_errors_say_how_to_fix():
    from lmedit.adapters import AdapterSite
    from lmedit.hparams import HyperParamsError

    with pytest.raises(HyperParamsError, match="say which layer to edit"):
        AdapterSite.from_dict({}).site_path(torch.nn.Module())
    with pytest.raises(HyperParamsError, match="module must be one of mlp_out, attn_out"):
        AdapterSite.from_dict({"layer": 1, "module": "mlp"})


@pytest.mark.parametrize("layer", [0, 1])
def test_the_model_spec_reads_through_an_adapter(tiny_llama, layer):
    """An adapter on block 0 (where detection starts) or any other block leaves the spec as on the plain model."""
    from lmedit.spec import ModelSpec

    before = ModelSpec.from_model(tiny_llama)
    path = f"model.layers.{layer}.mlp.down_proj"
    original = get_module(tiny_llama, path)
    adapter = ensure_adapter(tiny_llama, path, GraceAdapter, lambda m: GraceAdapter(m, path))
    assert ModelSpec.from_model(tiny_llama) == before
    assert get_module(tiny_llama, path) is adapter and adapter.original is original  # the adapter is back in place


def _request():
    from lmedit.requests import EditRequest, Probe

    return EditRequest(prompt="the capital of france is", target_new="rome", subject="france",
                       locality={"n": (Probe("who wrote hamlet", "shakespeare"),)})


def test_a_weight_edit_after_an_adapter_edit_on_another_layer_restores_exactly(tiny_llama, word_tok):
    """GRACE on layer 1, then FT-M on layer 2: both apply, and restoring both in reverse gives back every weight."""
    from lmedit.editor import Editor

    reference = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    grace = Editor(tiny_llama, word_tok, "GRACE", overrides={"layer": 1}).apply([_request()])
    ft = Editor(tiny_llama, word_tok, "FT-M", overrides={"layers": [2], "num_steps": 3}).apply([_request()])
    assert any(not torch.equal(tiny_llama.state_dict()[k], reference[k]) for k in reference if "layers.2" in k)
    ft.restore()
    grace.restore()
    state = tiny_llama.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_weight_edit_inside_an_adapter_edit_names_the_conflict(tiny_llama, word_tok):
    from lmedit.editor import Editor

    grace = Editor(tiny_llama, word_tok, "GRACE", overrides={"layer": 1}).apply([_request()])
    with pytest.raises(EditHandleError, match="inside an adapter edit already applied.*restore that edit first"):
        Editor(tiny_llama, word_tok, "FT-M", overrides={"layers": [1], "num_steps": 1}).apply([_request()])
    grace.restore()
