"""EasyEdit hyperparameter files read as they are: method, values, module templates, keys without effect.

The YAML below is written for these tests in the shape of EasyEdit's ``hparams/<METHOD>/llama-7b.yaml``
files (the same keys, values chosen for a three-layer model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import build_tiny_gpt2, build_tiny_llama
from lmedit.compat.easyedit_hparams import (
    EasyEditHparamsError, is_easyedit_hparams, read_easyedit_hparams, run_settings, to_lmedit_preset,
)
from lmedit.registry import MethodError, get_method

LLAMA_TEMPLATES = """
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
"""

FT = """
alg_name: "FT"
model_name: "./hugging_cache/llama-2-7b"
device: 0
layers: [2]
num_steps: 12
batch_size: 1
max_length: 40
lr: 5e-4
weight_decay: 0
kl_factor: 0
norm_constraint: false
objective_optimization: "{objective}"
rewrite_module_tmp: "model.layers.{{}}.mlp.down_proj.weight"
layer_module_tmp: "model.layers.{{}}"
mlp_module_tmp: "model.layers.{{}}.mlp"
attn_module_tmp: "model.layers.{{}}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
model_parallel: false
"""

LOCATE = """
alg_name: "{name}"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 0
layers: [{layers}]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 2
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: {adjust}
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
"""


def locate(name: str, layers: str, adjust: str) -> str:
    return LOCATE.format(name=name, layers=layers, adjust=adjust) + LLAMA_TEMPLATES


FILES = {
    "FT-L": FT.format(objective="prompt_last"),
    "FT-M": FT.format(objective="target_new"),
    "LoRA": """
alg_name: "LoRA"
model_name: "./hugging_cache/llama-2-7b"
device: 1
lora_type: "adalora"
layers: []
num_steps: 70
batch_size: 1
max_length: 30
lr: 5e-3
weight_decay: 0
kl_factor: 0
rank: 8
lora_alpha: 32
lora_dropout: 0.1
norm_constraint: false
target_modules: ["q_proj", "v_proj"]
model_parallel: false
""",
    "ROME": locate("ROME", "1", "false")
            + "context_template_length_params: [[5, 10], [10, 10]]\n",
    "MEMIT": locate("MEMIT", layers="0, 1", adjust="true")
             + "layer_selection: all\nmom2_update_weight: 15000\n",
    "AlphaEdit": locate("AlphaEdit", layers="0, 1", adjust="true")
                 + "layer_selection: all\nmom2_update_weight: 15000\nP_loc: ./null_space_project.pt\n"
                   "nullspace_threshold: 2e-2\nL2: 1\n",
    "EMMET": locate("EMMET", layers="0, 1", adjust="true")
             + "layer_selection: all\nmom2_update_weight: 100000\nemmet_lambda: 0.1\nupdate_norm_lambda: 0\n",
    "PMET": """
alg_name: "PMET"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 0
layers: [0, 1]
clamp_norm_factor: 1
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 2
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
rewrite_module_tmps: ["model.layers.{}.mlp.down_proj"]
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp.down_proj"
attn_module_tmp: "model.layers.{}.self_attn.o_proj"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
nll_loss_factor: 1
model_parallel: false
""",
    "SPHERE": locate("SPHERE", layers="0, 1", adjust="true")
              + "layer_selection: all\nmom2_update_weight: 15000\nP_loc: ./null_space_project.pt\n"
                "nullspace_threshold: 2e-2\nL2: 1\ncumulative_ratio: 0.5\nsuppression strength: 0.3\n",
    "KN": """
alg_name: "KN"
model_name: "./hugging_cache/llama-2-7b"
device: 0

lr_scale: 1.0
n_toks: 10
refine: false
batch_size: 1
steps: 1
adaptive_threshold: 0.2
p: 0.4
""",
    "GRACE": """
alg_name: "GRACE"
model_name: "./hugging_cache/llama-2-7b"
device: 1
inner_params:
- model.layers[2].mlp.down_proj.weight
edit_lr: 1.0
n_iter: 50
eps: 1.0
dist_fn: euc
val_init: cold
val_train: sgd
val_reg: None
reg: early_stop
replacement: replace_last
eps_expand: coverage
num_pert: 8
dropout: 0.0
""",
    "MELO": """
alg_name: MELO
model_name: ./hugging_cache/llama-2-7b
model_parallel: false
device: 1
max_length: 512
task: hall
lora_task_type: CAUSAL_LM
check_dir: null
grace:
  name: grace
  num_iter: 50
  init_radius: 0.5
  dist_fn: euc
  val_init: cold
  val_train: sgd
  val_reg: None
  reg: early_stop
  replacement: replace_prompt
  expand_mode: moving_avg
  num_pert: 8
  key_id: -1
  num_edit_per_block: 4
  num_block: 350
  num_rank_per_block: 2
  metric_period: 400
  edit_lr: 0.001
model:
  name: ./hugging_cache/llama-2-7b
  class_name: LlamaForCausalLM
  tokenizer_class: LlamaTokenizerFast
  tokenizer_name: ./hugging_cache/llama-2-7b
  fan_in_fan_out: False
  target_modules:
    - model.layers.1.mlp.up_proj
    - model.layers.2.mlp.up_proj
  pt: ./checkpoint
  grace_layer: model.layers.0.mlp.down_proj
lora:
  cls_name: ./hugging_cache/distilbert-base-cased
  cls_class: AutoModel
  supervised: true
  cos: false
  freeze: null
  square: true
  bound_embeds: false
  use_all_negatives: false
  freeze_lora: false
  dist_heads: 1
  cross_attend: false
  soft_weighting: false
  checkpoint_grad: false
  lora_r: 64
  lora_alpha: 64
  lora_dropout: 0.0
""",
    "DEFER": """
alg_name: "DEFER"
model_name: "meta-llama/Llama-2-7b-hf"
device: 0
inner_params:
- model.layers[1].self_attn.o_proj.weight
edit_lr: 7e-5
n_iter: 100
threshold: 0.5
""",
    "WISE": """
alg_name: "WISE"
model_name: "./hugging_cache/llama-2-7b"
device: 1
mask_ratio: 0.2
edit_lr: 1.0
n_iter: 70
norm_constraint: 1.0
act_margin: [5.0, 20.0, 10.0]
act_ratio: 0.88
save_freq: 500
merge_freq: 1000
merge_alg: 'ties'
objective_optimization: 'only_label'
inner_params:
- model.layers[2].mlp.down_proj.weight
densities: 0.53
weights: 1.0
retrieve: True
replay: False
model_parallel: False
""",
    "IKE": """
alg_name: "IKE"
model_name: "./hugging_cache/llama-2-7b-chat"
sentence_model_name: "./hugging_cache/all-MiniLM-L6-v2"
device: 0
results_dir: "./results"
k: 4
model_parallel: false
""",
    "SERAC": """
alg_name: "SERAC"
archive: ./results/models/SERAC/llama-2-7b
device: 1
model_name: ./hugging_cache/llama-2-7b
model_class: LlamaForCausalLM
small_name: ./hugging_cache/llama-160m
tokenizer_class: LlamaTokenizer
tokenizer_name: ./hugging_cache/llama-2-7b
cls_name: ./hugging_cache/distilbert-base-cased
cls_class: AutoModel
inner_params: []
model_parallel: false
lr: 1e-5
edit_lr: 1e-2
cedit: 0.1
batch_size: 1
max_iters: 10000
results_dir: ./results
""",
    "MALMEN": """
alg_name: "MALMEN"
archive: ./results/models/MALMEN/gpt2-xl
device: 0
model_name: ./hugging_cache/gpt2-xl
model_class: GPT2LMHeadModel
tokenizer_class: GPT2TokenizerFast
tokenizer_name: ./hugging_cache/gpt2-xl
inner_params:
- transformer.h.46.mlp.c_proj.weight
- transformer.h.47.mlp.c_proj.weight
dropout: 0.0
train_base: False
no_grad_layers: null
rank: 1920
n_blocks: 2
lr: 1e-6
meta_lr: 1e-5
loc_coef: 1
max_grad_norm: 1
token: mask
n_edits: 1
batch_size: 1
editor_batch_size: 1024
max_iters: 10000
model_parallel: false
results_dir: ./results
""",
    "UltraEdit": """
alg_name: "ULTRAEDIT"
device: 0
model_name: ./hugging_cache/llama-2-7b
model_class: AutoModelForCausalLM
tokenizer_class: AutoTokenizer
tokenizer_name: ./hugging_cache/llama-2-7b
inner_params:
- model.layers.0.mlp.gate_proj
- model.layers.1.mlp.gate_proj
- model.layers.2.mlp.up_proj
dropout: 0.0
no_grad_layers: null
lr: 1e-6
token: mask
batch_size: 100
batch_size_once: 10
editor_batch_size: 1024
silent: False
half: true
model_parallel: false
results_dir: ./results
""",
    "MEND": """
archive: ./results/models/MEND/llama-2-7b-ZsRE
alg_name: "MEND"
device: 1
model_name: ./hugging_cache/llama-2-7b
model_class: LlamaForCausalLM
tokenizer_class: LlamaTokenizer
tokenizer_name: ./hugging_cache/llama-2-7b
model_parallel: false
inner_params:
- model.layers.29.mlp.down_proj.weight
lr: 1e-6
edit_lr: 1e-4
lr_scale: 0.5
rank: 1920
mlp_class: IDMLP
max_iters: 100000
results_dir: ./results
""",
}

# lmedit method -> values its hyperparameters must hold after translation
EXPECTED = {
    "FT-L": {"layers": [2], "modules": ["mlp_out"], "objective": "prompt_last", "num_steps": 12, "lr": 5e-4,
             "norm_constraint": None, "batch_size": 1},
    "FT-M": {"layers": [2], "objective": "target_new", "norm_constraint": None},
    "LoRA": {"lora_type": "lora", "layers": [], "num_steps": 70, "lr": 5e-3, "rank": 8, "lora_alpha": 32.0,
             "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "batch_size": 1},
    "ROME": {"layers": [1], "v_num_grad_steps": 25, "v_lr": 0.5, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0,
             "mom2_adjustment": False, "context_template_length_params": [[5, 10], [10, 10]],
             "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32"},
    "MEMIT": {"layers": [0, 1], "mom2_update_weight": 15000.0, "mom2_adjustment": True},
    "AlphaEdit": {"layers": [0, 1], "nullspace_threshold": 0.02, "L2": 1.0},
    "EMMET": {"layers": [0, 1], "mom2_update_weight": 100000.0, "emmet_lambda": 0.1, "update_norm_lambda": 0.0},
    "PMET": {"layers": [0, 1], "mom2_update_weight": 15000.0, "clamp_norm_factor": 1.0, "v_weight_decay": 0.5,
             "v_num_grad_steps": 20},
    "SPHERE": {"layers": [0, 1], "nullspace_threshold": 0.02, "L2": 1.0, "beta_hse": 0.5, "alpha": 0.3},
    "KN": {"steps": 1, "batch_size": 1, "adaptive_threshold": 0.2, "p": 0.4, "refine": False},
    "GRACE": {"layer": 2, "module": "mlp_out", "inner_params": [], "edit_lr": 1.0, "n_iter": 50, "eps": 1.0,
              "replacement": "replace_last", "eps_expand": "coverage"},
    "MELO": {"layer": 0, "module": "mlp_out", "inner_params": [], "key_from": "output", "n_iter": 50, "edit_lr": 1e-3,
             "init_radius": 0.5, "num_block": 350, "num_rank_per_block": 2,
             "lora_inner_params": ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]},
    "DEFER": {"layer": 1, "module": "attn_out", "edit_lr": 7e-5, "n_iter": 100, "threshold": 0.5},
    "WISE": {"layer": 2, "module": "mlp_out", "mask_ratio": 0.2, "n_iter": 70, "act_margin": [5.0, 20.0, 10.0],
             "act_ratio": 0.88, "save_freq": 500, "merge_freq": 1000, "merge_alg": "ties", "retrieve": True},
    "IKE": {"k": 4, "encoder": "all-MiniLM-L6-v2"},
    "SERAC": {"archive": "{lmedit_home}/checkpoints/SERAC/smollm2-135m"},
    "MEND": {"lr_scale": 0.5, "archive": "{lmedit_home}/checkpoints/MEND/smollm2-135m"},
    "MALMEN": {"archive": "{lmedit_home}/checkpoints/MALMEN/smollm2-135m"},
    "UltraEdit": {"inner_params": ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj",
                                   "model.layers.2.mlp.up_proj"], "lr": 1e-6, "token": "all", "grad_batch_size": 10},
}

IGNORED = {
    "FT-L": ["max_length", "kl_factor", "model_parallel"],
    "LoRA": ["max_length", "kl_factor", "norm_constraint", "model_parallel"],
    "ROME": ["stats_dir", "model_parallel"],
    "AlphaEdit": ["stats_dir", "model_parallel", "layer_selection", "P_loc"],
    "GRACE": ["val_train", "val_reg", "reg", "num_pert", "dropout"],
    "DEFER": [],
    "IKE": ["results_dir", "model_parallel"],
    "UltraEdit": ["model_class", "tokenizer_class", "tokenizer_name", "dropout", "no_grad_layers", "batch_size",
                  "editor_batch_size", "silent", "model_parallel", "results_dir"],
}


def write(tmp_path: Path, method: str, text: str | None = None) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(text if text is not None else FILES[method])
    return path


@pytest.mark.parametrize("method", sorted(FILES))
def test_each_method_maps_onto_lmedit(tmp_path: Path, method: str) -> None:
    path = write(tmp_path, method)
    assert is_easyedit_hparams(yaml.safe_load(path.read_text()))
    config = read_easyedit_hparams(path)
    assert config.method == method
    assert type(config.hparams) is get_method(method).hparams_class
    for key, value in EXPECTED[method].items():
        assert getattr(config.hparams, key) == value, key
    assert config.model_name and config.model_name.startswith(("./hugging_cache", "meta-llama"))
    assert config.device in ("cuda:0", "cuda:1")
    mapped = {m.easyedit_key for m in config.mappings}
    assert mapped == set(yaml.safe_load(path.read_text())), "every key of the file has a mapping"


@pytest.mark.parametrize("method", sorted(IGNORED))
def test_keys_without_effect_are_listed_by_name(tmp_path: Path, method: str) -> None:
    config = read_easyedit_hparams(write(tmp_path, method))
    assert sorted(config.ignored) == sorted(IGNORED[method])
    for key in config.ignored:
        assert config.mapping_of(key).note, f"{key} says why it is ignored"


def test_ignored_keys_are_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "FT-L")
    with caplog.at_level(logging.WARNING, logger="lmedit.compat.easyedit_hparams"):
        read_easyedit_hparams(path)
        read_easyedit_hparams(path)
    warned = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(warned) == 1 and all(k in warned[0] for k in ("max_length", "kl_factor", "model_parallel"))


def test_values_that_differ_in_behaviour_say_so(tmp_path: Path) -> None:
    lora = read_easyedit_hparams(write(tmp_path, "LoRA"))
    assert "AdaLoRA" in lora.mapping_of("lora_type").note
    rome = read_easyedit_hparams(write(tmp_path, "ROME"))
    assert "model's output" in rome.mapping_of("v_loss_layer").note
    ft_clamped = read_easyedit_hparams(write(tmp_path, "FT-L", FILES["FT-L"].replace("false", "5e-4", 1)))
    assert ft_clamped.hparams.norm_constraint == 5e-4  # "5e-4" is a string to PyYAML; EasyEdit casts it
    serac = read_easyedit_hparams(write(tmp_path, "SERAC"))
    assert "archive" in serac.ignored and "not read" in serac.mapping_of("archive").note


def test_ultraedit_run_settings_and_token_modes(tmp_path: Path) -> None:
    config = read_easyedit_hparams(write(tmp_path, "UltraEdit"), model=build_tiny_llama(64, layers=3))
    assert (config.batch_size, config.dtype) == (100, "float16")  # turns of 100 edits; the model in half precision
    answer = FILES["UltraEdit"].replace("token: mask", "token: ans")
    assert read_easyedit_hparams(write(tmp_path, "UltraEdit", answer)).hparams.token == "answer"
    missing = FILES["UltraEdit"].replace("model.layers.2.mlp.up_proj", "model.layers.2.mlp.fc_in")
    with pytest.raises(EasyEditHparamsError, match="inner_params.*fc_in"):
        read_easyedit_hparams(write(tmp_path, "UltraEdit", missing), model=build_tiny_llama(64, layers=3))


def test_wise_alpha_beta_gamma_fill_act_margin(tmp_path: Path) -> None:
    text = FILES["WISE"].replace("act_margin: [5.0, 20.0, 10.0]", "alpha: 4.0\nbeta: 18.0\ngamma: 9.0")
    assert read_easyedit_hparams(write(tmp_path, "WISE", text)).hparams.act_margin == [4.0, 18.0, 9.0]


def test_unknown_method_names_it_and_lists_lmedits(tmp_path: Path) -> None:
    path = write(tmp_path, "DINM", "alg_name: DINM\nmodel_name: gpt2\ndevice: 0\nlayers: [4]\n")
    with pytest.raises(EasyEditHparamsError, match="DINM") as error:
        read_easyedit_hparams(path)
    assert all(name in str(error.value) for name in ("ROME", "WISE", "FT-M", "GRACE"))


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "DEFER", FILES["DEFER"] + "n_iters: 5\n")
    with pytest.raises(EasyEditHparamsError, match="'n_iters'.*did you mean 'n_iter'"):
        read_easyedit_hparams(path)


def test_ft_without_objective_says_which_to_choose(tmp_path: Path) -> None:
    text = "\n".join(line for line in FILES["FT-L"].splitlines() if "objective" not in line)
    with pytest.raises(EasyEditHparamsError, match="prompt_last.*target_new"):
        read_easyedit_hparams(write(tmp_path, "FT-L", text))


def test_templates_are_checked_against_the_model(tmp_path: Path) -> None:
    model = build_tiny_llama(64, layers=3)
    read_easyedit_hparams(write(tmp_path, "ROME"), model=model)  # llama templates fit a llama model
    gpt2_style = FILES["ROME"].replace('"model.layers.{}.mlp.down_proj"', '"transformer.h.{}.mlp.c_proj"')
    with pytest.raises(EasyEditHparamsError) as error:
        read_easyedit_hparams(write(tmp_path, "ROME", gpt2_style), model=model)
    message = str(error.value)
    assert "rewrite_module_tmp" in message and "transformer.h.{}.mlp.c_proj" in message
    assert "model.layers.{}.mlp.down_proj" in message  # the modules that exist


def test_inner_params_matching_no_module(tmp_path: Path) -> None:
    model = build_tiny_llama(64, layers=3)
    text = FILES["GRACE"].replace("model.layers[2].mlp.down_proj.weight", "model.layers[2].mlp.fc_out.weight")
    with pytest.raises(EasyEditHparamsError, match=r"inner_params.*fc_out.*model\.layers\.\{\}\.mlp\.down_proj"):
        read_easyedit_hparams(write(tmp_path, "GRACE", text), model=model)


def test_roles_come_from_the_model_layout(tmp_path: Path) -> None:
    gpt2 = build_tiny_gpt2(64, layers=3)
    out_proj = FILES["GRACE"].replace("model.layers[2].mlp.down_proj.weight", "transformer.h[1].mlp.c_proj.weight")
    config = read_easyedit_hparams(write(tmp_path, "GRACE", out_proj), model=gpt2)
    assert (config.hparams.layer, config.hparams.module) == (1, "mlp_out")
    c_fc = FILES["GRACE"].replace("model.layers[2].mlp.down_proj.weight", "transformer.h[1].mlp.c_fc.weight")
    config = read_easyedit_hparams(write(tmp_path, "GRACE", c_fc), model=gpt2)
    assert config.hparams.inner_params == ["transformer.h[1].mlp.c_fc.weight"]  # not an adapter role: kept


@pytest.mark.parametrize("method", sorted(FILES))
def test_converted_preset_reloads_equal(tmp_path: Path, method: str) -> None:
    config = read_easyedit_hparams(write(tmp_path, method))
    text = to_lmedit_preset(config)
    preset = tmp_path / f"{method}-lmedit.yaml"
    preset.write_text(text)
    assert not is_easyedit_hparams(yaml.safe_load(text))
    assert get_method(method).load_hparams(path=preset) == config.hparams
    for mapping in config.mappings:
        assert mapping.easyedit_key in text, f"the preset's comments name {mapping.easyedit_key}"


def test_lmedit_files_keep_strict_loading(tmp_path: Path) -> None:
    lmedit_file = tmp_path / "ft.yaml"
    lmedit_file.write_text("method: FT-M\nlayers: [1]\nlr: 1e-3\n")
    assert not is_easyedit_hparams(yaml.safe_load(lmedit_file.read_text()))
    assert get_method("FT-M").load_hparams(path=lmedit_file).lr == 1e-3
    lmedit_file.write_text("method: FT-M\nlayers: [1]\ndevice: 0\n")
    with pytest.raises(ValueError, match="unknown key 'device'"):
        get_method("FT-M").load_hparams(path=lmedit_file)


def test_registry_loads_easyedit_files_and_checks_the_method(tmp_path: Path) -> None:
    path = write(tmp_path, "FT-M")
    params = get_method("FT-M").load_hparams(path=path, overrides={"lr": 1e-3})
    assert (params.layers, params.objective, params.lr) == ([2], "target_new", 1e-3)
    with pytest.raises(MethodError, match="EasyEdit file for FT-M"):
        get_method("ROME").load_hparams(path=path)


def test_run_settings_take_method_and_model_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "WISE")
    assert run_settings(path, None, None, default_method="FT-M", default_model="m") == ("WISE", "./hugging_cache/llama-2-7b")
    assert run_settings(path, "wise", "other", default_method="FT-M", default_model="m") == ("WISE", "other")
    assert run_settings(None, None, None, default_method="FT-M", default_model="m") == ("FT-M", "m")
    with pytest.raises(EasyEditHparamsError, match="--method ROME disagrees"):
        run_settings(path, "ROME", None, default_method="FT-M", default_model="m")


def test_a_converted_preset_runs_as_its_own_method(tmp_path: Path) -> None:
    """`lmedit run --hparams rome.yaml` (a converted preset, `method: ROME`) is a ROME run, not FT-M's default."""
    from lmedit.cli import app

    preset = tmp_path / "rome.yaml"
    result = CliRunner().invoke(app, ["hparams", "convert", str(write(tmp_path, "ROME")), "--out", str(preset)])
    assert result.exit_code == 0, result.output
    assert run_settings(preset, None, None, default_method="FT-M", default_model="m") == ("ROME", "m")
    assert run_settings(preset, "rome", None, default_method="FT-M", default_model="m") == ("ROME", "m")
    with pytest.raises(EasyEditHparamsError, match="--method FT-M disagrees with .*a file for ROME"):
        run_settings(preset, "FT-M", None, default_method="FT-M", default_model="m")
    plain = tmp_path / "plain.yaml"
    plain.write_text("layers: [1]\n")  # names no method: the default
    assert run_settings(plain, None, None, default_method="FT-M", default_model="m") == ("FT-M", "m")


def test_editor_with_an_easyedit_file(tmp_path: Path, word_tok) -> None:
    from lmedit.editor import Editor

    model = build_tiny_llama(len(word_tok), layers=3)
    editor = Editor(model, word_tok, "GRACE", hparams_file=write(tmp_path, "GRACE"))
    assert (editor.hparams.layer, editor.hparams.module) == (2, "mlp_out")


def test_cli_convert(tmp_path: Path) -> None:
    from lmedit.cli import app

    out = tmp_path / "rome.yaml"
    result = CliRunner().invoke(app, ["hparams", "convert", str(write(tmp_path, "ROME")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert get_method("ROME").load_hparams(path=out) == read_easyedit_hparams(tmp_path / "ROME.yaml").hparams
    printed = CliRunner().invoke(app, ["hparams", "convert", str(tmp_path / "ROME.yaml")])
    assert "method: ROME" in printed.output and "stats_dir" in printed.output
    bad = CliRunner().invoke(app, ["hparams", "convert", str(out)])
    assert bad.exit_code == 2 and "not an EasyEdit hyperparameter file" in " ".join(bad.output.split())
