from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmedit.hparams import HyperParams, HyperParamsError


@dataclass
class Example(HyperParams):
    layers: list[int] = field(default_factory=lambda: [1])
    lr: float = 1e-3
    steps: int = 5
    norm: float | None = None
    mode: Literal["a", "b"] = "a"
    flag: bool = False


def test_yaml_scientific_strings_and_ints_are_coerced(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("method: X\nlayers: 3\nlr: 5e-4\nsteps: 10\nnorm: 1\nmode: b\nflag: true\n")
    h = Example.from_yaml(path)
    assert h == Example(layers=[3], lr=5e-4, steps=10, norm=1.0, mode="b", flag=True)
    assert isinstance(h.norm, float)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("lr: 1\nlayer: [2]\n")
    with pytest.raises(HyperParamsError, match=r"unknown key 'layer'.*did you mean 'layers'"):
        Example.from_yaml(path)


@pytest.mark.parametrize("values, message", [
    ({"steps": 1.5}, "whole number"),
    ({"lr": "fast"}, "expected a number"),
    ({"mode": "c"}, "not one of"),
    ({"flag": "yes"}, "true or false"),
])
def test_bad_values_are_rejected(values, message):
    with pytest.raises(HyperParamsError, match=message):
        Example.from_dict(values)


def test_replace_and_round_trip():
    h = Example().replace(lr="1e-2")
    assert h.lr == 0.01
    assert Example.from_dict(h.to_dict()) == h


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(HyperParamsError, match="does not exist"):
        Example.from_yaml(tmp_path / "none.yaml")
