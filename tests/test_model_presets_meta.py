"""The packaged presets for the models users edit fit those models: checked on the meta device.

Each architecture is built from a hand-written transformers config with the real model's sizes, on the
meta device (no weights, no download, well under a second each). Every preset for that model is then
loaded through the registry and resolved through the method's own helpers (FT's trainable weights, the
locate core's rewrite modules, the adapter site of GRACE/DEFER/WISE, LoRA's peft injection, MEND's edited
weights): every layer it names must exist, every module it edits must exist, and the module's shape must
be the one its role has in that model (e.g. the MLP down-projection maps intermediate -> hidden).
A preset naming layer 40 on a 32-layer model fails here, not after a 7B model has loaded.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import pytest
import torch
import yaml

from lmedit.registry import get_method, list_methods, list_presets, preset_path
from lmedit.spec import ModelSpec, get_module, in_out_features, is_linear_like


# --------------------------------------------------------------------------- the architectures


@dataclass(frozen=True)
class Arch:
    """A real model's sizes, as a transformers config, and the numbers every check compares against."""

    name: str
    make_config: Callable[[], Any]
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # out features of k_proj / v_proj (grouped-query attention)
    context: int


def _llama2() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def _llama3() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)


def _qwen25() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                       tie_word_embeddings=False)


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096)


def _gptj() -> Any:
    from transformers import GPTJConfig

    return GPTJConfig(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)


def _gpt2xl() -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024)


ARCHS = {
    arch.name: arch
    for arch in (
        Arch("llama2-7b", _llama2, 32, 4096, 11008, 4096, 4096),
        Arch("llama3-8b", _llama3, 32, 4096, 14336, 1024, 8192),
        Arch("qwen2.5-7b", _qwen25, 28, 3584, 18944, 512, 131072),
        Arch("mistral-7b", _mistral, 32, 4096, 14336, 1024, 32768),
        Arch("gpt-j-6b", _gptj, 28, 4096, 16384, 4096, 2048),
        Arch("gpt2-xl", _gpt2xl, 48, 1600, 6400, 1600, 1024),
    )
}

# preset name -> architecture; llama-7b presets hold Llama-2-7B values
PRESET_ARCH = {"llama-7b": "llama2-7b", **{name: name for name in ARCHS}}


def build_meta(arch: Arch) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.make_config())
    return model.eval()


@lru_cache(maxsize=None)
def meta_model(arch_name: str) -> torch.nn.Module:
    """One shared meta model per architecture, for checks that change nothing (LoRA builds its own)."""
    return build_meta(ARCHS[arch_name])


def model_presets() -> list[Any]:
    cases = []
    for info in list_methods():
        for preset in list_presets(info.name):
            if preset in PRESET_ARCH:
                cases.append(pytest.param(info.name, preset, PRESET_ARCH[preset], id=f"{info.name}/{preset}"))
    return cases


def all_presets() -> list[Any]:
    return [pytest.param(info.name, preset, id=f"{info.name}/{preset}")
            for info in list_methods() for preset in list_presets(info.name)]


# --------------------------------------------------------------------------- shapes by role


def expected_io(arch: Arch, path: str) -> tuple[int, int]:
    """(in, out) features a module must have in ``arch``, from the real model's sizes and the module's name."""
    h, inter = arch.hidden, arch.intermediate
    leaf = path.rsplit(".", 1)[-1]
    parent = path.rsplit(".", 2)[-2] if path.count(".") >= 1 else ""
    table = {
        "down_proj": (inter, h), "fc_out": (inter, h), "gate_proj": (h, inter), "up_proj": (h, inter),
        "fc_in": (h, inter), "c_fc": (h, inter), "q_proj": (h, h), "o_proj": (h, h), "out_proj": (h, h),
        "k_proj": (h, arch.kv_dim), "v_proj": (h, arch.kv_dim), "c_attn": (h, 3 * h),
    }
    if leaf == "c_proj":
        return (inter, h) if parent == "mlp" else (h, h)
    assert leaf in table, f"no expected shape for {path}"
    return table[leaf]


def block_index(spec: ModelSpec, path: str) -> int:
    prefix = f"{spec.layers_path}."
    assert path.startswith(prefix), f"{path} is not inside the blocks ({spec.layers_path})"
    return int(path[len(prefix):].split(".", 1)[0])


def check_module(model: torch.nn.Module, arch: Arch, spec: ModelSpec, path: str, role: str | None = None) -> None:
    """The module exists, is linear, sits in an existing block and has the shape its role has in this model."""
    module = get_module(model, path)
    assert is_linear_like(module), f"{path} is {type(module).__name__}, not a linear layer"
    layer = block_index(spec, path)
    assert 0 <= layer < arch.layers, f"{path}: layer {layer} does not exist (the model has {arch.layers})"
    if role is not None:  # the path is the one ModelSpec gives that role at that layer
        by_role = {"mlp_out": (spec.mlp_out(layer),), "mlp_in": spec.mlp_in(layer), "attn_out": (spec.attn_out(layer),)}
        assert path in by_role[role], f"{path} is not the {role} of layer {layer} ({by_role[role]})"
    got, want = in_out_features(module), expected_io(arch, path)
    assert got == want, f"{path} maps {got[0]} -> {got[1]}, expected {want[0]} -> {want[1]}"


def role_of(spec: ModelSpec, path: str) -> str | None:
    """The module role (mlp_out, mlp_in, attn_out) ``path`` has in ``spec``, or None."""
    layer = block_index(spec, path)
    for role, paths in (("mlp_out", (spec.mlp_out(layer),)), ("mlp_in", spec.mlp_in(layer)), ("attn_out", (spec.attn_out(layer),))):
        if path in paths:
            return role
    return None


def check_layers(layers: list[int], arch: Arch) -> None:
    for layer in layers:
        assert 0 <= layer < arch.layers, f"layer {layer} does not exist: the model has layers 0..{arch.layers - 1}"


# --------------------------------------------------------------------------- the header's training command


def train_overrides(method: str, preset: str) -> tuple[dict[str, Any], str] | None:
    """The ``--set`` values and ``--out`` of the ``# train: lmedit train ...`` line in a preset's header."""
    for line in preset_path(method, preset).read_text().splitlines():
        if line.startswith("# train: "):
            words = shlex.split(line[len("# train: "):])
            assert words[:3] == ["lmedit", "train", method.lower()], line
            values, out = {}, ""
            for flag, value in zip(words, words[1:]):
                if flag == "--set":
                    key, _, raw = value.partition("=")
                    values[key] = yaml.safe_load(raw)
                elif flag == "--out":
                    out = value
            return values, out
        if not line.startswith("#"):
            break
    return None


# --------------------------------------------------------------------------- the check


def check_preset(method: str, hparams: Any, arch: Arch, model: torch.nn.Module | None = None, preset: str = "") -> list[str]:
    """Everything ``hparams`` would edit in ``arch``, resolved through the method's helpers and checked.

    Returns the module paths it edits (empty for methods that edit no weight). ``model`` defaults to the
    shared meta model; LoRA injects into the model it is given, so pass a fresh one.
    """
    model = meta_model(arch.name) if model is None else model
    spec = ModelSpec.from_model(model)
    edited: list[str] = []
    if method in ("FT-L", "FT-M"):
        from lmedit.methods.ft import trainable_parameter_names
        from lmedit.spec import get_parameter

        check_layers(hparams.layers, arch)
        for name in trainable_parameter_names(spec, hparams):  # the weights FT trains
            get_parameter(model, name)
            path = name.rsplit(".", 1)[0]
            role = role_of(spec, path)
            assert role in hparams.modules, f"{path} ({role}) is none of the preset's modules {hparams.modules}"
            check_module(model, arch, spec, path, role)
            edited.append(path)
    elif method in ("ROME", "MEMIT", "AlphaEdit", "EMMET", "PMET", "SPHERE"):
        from lmedit.forward.tokens import context_length
        from lmedit.locate.core import iter_layers

        check_layers(hparams.layers, arch)
        for _, _, path in iter_layers(spec, hparams.layers):  # the rewrite module: the down-projection
            check_module(model, arch, spec, path, "mlp_out")
            edited.append(path)
        if method == "PMET":  # its attention delta sits on the last edited block's output projection
            check_module(model, arch, spec, spec.attn_out(hparams.layers[-1]), "attn_out")
        if hparams.mom2_adjustment:
            limit = context_length(model)
            assert limit is not None and hparams.mom2_sample_length <= limit, (
                f"mom2_sample_length {hparams.mom2_sample_length} exceeds the model's {limit} positions")
    elif method in ("GRACE", "DEFER", "WISE"):
        from lmedit.adapters import site_layer

        if hparams.layer is not None:
            check_layers([hparams.layer], arch)
        path, _ = site_layer(model, hparams)
        check_module(model, arch, spec, path, None if hparams.inner_params else hparams.module)
        edited.append(path)
    elif method in ("LoRA", "AdaLoRA"):
        from peft.tuners.tuners_utils import BaseTunerLayer

        from lmedit.methods.lora import inject

        check_layers(hparams.layers, arch)
        wanted = hparams.layers or list(range(arch.layers))
        inject(model, hparams.adapter_config())
        adapted = sorted(name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))
        for path in adapted:
            base = get_module(model, path).get_base_layer()
            assert is_linear_like(base), f"{path} wraps {type(base).__name__}"
            assert block_index(spec, path) in wanted, f"{path} is outside the preset's layers {hparams.layers}"
            got, want = in_out_features(base), expected_io(arch, path)
            assert got == want, f"{path} maps {got[0]} -> {got[1]}, expected {want[0]} -> {want[1]}"
        for layer in wanted:  # every target module is adapted in every chosen layer
            names = {p.rsplit(".", 1)[-1] for p in adapted if block_index(spec, p) == layer}
            assert names == set(hparams.target_modules), f"layer {layer}: adapted {sorted(names)}, asked {hparams.target_modules}"
        edited.extend(adapted)
    elif method in ("MEND", "MALMEN", "SERAC"):
        assert hparams.archive == f"{{lmedit_home}}/checkpoints/{method}/{preset}", hparams.archive
        parsed = train_overrides(method, preset)
        assert parsed is not None, f"{method}/{preset} has no '# train: lmedit train {method.lower()} ...' line"
        overrides, out = parsed
        assert out.endswith(f"/checkpoints/{method}/{preset}"), f"--out {out} is not where the archive points"
        params = get_method(method).trainer.params.from_dict(overrides, source=f"{method}/{preset} train line")
        if method == "MEND":
            from lmedit.training.hypernetworks import edited_weights

            for weight in edited_weights(model, params.layers, params.modules):
                role = role_of(spec, weight.module)
                assert role in params.modules, f"{weight.module} ({role}) is none of {params.modules}"
                check_module(model, arch, spec, weight.module, role)
                edited.append(weight.module)
            # EasyEdit's MEND files edit the MLP input and output projections of the last three blocks
            last3 = range(arch.layers - 3, arch.layers)
            expected = {p for i in last3 for p in (*spec.mlp_in(i), spec.mlp_out(i))}
            assert set(edited) == expected, f"MEND edits {sorted(edited)}, EasyEdit's file {sorted(expected)}"
        elif method == "MALMEN":
            from lmedit.training.hypernetworks import edited_weights

            weights = edited_weights(model, params.layers, params.modules)
            for weight in weights:
                check_module(model, arch, spec, weight.module, role_of(spec, weight.module))
                edited.append(weight.module)
            # the authors' and EasyEdit's files edit the MLP output projections of the last six blocks
            assert set(edited) == {spec.mlp_out(i) for i in range(arch.layers - 6, arch.layers)}, sorted(edited)
        else:
            assert 1 <= params.trainable_layers <= arch.layers
    elif method == "KN":
        for layer in hparams.layers or range(arch.layers):  # the neurons are the down-projections' inputs
            check_layers([layer], arch)
            path = spec.mlp_out(layer)
            check_module(model, arch, spec, path, "mlp_out")
            edited.append(path)
    elif method == "UltraEdit":
        for path in hparams.module_names(model):  # MLP projections, by role or by EasyEdit's names
            role = role_of(spec, path)
            assert role in ("mlp_in", "mlp_out"), f"{path} is no MLP projection (role {role})"
            check_module(model, arch, spec, path, role)
            edited.append(path)
    elif method == "IKE":
        from lmedit.encoders import DEFAULT_ENCODER

        assert hparams.k > 0 and hparams.train_file and hparams.encoder == DEFAULT_ENCODER  # edits no weight
    elif method == "MELO":
        from lmedit.adapters import site_layer
        from lmedit.methods.melo import lora_paths

        if hparams.layer is not None:
            check_layers([hparams.layer], arch)
        check_layers(hparams.lora_layers, arch)
        router, _ = site_layer(model, hparams)  # the routing module, whose output or input is the key
        check_module(model, arch, spec, router, None if hparams.inner_params else hparams.module)
        edited.append(router)
        for path in lora_paths(model, hparams):  # the modules carrying the LoRA blocks, above the router
            role = role_of(spec, path)
            assert hparams.lora_inner_params or role in hparams.lora_modules, (
                f"{path} ({role}) is none of the preset's lora_modules {hparams.lora_modules}")
            assert block_index(spec, path) > block_index(spec, router), f"{path} is not above the router {router}"
            check_module(model, arch, spec, path, None if hparams.lora_inner_params else role)
            edited.append(path)
    else:  # a new method: add its check here
        raise AssertionError(f"no architecture check for method {method}; add one to {__name__}")
    return edited


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_meta_model_has_the_real_sizes(arch_name: str) -> None:
    arch = ARCHS[arch_name]
    model = meta_model(arch_name)
    spec = ModelSpec.from_model(model)
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (arch.layers, arch.hidden, arch.intermediate)
    assert next(model.parameters()).device.type == "meta"
    check_module(model, arch, spec, spec.mlp_out(arch.layers - 1), "mlp_out")
    for path in spec.mlp_in(0):
        check_module(model, arch, spec, path, "mlp_in")
    check_module(model, arch, spec, spec.attn_out(0), "attn_out")


@pytest.mark.parametrize(("method", "preset", "arch_name"), model_presets())
def test_preset_fits_its_model(method: str, preset: str, arch_name: str) -> None:
    arch = ARCHS[arch_name]
    hparams = get_method(method).load_hparams(preset=preset)
    model = build_meta(arch) if method in ("LoRA", "AdaLoRA") else None
    edited = check_preset(method, hparams, arch, model, preset)
    if method != "IKE" and method != "SERAC":
        assert edited, f"{method}/{preset} resolves to no module"


@pytest.mark.parametrize(("method", "preset"), all_presets())
def test_every_packaged_preset_loads_and_validates(method: str, preset: str) -> None:
    info = get_method(method)
    hparams = info.load_hparams(preset=preset)
    assert type(hparams) is info.hparams_class
    hparams.validate()
    declared = yaml.safe_load(preset_path(method, preset).read_text()).get("method")
    assert declared in (None, method), f"{method}/{preset} says method: {declared}"


SOURCE = re.compile(
    r"EasyEdit hparams/[\w.-]+/[\w.-]+\.yaml"  # an EasyEdit file
    r"|[\w-]+/[\w.-]+ hparams/[\w./-]+\.json"  # a reference repository's file
    r"|et al\.,? \d{4}"  # a paper
)


@pytest.mark.parametrize(("method", "preset", "arch_name"), [p for p in model_presets() if p.values[1] in ARCHS])
def test_model_preset_header_names_its_source(method: str, preset: str, arch_name: str) -> None:
    """Presets named after the six models (the older llama-7b files predate this rule) say where they come from."""
    lines = preset_path(method, preset).read_text().splitlines()
    assert lines and lines[0].startswith("# "), f"{method}/{preset} must begin with a comment naming its source"
    header = " ".join(line[2:] for line in lines if line.startswith("#"))
    assert SOURCE.search(header), f"{method}/{preset}: the header names no source (EasyEdit file, repository file or paper)"
    if lines[0].startswith("# Source: EasyEdit"):
        assert re.search(r"EasyEdit main at commit [0-9a-f]{7}", header), "say which EasyEdit commit the values are from"
        assert "Differences from the EasyEdit file:" in header, "say where lmedit's keys differ from EasyEdit's"


def _with_layer(method: str, preset: str, layer: int, tmp_path: Any) -> Any:
    """The preset with every layer it names moved to ``layer``, loaded through the registry from a file."""
    values = yaml.safe_load(preset_path(method, preset).read_text())
    if "layers" in values:
        values["layers"] = [layer]
    else:
        values.pop("inner_params", None)
        values["layer"], values["module"] = layer, values.get("module", "mlp_out")
    path = tmp_path / f"{method}-{preset}.yaml"
    path.write_text(yaml.safe_dump(values))
    return get_method(method).load_hparams(path=path)


@pytest.mark.parametrize(("method", "preset"), [
    ("FT-M", "llama2-7b"), ("FT-L", "mistral-7b"), ("ROME", "llama2-7b"), ("MEMIT", "mistral-7b"),
    ("AlphaEdit", "llama3-8b"), ("GRACE", "llama2-7b"), ("DEFER", "mistral-7b"), ("WISE", "llama3-8b"),
    ("LoRA", "llama3-8b"),
])
def test_layer_40_on_a_32_layer_model_fails(method: str, preset: str, tmp_path: Any) -> None:
    arch = ARCHS[PRESET_ARCH[preset]]
    assert arch.layers == 32
    hparams = _with_layer(method, preset, 40, tmp_path)
    with pytest.raises(Exception, match=r"\b40\b"):
        check_preset(method, hparams, arch, build_meta(arch) if method == "LoRA" else None, preset)
    # the same file with a layer that exists passes
    check_preset(method, _with_layer(method, preset, 31, tmp_path), arch, build_meta(arch) if method == "LoRA" else None, preset)


def test_mend_training_layers_outside_the_model_fail(tmp_path: Any) -> None:
    from lmedit.training.hypernetworks import edited_weights

    model = meta_model("qwen2.5-7b")
    with pytest.raises(Exception, match=r"\b30\b"):
        edited_weights(model, [30], ["mlp_out"])


def test_a_module_of_the_wrong_shape_is_caught() -> None:
    """GPT-2's attention c_proj is hidden -> hidden; naming it where the MLP's c_proj belongs fails."""
    arch = ARCHS["gpt2-xl"]
    model = meta_model(arch.name)
    spec = ModelSpec.from_model(model)
    with pytest.raises(AssertionError, match="not the mlp_out"):
        check_module(model, arch, spec, spec.attn_out(3), "mlp_out")
    hparams = get_method("GRACE").load_hparams(overrides={"inner_params": ["transformer.h.47.mlp.c_fc.weight"]})
    assert check_preset("GRACE", hparams, arch) == ["transformer.h.47.mlp.c_fc"]
    hparams = get_method("GRACE").load_hparams(overrides={"inner_params": ["transformer.h.48.mlp.c_fc.weight"]})
    with pytest.raises(Exception, match="48"):
        check_preset("GRACE", hparams, arch)
