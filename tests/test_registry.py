import pytest

from lmedit.hparams import HyperParamsError
from lmedit.registry import MethodError, get_method, list_methods, list_presets
from lmedit.requests import EditRequest


def test_builtin_methods_are_registered_with_presets():
    names = {m.name for m in list_methods()}
    assert {"FT-L", "FT-M"} <= names
    assert "smollm2-135m" in list_presets("FT-M")
    assert get_method("ft_m").name == "FT-M"  # case and separator tolerant


def test_every_packaged_preset_loads():
    for info in list_methods():
        for preset in list_presets(info.name):
            info.load_hparams(preset=preset)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(MethodError, match="available: .*FT-M"):
        get_method("NOPE")


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(HyperParamsError, match="available presets: .*smollm2-135m"):
        get_method("FT-M").load_hparams(preset="gpt-17")


def test_preset_then_overrides():
    h = get_method("FT-M").load_hparams(preset="smollm2-135m", overrides={"num_steps": 3})
    assert h.num_steps == 3 and h.layers == [21]


def test_check_requests_for_subject_methods():
    from dataclasses import replace

    info = replace(get_method("FT-M"), needs_subject=True, supports_batch=False)
    with pytest.raises(MethodError, match="cannot take a batch"):
        info.check_requests([EditRequest("a", "b"), EditRequest("c", "d")])
    with pytest.raises(ValueError, match="needs the subject"):
        info.check_requests([EditRequest("a", "b")])


def test_method_facts_live_in_the_registry():
    from lmedit.registry import list_methods, trainable_methods

    by_name = {info.name: info for info in list_methods()}
    assert {m.name for m in trainable_methods()} == {"MALMEN", "MEND", "SERAC"}
    assert {n for n, i in by_name.items() if i.generation_scored} == {"GRACE", "DEFER", "WISE"}
    assert all(info.tiny_setup is not None for info in list_methods())  # the contract test can run every method


def test_contract_declarations_must_say_why():
    from lmedit.registry import Contract, MethodError

    with pytest.raises(MethodError, match="must say why"):
        Contract(effect="output")
    with pytest.raises(MethodError, match="effect must be"):
        Contract(effect="sometimes", why="x")


def test_load_edit_refuses_broken_and_unknown_folders(tmp_path, tiny_llama):
    from lmedit.handles import EditHandleError
    from lmedit.registry import load_edit

    with pytest.raises(EditHandleError, match="edit.json is missing"):
        load_edit(tiny_llama, tmp_path)
    (tmp_path / "edit.json").write_text("{not json")
    with pytest.raises(EditHandleError, match="not valid JSON"):
        load_edit(tiny_llama, tmp_path)
    (tmp_path / "edit.json").write_text('{"format": "x", "method": "NOPE"}')
    with pytest.raises(EditHandleError, match="known methods"):
        load_edit(tiny_llama, tmp_path)
