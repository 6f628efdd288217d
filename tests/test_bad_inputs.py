"""The bad-input catalogue: every case ends in exit status 2, one ``error:`` line naming the problem, nothing written.

Each row of :data:`CASES` is one kind of bad input a user can give ``lmedit``:
its id, its command line, extra environment and the words its one error line
must contain. The commands run in-process (typer's CliRunner), on a tiny random
Llama saved to a temporary folder, so the whole catalogue takes seconds. A new
option gets its rows here when it is added (issue 15).

The saved-edit and cache cases at the end run through the library (there is no
command that loads a saved edit): each must raise one clear error, never apply
a wrong edit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from lmedit.cli import app

from conftest import build_tiny_llama, build_word_tokenizer

LAYER = "--set", "layers=[1]"  # the tiny model has layers 0..2; FT-M's default layer is the embedded model's
NOT_ROOT = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                              reason="root writes into read-only folders; the monkeypatched twin covers it")


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` may name ``{model}`` (the tiny model folder) and ``{ws}`` (the workspace)."""

    id: str
    argv: tuple[str, ...]
    words: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    marks: tuple[Any, ...] = ()


def case(id: str, argv: str | tuple[str, ...], *words: str, env: dict[str, str] | None = None,
         marks: tuple[Any, ...] = ()) -> Any:
    args = tuple(argv.split()) if isinstance(argv, str) else argv
    return pytest.param(Case(id, args, words, env or {}, marks), id=id, marks=marks)


RUN = "run --model {model} --no-progress --set layers=[1] --set num_steps=1"
RUN_OUT = RUN + " --out {ws}/out"

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device exists")

CASES = [
    # ---------------------------------------------------------------- data files
    case("data-missing", RUN_OUT + " --data {ws}/nothing.json", "nothing.json"),
    case("data-empty-file", RUN_OUT + " --data {ws}/empty.json", "empty.json"),
    case("data-not-json", RUN_OUT + " --data {ws}/broken.json", "broken.json"),
    case("data-object-not-list", RUN_OUT + " --data {ws}/object.json", "object.json"),
    case("data-empty-list", RUN_OUT + " --data {ws}/empty_list.json", "empty record list"),
    case("data-list-of-numbers", RUN_OUT + " --data {ws}/numbers.json", "record 0", "expected a JSON object"),
    case("data-unknown-fields", RUN_OUT + " --data {ws}/unknown_fields.json", "unrecognised record fields"),
    case("data-missing-target", RUN_OUT + " --data {ws}/no_target.json --format lmedit", "no_target.json", "record 0"),
    case("data-prompt-not-string", RUN_OUT + " --data {ws}/prompt_number.json --format lmedit", "record 0"),
    case("data-is-a-folder", RUN_OUT + " --data {ws}", "cannot read data file"),
    case("data-unknown-format", RUN_OUT + " --data {ws}/demo.json --format parquet", "unknown data format", "parquet"),
    case("data-wrong-format", RUN_OUT + " --data {ws}/demo.json --format zsre", "not a valid zsre"),
    case("data-zsre-empty-alt", RUN_OUT + " --data {ws}/zsre_empty_alt.json --format zsre", "records 0..0 all have an empty target (alt)"),
    case("data-jsonl-bad-line", RUN_OUT + " --data {ws}/bad_lines.jsonl", "bad_lines.jsonl", "line 2"),
    # ---------------------------------------------------------------- run options
    case("limit-zero", RUN_OUT + " --limit 0", "--limit is 0"),
    case("limit-negative", RUN_OUT + " --limit -1", "limit", "-1"),
    case("offset-negative", RUN_OUT + " --offset -1", "offset", "-1"),
    case("offset-past-end", RUN_OUT + " --offset 100000", "--offset 100000 is past the end"),
    case("protocol-unknown", RUN_OUT + " --protocol parallel", "unknown protocol", "parallel"),
    case("T-zero", RUN_OUT + " --protocol sequential --T 0", "T >= 1"),
    case("T-negative", RUN_OUT + " --protocol sequential --T -2", "T >= 1"),
    case("T-without-sequential", RUN_OUT + " --T 3", "sequential protocol only"),
    case("batch-size-zero", RUN_OUT + " --protocol batch --batch-size 0", "batch size must be at least 1"),
    case("batch-in-single", RUN_OUT + " --batch-size 2", "--protocol batch"),
    case("eval-mode-unknown", RUN_OUT + " --eval-mode fast", "eval mode", "fast"),
    case("eval-batch-size-zero", RUN_OUT + " --eval-batch-size 0", "eval batch size must be at least 1"),
    case("eval-batch-size-negative", RUN_OUT + " --eval-batch-size -4", "eval batch size must be at least 1"),
    case("eval-max-tokens-zero", RUN_OUT + " --eval-max-tokens 0", "max_batch_tokens must be at least 1"),
    case("eval-max-tokens-beyond-memory", RUN_OUT + " --eval-max-tokens 1000000000000", "--eval-max-tokens 1,000,000,000,000",
         "free", "use --eval-max-tokens 2,048 or less"),
    case("suite-unknown", RUN_OUT + " --suite telepathy", "telepathy"),
    case("retention-every-negative", RUN_OUT + " --retention-every -1", "retention"),
    case("retention-items-zero", RUN_OUT + " --retention-every 1 --retention-items 0", "retention"),
    case("method-unknown", RUN_OUT + " --method ZAP", "unknown method", "ZAP"),
    case("method-batch-unsupported", "run --model {model} --out {ws}/out --method ROME --set layers=[1] "
                                     "--protocol batch --batch-size 2 --limit 2",
         "one request at a time"),
    case("preset-unknown", RUN_OUT + " --preset nosuch", "no preset", "nosuch"),
    case("preset-and-hparams", RUN_OUT + " --preset smollm2-135m --hparams {ws}/good.yaml", "not both"),
    # ---------------------------------------------------------------- hyperparameters
    case("hparams-missing", RUN_OUT + " --hparams {ws}/none.yaml", "none.yaml", "does not exist"),
    case("hparams-not-yaml", RUN_OUT + " --hparams {ws}/broken.yaml", "broken.yaml", "not valid YAML"),
    case("hparams-not-mapping", RUN_OUT + " --hparams {ws}/list.yaml", "list.yaml", "mapping"),
    case("hparams-unknown-key", RUN_OUT + " --hparams {ws}/unknown_key.yaml", "unknown key", "num_stepz", "num_steps"),
    case("hparams-wrong-type", RUN_OUT + " --hparams {ws}/wrong_type.yaml", "lr"),
    case("hparams-bad-value", RUN_OUT + " --hparams {ws}/bad_value.yaml", "lr must be positive"),
    case("set-unknown-key", RUN_OUT + " --set learning_rate=0.1", "unknown key", "learning_rate"),
    case("set-wrong-type", RUN_OUT + " --set num_steps=many", "num_steps"),
    case("set-bad-value", RUN_OUT + " --set lr=-1", "lr must be positive"),
    case("set-broken-yaml", (*RUN_OUT.split(), "--set", "layers=[1,"), "--set", "layers=[1,", "not valid YAML"),
    case("set-no-equals", RUN_OUT + " --set num_steps", "--set expects key=value"),
    case("set-empty-key", RUN_OUT + " --set =3", "--set expects key=value"),
    case("layer-beyond-model", RUN_OUT + " --set layers=[99]", "layer 99", "0..2"),
    # ---------------------------------------------------------------- EasyEdit hyperparameter files
    case("hparams-method-disagrees", RUN_OUT + " --method ROME --hparams {ws}/named_ft.yaml", "--method ROME disagrees",
         "a file for FT-M"),
    case("easyedit-convert-missing", "hparams convert {ws}/none.yaml", "none.yaml", "does not exist"),
    case("easyedit-convert-not-easyedit", "hparams convert {ws}/good.yaml", "good.yaml", "not an EasyEdit"),
    case("easyedit-convert-unknown-method", "hparams convert {ws}/ee_unknown.yaml", "ZAPEDIT", "lmedit's methods"),
    case("easyedit-run-unknown-method", "run --model {model} --hparams {ws}/ee_unknown.yaml --out {ws}/out",
         "ZAPEDIT", "lmedit's methods"),
    case("easyedit-run-template-matches-nothing", "run --model {model} --hparams {ws}/ee_template.yaml --out {ws}/out",
         "nothing_here"),
    # ---------------------------------------------------------------- models and environment
    case("model-missing-folder", "run --model {ws}/no-model --out {ws}/out", "no-model"),
    case("model-folder-without-config", "run --model {ws}/empty_dir --out {ws}/out", "empty_dir"),
    case("model-remote-code-refused", "run --model {ws}/remote_code --out {ws}/out", "trust-remote-code"),
    case("home-under-a-file", "run --model smollm2-135m --out {ws}/out", "LMEDIT_HOME",
         env={"LMEDIT_HOME": "{ws}/demo.json/home"}),
    # devices and precision: refused before any data or model is read (this CPU-only build has no CUDA)
    case("device-cuda-without-cuda", "run --model {model} --device cuda --out {ws}/out", "--device cuda", "no usable cuda",
         marks=NO_CUDA),
    case("device-cuda-index-without-cuda", "edit --model {model} --prompt the --target paris --device cuda:1",
         "--device cuda:1", "--device cpu", marks=NO_CUDA),
    case("device-unknown", "stats --model {model} --layers 1 --device gpu --cache-dir {ws}/cache", "unknown device", "gpu"),
    case("dtype-unknown", "run --model {model} --dtype float8 --out {ws}/out", "unknown dtype", "float8"),
    case("dtype-unknown-trace", "trace --model {model} --dtype int8 --out {ws}/out", "unknown dtype", "int8"),
    case("device-cuda-train", "train mend --model {model} --device cuda --out {ws}/out", "no usable cuda", marks=NO_CUDA),
    case("device-cuda-reproduce", "reproduce wise-table --device cuda --out {ws}/out", "no usable cuda", marks=NO_CUDA),
    case("max-memory-not-a-size", "stats --model {model} --layers 1 --max-memory lots --cache-dir {ws}/cache",
         "--max-memory", "not a size"),
    case("max-memory-below-the-weights", "stats --model {model} --layers 1 --max-memory 1KiB --cache-dir {ws}/cache",
         "--max-memory 1KiB", "weights"),
    case("max-memory-run-below-the-weights", "run --model {model} --max-memory 1KiB --out {ws}/out",
         "--max-memory 1KiB", "weights"),
    case("corpus-dir-missing", "stats --model {model} --layers 1 --corpus {ws}/no-corpus --cache-dir {ws}/cache",
         "no-corpus"),
    # ---------------------------------------------------------------- output folders
    case("out-is-a-file", RUN + " --out {ws}/demo.json", "--out", "is a file"),
    case("out-parent-is-a-file", RUN + " --out {ws}/demo.json/run", "--out", "is a file"),
    case("edit-save-is-a-file", "edit --model {model} --prompt the --target paris --set layers=[1] "
                                "--save {ws}/demo.json", "--save", "is a file"),
    case("report-out-parent-is-a-file", "report {ws}/good_run --out {ws}/demo.json/table", "--out", "is a file"),
    case("stats-cache-dir-is-a-file", "stats --model {model} --layers 1 --cache-dir {ws}/demo.json", "--cache-dir",
         "is a file"),
    case("train-out-is-a-file", "train mend --model {model} --train-data {ws}/demo.json --val-data {ws}/demo.json "
                                "--out {ws}/demo.json", "--out", "is a file"),
    case("trace-out-is-a-file", "trace --model {model} --data {ws}/cf.json --no-plots --out {ws}/demo.json",
         "--out", "is a file"),
    case("reproduce-out-is-a-file", "reproduce wise-table --model {model} --data {ws}/demo.json --out {ws}/demo.json",
         "--out", "is a file"),
    # ---------------------------------------------------------------- run folders (lmedit report)
    case("report-no-folder", "report", "give at least one run folder"),
    case("report-missing-folder", "report {ws}/no-run", "no-run"),
    case("report-not-a-run-folder", "report {ws}/empty_dir", "empty_dir"),
    case("report-corrupt-config", "report {ws}/run_bad_config", "config.json", "line 1"),
    case("report-config-not-object", "report {ws}/run_config_list", "config.json", "JSON object"),
    case("report-corrupt-summary", "report {ws}/run_bad_summary", "summary.json", "line"),
    case("report-results-non-object-line", "report {ws}/run_bad_results", "results.jsonl", "line 2"),
    case("report-results-bad-json-line", "report {ws}/run_torn_middle", "results.jsonl", "line 1"),
    case("report-layout-unknown", "report {ws}/good_run --layout fancy", "unknown layout", "fancy"),
    # ---------------------------------------------------------------- edit, stats, train, trace, reproduce
    case("edit-subject-missing", "edit --model {model} --prompt the --target paris --method ROME", "subject"),
    case("edit-subject-not-in-prompt", "edit --model {model} --prompt the --target paris --method ROME --subject moon",
         "moon"),
    case("edit-method-unknown", "edit --model {model} --prompt the --target paris --method ZAP", "unknown method"),
    case("edit-set-broken-yaml", ("edit", "--model", "{model}", "--prompt", "the", "--target", "paris", "--set", "lr=[1,"),
         "not valid YAML"),
    case("stats-no-layers", "stats --model {model}", "--layers"),
    case("stats-layers-unreadable", "stats --model {model} --layers five", "cannot read layers"),
    case("stats-layers-reversed", "stats --model {model} --layers 5-3", "cannot read layers"),
    case("train-unknown-method", "train zap --model {model}", "unknown method"),
    case("train-not-trainable", "train rome --model {model}", "no networks to train"),
    case("train-data-missing", "train mend --model {model} --train-data {ws}/nothing.json", "--train-data", "nothing.json"),
    case("train-set-broken-yaml", ("train", "mend", "--model", "{model}", "--set", "max_steps=[1,"), "not valid YAML"),
    case("trace-kinds-unknown", "trace --model {model} --kinds neurons", "--kinds"),
    case("trace-limit-zero", "trace --model {model} --limit 0", "--limit"),
    case("trace-data-missing", "trace --model {model} --data {ws}/nothing.json --no-plots", "nothing.json"),
    case("reproduce-methods-empty", "reproduce wise-table --model {model} --data {ws}/demo.json --methods , "
                                    "--out {ws}/out", "no methods"),
    case("reproduce-set-no-method", "reproduce wise-table --model {model} --data {ws}/demo.json --set n_iter=3 "
                                    "--out {ws}/out", "METHOD.key=value"),
    case("reproduce-set-broken-yaml", ("reproduce", "wise-table", "--model", "{model}", "--data", "{ws}/demo.json",
                                       "--set", "WISE.n_iter=[1,", "--out", "{ws}/out"), "not valid YAML"),
    case("reproduce-table-only-missing", "reproduce wise-table --table-only --out {ws}/no-table", "no-table"),
    # ---------------------------------------------------------------- prompts the model cannot take
    case("prompt-empty", ("edit", "--model", "{model}", "--prompt", "", "--target", "paris", "--set", "layers=[1]"),
         "prompt is empty"),
    case("target-blank", ("edit", "--model", "{model}", "--prompt", "the", "--target", "  ", "--set", "layers=[1]"),
         "target_new is empty"),
    case("prompt-beyond-context", ("edit", "--model", "{model}", "--prompt", " ".join(["the"] * 300), "--target",
                                   "paris", "--set", "layers=[1]", "--set", "num_steps=1"),
         "prompt + target_new is 301 tokens", "context of 128 tokens"),
    case("run-prompt-beyond-context", RUN_OUT + " --data {ws}/long_prompt.json", "request 0", "context of 128 tokens"),
    case("run-rephrase-beyond-context", RUN_OUT + " --data {ws}/long_rephrase.json", "rephrase 0", "context of 128"),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and its word tokenizer, saved like any Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_word_tokenizer()
    build_tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def good_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder on the tiny model (two requests), copied and damaged by the report cases."""
    folder = tmp_path_factory.mktemp("good-run") / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_model_dir), "--limit", "2", "--no-progress", *LAYER,
                                      "--set", "num_steps=1", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def workspace(tmp_path: Path, good_run: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The inputs every case may name, in a fresh folder that is also the working directory."""
    ws = tmp_path / "ws"
    ws.mkdir()
    write_inputs(ws, good_run, tiny_model_dir)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "80")
    return ws


def write_inputs(ws: Path, good_run: Path, model_dir: Path) -> None:
    demo = [{"prompt": "the capital of france is", "target_new": "rome", "subject": "france", "ground_truth": "paris"}]
    files: dict[str, Any] = {
        "demo.json": demo,
        "object.json": {"prompt": "x"},
        "empty_list.json": [],
        "numbers.json": [1, 2, 3],
        "unknown_fields.json": [{"question": "a", "answer": "b"}],
        "no_target.json": [{"prompt": "the capital of france is"}],
        "prompt_number.json": [{"prompt": 3, "target_new": "rome"}],
        "zsre_empty_alt.json": [{"src": "the capital of france is", "alt": "", "subject": "france", "rephrase": "x",
                                 "answers": ["paris"], "loc": "nq question: who", "loc_ans": "x"}],
        "cf.json": [{"requested_rewrite": {"prompt": "{} is in", "subject": "paris", "target_new": {"str": "rome"},
                                           "target_true": {"str": "france"}}}],
        "good.yaml": "layers: [1]\nnum_steps: 1\n",
        "named_ft.yaml": "method: FT-M\nlayers: [1]\nnum_steps: 1\n",
        "ee_unknown.yaml": "alg_name: ZAPEDIT\nmodel_name: x\ndevice: 0\n",
        "ee_template.yaml": "alg_name: FT\nmodel_name: x\nlayers: [1]\nnum_steps: 1\n"
                            "objective_optimization: target_new\nrewrite_module_tmp: model.layers.{}.mlp.nothing_here\n",
        "long_prompt.json": [{"prompt": " ".join(["the"] * 300), "target_new": "rome"}],
        "long_rephrase.json": [{"prompt": "the capital of france is", "target_new": "rome",
                                "rephrase": [" ".join(["paris"] * 300)]}],
    }
    for name, value in files.items():
        (ws / name).write_text(value if isinstance(value, str) else json.dumps(value))
    texts = {
        "empty.json": "",
        "broken.json": "[{\"prompt\": ",
        "bad_lines.jsonl": json.dumps(demo[0]) + "\n{not json\n",
        "broken.yaml": "layers: [1\nnum_steps: 1\n",
        "list.yaml": "- 1\n- 2\n",
        "unknown_key.yaml": "layers: [1]\nnum_stepz: 1\n",
        "wrong_type.yaml": "layers: [1]\nlr: fast\n",
        "bad_value.yaml": "layers: [1]\nlr: 0\n",
    }
    for name, text in texts.items():
        (ws / name).write_text(text)
    (ws / "empty_dir").mkdir()
    remote = ws / "remote_code"  # a model folder that ships its own code (which raises if it is ever run)
    shutil.copytree(model_dir, remote, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (remote / "config.json").write_text(json.dumps({"model_type": "lmedit-custom", "architectures": ["CustomLM"],
                                                    "auto_map": {"AutoConfig": "custom.CustomConfig",
                                                                 "AutoModelForCausalLM": "custom.CustomLM"}}))
    (remote / "custom.py").write_text("raise RuntimeError('remote code ran')\n")
    damaged = {
        "run_bad_config": ("config.json", "{\"method\": "),
        "run_config_list": ("config.json", "[1, 2]"),
        "run_bad_summary": ("summary.json", "{\"n\": 2,,}"),
        "run_bad_results": ("results.jsonl", None),
        "run_torn_middle": ("results.jsonl", None),
    }
    for name, (file, text) in damaged.items():
        shutil.copytree(good_run, ws / name)
        if text is not None:
            (ws / name / file).write_text(text)
    (ws / "good_run").mkdir()
    shutil.copytree(good_run, ws / "good_run", dirs_exist_ok=True)
    lines = (good_run / "results.jsonl").read_text().splitlines()
    (ws / "run_bad_results" / "results.jsonl").write_text(lines[0] + "\n[1, 2]\n" + "\n".join(lines[1:]) + "\n")
    (ws / "run_bad_results" / "summary.json").unlink()
    (ws / "run_torn_middle" / "results.jsonl").write_text("{\"index\": 0,\n" + "\n".join(lines) + "\n")
    (ws / "run_torn_middle" / "summary.json").unlink()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes, and every folder: what a failed command must not change."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        state[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def invoke(argv: tuple[str, ...], env: dict[str, str], **names: str) -> Any:
    args = [a.format(**names) for a in argv]
    return CliRunner().invoke(app, args, env={k: v.format(**names) for k, v in env.items()})


def assert_one_error_line(result: Any, words: tuple[str, ...]) -> str:
    """Exit 2, no traceback, and exactly one line on stderr: ``error: ...`` containing every expected word."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in result.output
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------- the CLI catalogue


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_clear_line(bad: Case, workspace: Path, tiny_model_dir: Path) -> None:
    before = snapshot(workspace)
    result = invoke(bad.argv, bad.env, model=str(tiny_model_dir), ws=str(workspace))
    assert_one_error_line(result, tuple(w.format(ws=workspace) for w in bad.words))
    assert snapshot(workspace) == before, "a failed command left output behind"


# --------------------------------------------------------------------------- read-only folders and LMEDIT_HOME

READ_ONLY_CASES = [
    case("out-read-only-folder", RUN + " --out {ws}/locked", "--out", "not writable"),
    case("out-read-only-parent", RUN + " --out {ws}/locked/run", "--out", "locked", "not writable"),
    case("edit-save-read-only-parent", "edit --model {model} --prompt the --target paris --set layers=[1] "
                                       "--save {ws}/locked/edit", "--save", "not writable"),
    case("report-out-read-only", "report {ws}/good_run --out {ws}/locked/table", "--out", "not writable"),
    case("stats-cache-read-only", "stats --model {model} --layers 1 --cache-dir {ws}/locked/stats", "--cache-dir",
         "not writable"),
    case("train-out-read-only", "train mend --model {model} --train-data {ws}/demo.json --val-data {ws}/demo.json "
                                "--out {ws}/locked/mend", "--out", "not writable"),
    case("trace-out-read-only", "trace --model {model} --data {ws}/cf.json --no-plots --out {ws}/locked/trace",
         "--out", "not writable"),
    case("reproduce-out-read-only", "reproduce wise-table --model {model} --data {ws}/demo.json "
                                    "--out {ws}/locked/table", "--out", "not writable"),
]


@pytest.fixture
def locked(workspace: Path) -> Path:
    folder = workspace / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@NOT_ROOT
@pytest.mark.parametrize("bad", READ_ONLY_CASES[:2])
def test_read_only_out_folder_for_real(bad: Case, workspace: Path, locked: Path, tiny_model_dir: Path) -> None:
    before = snapshot(workspace)
    result = invoke(bad.argv, bad.env, model=str(tiny_model_dir), ws=str(workspace))
    assert_one_error_line(result, bad.words)
    assert snapshot(workspace) == before


@pytest.mark.parametrize("bad", READ_ONLY_CASES)
def test_read_only_out_folder(bad: Case, workspace: Path, locked: Path, tiny_model_dir: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command that writes a folder checks it before loading the model (root is told "read-only" here)."""
    from lmedit.commands import common

    monkeypatch.setattr(common, "_writable", lambda folder: Path(folder).resolve() != locked.resolve())
    before = snapshot(workspace)
    result = invoke(bad.argv, bad.env, model=str(tiny_model_dir), ws=str(workspace))
    assert_one_error_line(result, bad.words)
    assert snapshot(workspace) == before


def _fake_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> tuple[Path, Any]:
    """A preset whose 'GGUF' is a small file, converted (by copying the tiny model) into $LMEDIT_HOME."""
    from lmedit import models

    gguf = tmp_path / "pkg" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really gguf")
    preset = models.ModelPreset("tiny-preset", "tiny-pkg", "tiny.gguf", "a tiny test preset", "none")
    monkeypatch.setitem(models.PRESETS, preset.name, preset)
    monkeypatch.setattr(models, "find_gguf", lambda p: gguf)
    monkeypatch.setattr(models, "_convert", lambda source, target: _copy_conversion(model_dir, source, target))
    return gguf, preset


def _copy_conversion(model_dir: Path, gguf: Path, target: Path) -> None:
    from lmedit.models import CONVERSION_MARKER

    shutil.copytree(model_dir, target)
    stat = gguf.stat()
    (target / CONVERSION_MARKER).write_text(json.dumps({"gguf_size": stat.st_size, "gguf_mtime_ns": stat.st_mtime_ns}))


def test_unwritable_home_before_conversion_names_lmedit_home(tmp_path: Path, tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_preset(tmp_path, monkeypatch, tiny_model_dir)
    home = tmp_path / "home"
    home.mkdir()

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setenv("LMEDIT_HOME", str(home))
    monkeypatch.setattr(Path, "mkdir", read_only)  # what a read-only home does to the first write
    result = CliRunner().invoke(app, ["run", "--model", "tiny-preset", "--out", str(tmp_path / "out")])
    line = assert_one_error_line(result, ("LMEDIT_HOME", str(home), "writable"))
    assert "Permission denied" in line
    assert not (tmp_path / "out").exists()


def test_read_only_home_after_conversion_still_loads(tmp_path: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a converted preset writes nothing: no lock file, no folder (a read-only home serves it)."""
    import filelock

    from lmedit.models import load_model

    _fake_preset(tmp_path, monkeypatch, tiny_model_dir)
    home = tmp_path / "home"
    monkeypatch.setenv("LMEDIT_HOME", str(home))
    load_model("tiny-preset")  # converts once
    before = snapshot(home)
    home.chmod(0o555)
    (home / "models").chmod(0o555)

    def no_lock(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("reading a converted model took the lock")

    monkeypatch.setattr(filelock, "FileLock", no_lock)
    try:
        model, tok = load_model("tiny-preset")
    finally:
        (home / "models").chmod(0o755)
        home.chmod(0o755)
    assert model.config.num_hidden_layers == 3 and tok.pad_token is not None
    assert snapshot(home) == before


def test_trust_remote_code_is_off_unless_asked(workspace: Path) -> None:
    """The folder's own code raises when run: refused by default, run (and so raising) only with the flag."""
    refused = CliRunner().invoke(app, ["run", "--model", str(workspace / "remote_code"), "--out", str(workspace / "o")])
    assert "--trust-remote-code" in assert_one_error_line(refused, ("ships its own python code",))
    ran = CliRunner().invoke(app, ["run", "--model", str(workspace / "remote_code"), "--trust-remote-code",
                                   "--out", str(workspace / "o")])
    assert "remote code ran" in (str(ran.exception) + ran.output)
    assert not (workspace / "o").exists()


# --------------------------------------------------------------------------- nothing is ever unpickled

UNPICKLING = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\bdill\b|\bjoblib\.load\(|allow_pickle\s*=\s*True|"
                        r"\bcloudpickle\b")


def test_nothing_in_the_package_unpickles() -> None:
    """Every tensor is read from safetensors; a torch.load must say weights_only=True (no code runs on load)."""
    source = Path(__file__).resolve().parents[1] / "src" / "lmedit"
    offenders = []
    for path in sorted(source.rglob("*.py")):
        text = path.read_text()
        offenders += [f"{path.name}: {m.group(0)}" for m in UNPICKLING.finditer(text)]
        for call in re.finditer(r"torch\.load\(", text):
            end = text.find(")", call.end())
            if "weights_only=True" not in text[call.end():end + 200].split("\n\n")[0]:
                offenders.append(f"{path.name}: torch.load without weights_only=True")
    assert not offenders, offenders


# --------------------------------------------------------------------------- saved edits and caches as untrusted input


@pytest.fixture(scope="module")
def word_tokenizer() -> Any:
    return build_word_tokenizer()


def _saved_ft_edit(folder: Path, tok: Any) -> None:
    """An FT-M edit of layer 1 of the seed-0 tiny Llama, saved to ``folder``."""
    from lmedit.registry import get_method
    from lmedit.requests import EditRequest

    model = build_tiny_llama(len(tok))
    info = get_method("FT-M")
    handle = info.apply(model, tok, [EditRequest("the capital of france is", "rome")],
                        info.load_hparams(overrides={"layers": [1], "num_steps": 2, "lr": 0.05}))
    handle.save(folder)


@pytest.fixture(scope="module")
def saved_edit(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "edit"
    _saved_ft_edit(folder, word_tokenizer)
    return folder


def _edit_meta(folder: Path, change: Any) -> None:
    meta = json.loads((folder / "edit.json").read_text())
    change(meta)
    (folder / "edit.json").write_text(json.dumps(meta))


def _rename_layer(meta: dict[str, Any]) -> None:
    meta["parameters"] = {k.replace("layers.1.", "layers.2."): v for k, v in meta["parameters"].items()}


def _wrong_shape(meta: dict[str, Any]) -> None:
    meta["parameters"] = {k: [v[0], v[1] + 1] for k, v in meta["parameters"].items()}


def _consistent_wrong_shape(folder: Path) -> None:
    """Tensors of another shape, with edit.json updated to match (its sha256 too): only the model can tell."""
    from safetensors.torch import save_file

    meta = json.loads((folder / "edit.json").read_text())
    tensors = {name: torch.zeros(shape[0], shape[1] + 1) for name, shape in meta["parameters"].items()}
    save_file(tensors, str(folder / "edit.safetensors"))
    meta["parameters"] = {k: list(v.shape) for k, v in tensors.items()}
    meta["files"] = {"edit.safetensors": hashlib.sha256((folder / "edit.safetensors").read_bytes()).hexdigest()}
    (folder / "edit.json").write_text(json.dumps(meta))


def _truncate(folder: Path) -> None:
    data = (folder / "edit.safetensors").read_bytes()
    (folder / "edit.safetensors").write_bytes(data[: len(data) // 2])


def _flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / "edit.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "edit.safetensors").write_bytes(bytes(data))


def _legacy_truncated(folder: Path) -> None:
    _edit_meta(folder, lambda meta: (meta.pop("files"), meta.pop("model")))
    _truncate(folder)


SAVED_EDIT_CASES = [
    pytest.param(_truncate, 0, 3, ("edit.safetensors", "changed after the edit was saved"), id="truncated-tensors"),
    pytest.param(_flip_a_byte, 0, 3, ("edit.safetensors", "sha256"), id="one-byte-changed"),
    pytest.param(_legacy_truncated, 0, 3, ("edit.safetensors", "damaged"), id="truncated-unrecorded"),
    pytest.param(lambda f: None, 1, 3, ("made on", "not on this model", "weights differ"), id="another-model"),
    pytest.param(lambda f: None, 0, 4, ("made on", "layers is 4"), id="another-architecture"),
    pytest.param(lambda f: _edit_meta(f, _rename_layer), 0, 3, ("does not hold what edit.json declares", "layers.2"),
                 id="json-names-another-layer"),
    pytest.param(lambda f: _edit_meta(f, _wrong_shape), 0, 3, ("does not hold what edit.json declares",),
                 id="json-shape-differs"),
    pytest.param(_consistent_wrong_shape, 0, 3, ("this model does not have",), id="tensor-shape-not-the-models"),
    pytest.param(lambda f: (f / "edit.json").write_text("{\"format\": "), 0, 3, ("not valid JSON",), id="json-corrupt"),
    pytest.param(lambda f: (f / "edit.json").write_text("[1]"), 0, 3, ("does not hold a saved lmedit edit",),
                 id="json-not-object"),
    pytest.param(lambda f: (f / "edit.json").unlink(), 0, 3, ("edit.json is missing",), id="json-missing"),
    pytest.param(lambda f: _edit_meta(f, lambda m: m.update(format="zip", method="ZAP")), 0, 3,
                 ("not an lmedit edit this version can read", "ZAP"), id="unknown-method"),
    pytest.param(lambda f: _edit_meta(f, lambda m: m.pop("method")), 0, 3, ("not a valid saved",), id="json-no-method"),
    pytest.param(lambda f: (f / "edit.safetensors").unlink(), 0, 3, ("edit.safetensors is missing",),
                 id="tensors-missing"),
]


@pytest.mark.parametrize(("damage", "seed", "layers", "words"), SAVED_EDIT_CASES)
def test_a_bad_saved_edit_is_refused_and_the_model_untouched(saved_edit: Path, tmp_path: Path, word_tokenizer: Any,
                                                            damage: Any, seed: int, layers: int,
                                                            words: tuple[str, ...]) -> None:
    from lmedit.handles import EditHandleError
    from lmedit.registry import load_edit

    folder = tmp_path / "edit"
    shutil.copytree(saved_edit, folder)
    damage(folder)
    model = build_tiny_llama(len(word_tokenizer), seed=seed, layers=layers)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EditHandleError) as caught:
        load_edit(model, folder)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), message
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_good_saved_edit_still_loads_and_records_its_model(saved_edit: Path, word_tokenizer: Any) -> None:
    from lmedit.registry import load_edit

    meta = json.loads((saved_edit / "edit.json").read_text())
    assert meta["model"]["layers"] == 3 and set(meta["files"]) == {"edit.safetensors"}
    model = build_tiny_llama(len(word_tokenizer))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    handle = load_edit(model, saved_edit)
    assert any(not torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    handle.restore()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_a_statistics_cache_entry_whose_bytes_changed_is_never_used(tmp_path: Path, word_tokenizer: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from lmedit.locate.stats import StatsConfig, clear_memory_cache, layer_stats

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(["the capital of france is paris"] * 8) for _ in range(6)))
    config = StatsConfig(corpus=str(corpus), n_samples=4, sample_length=24, batch_tokens=128)
    model = build_tiny_llama(len(word_tokenizer))
    clear_memory_cache()
    first = layer_stats(model, word_tokenizer, [1], config, progress=False, cache_dir=tmp_path / "stats")[1]
    data = bytearray(first.path.read_bytes())
    data[-1] ^= 0x01  # one flipped bit inside the matrix: still a readable safetensors file
    first.path.write_bytes(bytes(data))
    clear_memory_cache()
    again = layer_stats(model, word_tokenizer, [1], config, progress=False, cache_dir=tmp_path / "stats")[1]
    clear_memory_cache()
    assert again.source == "computed" and torch.equal(again.mom2, first.mom2)
    assert "bytes changed" in caplog.text
