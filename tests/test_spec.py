"""ModelSpec detection on tiny random models of each supported family (no downloads)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import pytest
import torch
from torch import nn

import transformers
from lmedit.spec import (
    ModelSpec,
    ModelSpecError,
    get_module,
    get_parameter,
    in_out_features,
    is_linear_like,
)

HIDDEN = 32
INTER = 72  # deliberately != 4 * HIDDEN, so it must come from the config
VOCAB = 100
LAYERS = 3

# Common kwargs for the llama-like configs.
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_GPT_LIKE = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, n_inner=INTER)


def _llama_paths(mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")) -> dict[str, Any]:
    return dict(
        layers_path="model.layers",
        block="model.layers.{}",
        mlp="model.layers.{}.mlp",
        mlp_in=tuple(f"model.layers.{{}}.mlp.{n}" for n in mlp_in),
        mlp_out="model.layers.{}.mlp.down_proj",
        attn="model.layers.{}.self_attn",
        attn_out="model.layers.{}.self_attn.o_proj",
        embed="model.embed_tokens",
        lm_head="lm_head",
        final_norm="model.norm",
    )


# family -> (config class name, model class name, config kwargs, expected paths, tied, conv1d, inter)
CASES: dict[str, tuple[str, str, dict[str, Any], dict[str, Any], bool, bool, int]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE), _llama_paths(), False, False, INTER),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE), _llama_paths(), False, False, INTER),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(_LLAMA_LIKE, tie_word_embeddings=True),
        _llama_paths(),
        True,
        False,
        INTER,
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_LLAMA_LIKE, head_dim=8), _llama_paths(), True, False, INTER),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        # head_dim * heads != hidden on purpose: o_proj maps 64 -> 32.
        dict(_LLAMA_LIKE, head_dim=16, sliding_window=8),
        _llama_paths(),
        True,
        False,
        INTER,
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(_GPT_LIKE),
        dict(
            layers_path="transformer.h",
            block="transformer.h.{}",
            mlp="transformer.h.{}.mlp",
            mlp_in=("transformer.h.{}.mlp.c_fc",),
            mlp_out="transformer.h.{}.mlp.c_proj",
            attn="transformer.h.{}.attn",
            attn_out="transformer.h.{}.attn.c_proj",
            embed="transformer.wte",
            lm_head="lm_head",
            final_norm="transformer.ln_f",
        ),
        True,
        True,
        INTER,
    ),
    "gpt2_default_inner": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(_GPT_LIKE, n_inner=None),  # n_inner=None means 4 * hidden
        dict(
            layers_path="transformer.h",
            block="transformer.h.{}",
            mlp="transformer.h.{}.mlp",
            mlp_in=("transformer.h.{}.mlp.c_fc",),
            mlp_out="transformer.h.{}.mlp.c_proj",
            attn="transformer.h.{}.attn",
            attn_out="transformer.h.{}.attn.c_proj",
            embed="transformer.wte",
            lm_head="lm_head",
            final_norm="transformer.ln_f",
        ),
        True,
        True,
        4 * HIDDEN,
    ),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(_GPT_LIKE, rotary_dim=4),
        dict(
            layers_path="transformer.h",
            block="transformer.h.{}",
            mlp="transformer.h.{}.mlp",
            mlp_in=("transformer.h.{}.mlp.fc_in",),
            mlp_out="transformer.h.{}.mlp.fc_out",
            attn="transformer.h.{}.attn",
            attn_out="transformer.h.{}.attn.out_proj",
            embed="transformer.wte",
            lm_head="lm_head",
            final_norm="transformer.ln_f",
        ),
        False,
        False,
        INTER,
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        dict(
            layers_path="gpt_neox.layers",
            block="gpt_neox.layers.{}",
            mlp="gpt_neox.layers.{}.mlp",
            mlp_in=("gpt_neox.layers.{}.mlp.dense_h_to_4h",),
            mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
            attn="gpt_neox.layers.{}.attention",
            attn_out="gpt_neox.layers.{}.attention.dense",
            embed="gpt_neox.embed_in",
            lm_head="lm_head",
            final_norm="gpt_neox.final_layer_norm",
        ),
        False,
        False,
        INTER,
    ),
}


def _build(family: str) -> nn.Module:
    config_name, model_name, kwargs, *_ = CASES[family]
    config_cls = getattr(transformers, config_name, None)
    model_cls = getattr(transformers, model_name, None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"{config_name}/{model_name} not available in transformers {transformers.__version__}")
    if "bos_token_id" in config_cls().to_dict():
        kwargs = dict(kwargs, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    # Quiet the harmless "token id outside vocabulary" config warnings for tiny vocabularies.
    previous = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = model_cls(config_cls(**kwargs))
    finally:
        logging.getLogger("transformers").setLevel(previous)
    return model.eval()


_MODELS: dict[str, nn.Module] = {}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, ModelSpec]:
    family = request.param
    if family not in _MODELS:
        _MODELS[family] = _build(family)
    model = _MODELS[family]
    return family, model, ModelSpec.from_model(model)


def _layer_paths(spec: ModelSpec, i: int) -> dict[str, Any]:
    return dict(
        block=spec.block(i),
        mlp=spec.mlp(i),
        mlp_in=spec.mlp_in(i),
        mlp_out=spec.mlp_out(i),
        attn=spec.attn(i),
        attn_out=spec.attn_out(i),
    )


def test_paths_match_expected(case: tuple[str, nn.Module, ModelSpec]) -> None:
    family, model, spec = case
    _, _, _, expected, tied, conv1d, inter = CASES[family]
    assert spec.layers_path == expected["layers_path"]
    assert spec.num_layers == LAYERS
    assert spec.hidden_size == HIDDEN
    assert spec.intermediate_size == inter
    assert spec.embed_path == expected["embed"]
    assert spec.lm_head_path == expected["lm_head"]
    assert spec.final_norm_path == expected["final_norm"]
    assert spec.tied_embeddings is tied
    assert spec.conv1d_weights is conv1d
    # Templates and their expansion for every layer.
    assert spec.block_template == expected["block"]
    assert spec.mlp_template == expected["mlp"]
    assert spec.mlp_in_templates == expected["mlp_in"]
    assert spec.mlp_out_template == expected["mlp_out"]
    assert spec.attn_template == expected["attn"]
    assert spec.attn_out_template == expected["attn_out"]
    for i in range(LAYERS):
        got = _layer_paths(spec, i)
        want = {k: expected[k].format(i) for k in ("block", "mlp", "mlp_out", "attn", "attn_out")}
        want["mlp_in"] = tuple(t.format(i) for t in expected["mlp_in"])
        assert got == want
    assert spec.mlp_out(-1) == expected["mlp_out"].format(LAYERS - 1)


def test_post_mlp_norm_is_found_only_where_the_block_has_one(case: tuple[str, nn.Module, ModelSpec]) -> None:
    family, model, spec = case
    if family == "gemma3_text":  # Gemma 2/3 normalise the MLP output before the residual add
        assert spec.mlp_output_norm_template == "model.layers.{}.post_feedforward_layernorm"
        assert spec.mlp_output_norm(1) == "model.layers.1.post_feedforward_layernorm"
        assert get_module(model, spec.mlp_output_norm(-1)) is model.model.layers[LAYERS - 1].post_feedforward_layernorm
    else:
        assert spec.mlp_output_norm_template is None and spec.mlp_output_norm(0) is None


def test_modules_exist_and_shapes(case: tuple[str, nn.Module, ModelSpec]) -> None:
    family, model, spec = case
    inter = spec.intermediate_size
    assert get_module(model, spec.layers_path) is not None
    assert isinstance(get_module(model, spec.layers_path), nn.ModuleList)
    assert get_module(model, spec.embed_path) is model.get_input_embeddings()
    assert get_module(model, spec.lm_head_path) is model.get_output_embeddings()
    tied_now = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert spec.tied_embeddings is tied_now
    norm = get_module(model, spec.final_norm_path)
    assert tuple(norm.weight.shape) == (HIDDEN,)
    for i in range(spec.num_layers):
        for path in (spec.block(i), spec.mlp(i), spec.attn(i), *spec.mlp_in(i)):
            get_module(model, path)
        down = get_module(model, spec.mlp_out(i))
        assert in_out_features(down) == (inter, HIDDEN)
        weight = spec.mlp_out_weight(model, i)
        assert isinstance(weight, nn.Parameter)
        assert weight is down.weight
        assert weight is get_parameter(model, f"{spec.mlp_out(i)}.weight")
        # Raw storage: Conv1D is [in, out], nn.Linear is [out, in].
        expected_shape = (inter, HIDDEN) if spec.conv1d_weights else (HIDDEN, inter)
        assert tuple(weight.shape) == expected_shape
        for path in spec.mlp_in(i):
            assert in_out_features(get_module(model, path)) == (HIDDEN, inter)
        attn_out = get_module(model, spec.attn_out(i))
        assert is_linear_like(attn_out)
        assert in_out_features(attn_out)[1] == HIDDEN


def test_hook_on_mlp_out_sees_intermediate(case: tuple[str, nn.Module, ModelSpec]) -> None:
    _, model, spec = case
    seen: dict[int, tuple[int, ...]] = {}

    def make_hook(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[i] = tuple(inputs[0].shape)
            assert output.shape[-1] == spec.hidden_size

        return hook

    handles = [
        get_module(model, spec.mlp_out(i)).register_forward_hook(make_hook(i)) for i in range(spec.num_layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == list(range(spec.num_layers))
    assert all(shape[-1] == spec.intermediate_size for shape in seen.values())


def test_dict_round_trip(case: tuple[str, nn.Module, ModelSpec]) -> None:
    _, model, spec = case
    data = spec.to_dict()
    assert isinstance(data["mlp_in_templates"], list)
    assert all(isinstance(v, (str, int, bool, list)) or (k == "mlp_output_norm_template" and v is None)
               for k, v in data.items())
    again = ModelSpec.from_dict(data)
    assert again == spec
    again.validate(model)


def test_explicit_constructor_and_validate() -> None:
    model = _MODELS.get("llama") or _build("llama")
    spec = ModelSpec(
        layers_path="model.layers",
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        mlp_template="model.layers.{}.mlp",
        mlp_in_templates=["model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj"],  # list is fine
        mlp_out_template="model.layers.{}.mlp.down_proj",
        attn_template="model.layers.{}.self_attn",
        attn_out_template="model.layers.{}.self_attn.o_proj",
        embed_path="model.embed_tokens",
        lm_head_path="lm_head",
        final_norm_path="model.norm",
    )
    assert isinstance(spec.mlp_in_templates, tuple)
    assert spec == ModelSpec.from_model(model)
    spec.validate(model)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_layers = 5  # type: ignore[misc]
    with pytest.raises(IndexError):
        spec.mlp_out(LAYERS)
    # A wrong path is caught by validate, naming the path.
    bad = dataclasses.replace(spec, mlp_out_template="model.layers.{}.mlp.nope")
    with pytest.raises(ModelSpecError, match="nope"):
        bad.validate(model)


def test_from_dict_errors() -> None:
    spec = ModelSpec.from_model(_MODELS.get("gpt2") or _build("gpt2"))
    data = spec.to_dict()
    with pytest.raises(ModelSpecError, match="unknown"):
        ModelSpec.from_dict({**data, "extra_key": 1})
    missing = dict(data)
    del missing["mlp_out_template"]
    with pytest.raises(ModelSpecError, match="mlp_out_template"):
        ModelSpec.from_dict(missing)
    with pytest.raises(ModelSpecError, match=r"\{\}"):
        ModelSpec.from_dict({**data, "mlp_out_template": "transformer.h.0.mlp.c_proj"})
    with pytest.raises(ModelSpecError):
        ModelSpec.from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ModelSpecError, match="mlp_output_norm_template"):
        ModelSpec.from_dict({**data, "mlp_output_norm_template": "transformer.h.0.ln_2"})


def test_a_post_mlp_norm_named_in_an_explicit_spec_is_checked() -> None:
    model = _MODELS.get("gpt2") or _build("gpt2")
    spec = dataclasses.replace(ModelSpec.from_model(model), mlp_output_norm_template="transformer.h.{}.ln_2")
    spec.validate(model)  # a norm that exists: accepted (the edit then carries residuals back through it)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ModelSpecError, match="not_there"):
        dataclasses.replace(spec, mlp_output_norm_template="transformer.h.{}.not_there").validate(model)
    with pytest.raises(ModelSpecError, match="must name a norm"):
        dataclasses.replace(spec, mlp_output_norm_template="transformer.h.{}.mlp").validate(model)


class _NoBlocksConfig:
    num_hidden_layers = 2
    hidden_size = 8
    intermediate_size = 16


class _NoBlocks(nn.Module):
    """A "model" whose layers are plain attributes, not an nn.ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _NoBlocksConfig()
        self.embed = nn.Embedding(10, 8)
        self.layer0 = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
        self.layer1 = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
        self.head = nn.Linear(8, 10)


def test_error_without_block_list() -> None:
    with pytest.raises(ModelSpecError) as info:
        ModelSpec.from_model(_NoBlocks())
    message = str(info.value)
    assert "_NoBlocks" in message
    assert "ModuleList" in message
    assert "ModelSpec(" in message  # suggests an explicit spec
    assert isinstance(info.value, ValueError)


def test_error_when_block_has_no_mlp() -> None:
    model = _NoBlocks()
    model.layers = nn.ModuleList(  # blocks exist but hold only hidden -> hidden layers
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2)
    )
    with pytest.raises(ModelSpecError, match="no MLP found"):
        ModelSpec.from_model(model)


def test_linear_helpers() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=7, nx=5)  # 5 -> 7, weight stored [5, 7]
    assert tuple(conv.weight.shape) == (5, 7)
    assert in_out_features(conv) == (5, 7)
    assert in_out_features(nn.Linear(5, 7)) == (5, 7)
    assert is_linear_like(conv) and is_linear_like(nn.Linear(2, 3))
    assert not is_linear_like(nn.LayerNorm(3))
    with pytest.raises(TypeError):
        in_out_features(nn.LayerNorm(3))
    with pytest.raises(ModelSpecError):
        get_parameter(nn.Linear(2, 3), "nope.weight")


class _ToyConfig:
    n_layer = 2
    d_model = 8
    ffn_dim = 12


class _ToyMixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 24)  # fused qkv
        self.b = nn.Linear(8, 8)


class _ToyFF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 24)  # fused gate+up: hidden -> 2 * intermediate
        self.b = nn.Linear(12, 8)


class _ToyBlock(nn.Module):
    def __init__(self, mlp_on_block: bool) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(8)
        self.mix = _ToyMixer()
        if mlp_on_block:  # OPT style: MLP linears sit directly on the block
            self.fc1 = nn.Linear(8, 12)
            self.fc2 = nn.Linear(12, 8)
        else:
            self.ff = _ToyFF()


class _ToyLM(nn.Module):
    """Names that match no family on purpose: detection must go by shapes."""

    def __init__(self, mlp_on_block: bool = False) -> None:
        super().__init__()
        self.config = _ToyConfig()
        self.body = nn.Module()
        self.body.tok = nn.Embedding(10, 8)
        self.body.stack = nn.ModuleList(_ToyBlock(mlp_on_block) for _ in range(2))
        self.body.last = nn.LayerNorm(8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.body.tok.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.body.tok

    def get_output_embeddings(self) -> nn.Module:
        return self.out


def test_detection_goes_by_shapes_not_names() -> None:
    spec = ModelSpec.from_model(_ToyLM())
    assert spec.layers_path == "body.stack"
    assert (spec.hidden_size, spec.intermediate_size) == (8, 12)
    assert spec.mlp(1) == "body.stack.1.ff"
    assert spec.mlp_in(1) == ("body.stack.1.ff.a",)
    assert spec.mlp_out(1) == "body.stack.1.ff.b"
    assert spec.attn(0) == "body.stack.0.mix"
    assert spec.attn_out(0) == "body.stack.0.mix.b"
    assert (spec.embed_path, spec.lm_head_path, spec.final_norm_path) == ("body.tok", "out", "body.last")
    assert spec.tied_embeddings is True


def test_mlp_linears_directly_on_block() -> None:
    spec = ModelSpec.from_model(_ToyLM(mlp_on_block=True))
    assert spec.mlp(0) == "body.stack.0"
    assert spec.mlp_in(0) == ("body.stack.0.fc1",)
    assert spec.mlp_out(0) == "body.stack.0.fc2"
    assert spec.attn_out(0) == "body.stack.0.mix.b"
