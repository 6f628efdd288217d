"""``lmedit train mend``: trains a tiny saved model from CounterFact-style files, resumes, and feeds ``lmedit run``."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from conftest import build_tiny_llama, build_word_tokenizer
from lmedit.cli import app

runner = CliRunner()

SUBJECTS = "france italy germany london paris rome berlin madrid hamlet tolstoy".split()
TARGETS = "piano violin guitar football tennis red blue green king queen".split()


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def tiny_folder(tmp_path):
    tok = build_word_tokenizer()
    folder = tmp_path / "tiny-llama"
    build_tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write_counterfact(path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        s, o = rng.choice(SUBJECTS), rng.choice(SUBJECTS)
        records.append({"case_id": i, "prompt": f"the capital of {s} is", "target_new": rng.choice(TARGETS),
                        "subject": s, "ground_truth": "paris", "rephrase_prompt": f"where is the capital of {s}",
                        "locality_prompt": f"the mother tongue of {o} is", "locality_ground_truth": rng.choice(TARGETS)})
    path.write_text(json.dumps(records))


@pytest.fixture
def data(tmp_path):
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    _write_counterfact(train, 40, 0)
    _write_counterfact(val, 8, 1)
    return train, val


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))


COMMON = ["--set", "layers=[1,2]", "--set", "rank=8", "--set", "batch_size=4", "--set", "val_every=2",
          "--set", "val_examples=8", "--set", "edit_lr=0.01", "--no-progress"]


def test_train_mend_resumes_and_its_checkpoint_edits(tiny_folder, data, tmp_path):
    train, val = data
    base = ["train", "mend", "--model", str(tiny_folder), "--train-data", str(train), "--val-data", str(val)]
    first = runner.invoke(app, base + COMMON + ["--set", "max_steps=2"])
    assert first.exit_code == 0, first.output
    default = tmp_path / "home" / "checkpoints" / "MEND" / tiny_folder.as_posix().strip("/").replace("/", "--")
    assert (default / "model.safetensors").is_file() and (default / "config.json").is_file()
    assert "finished after 2 steps" in _flat(first.output)

    second = runner.invoke(app, base + COMMON + ["--set", "max_steps=4"])
    assert second.exit_code == 0, second.output
    state = json.loads((default / "resume" / "state.json").read_text())
    assert state["step"] == 4 and [c["step"] for c in state["curve"]] == [2, 4]

    run = runner.invoke(app, ["run", "--method", "MEND", "--model", str(tiny_folder), "--data", str(val),
                              "--set", f"archive={default}", "--out", str(tmp_path / "run"), "--no-progress"])
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n"] == 8 and "rewrite_acc" in summary["post"]


def test_other_settings_in_the_same_folder_exit_with_a_message(tiny_folder, data, tmp_path):
    train, val = data
    base = ["train", "mend", "--model", str(tiny_folder), "--train-data", str(train), "--val-data", str(val),
            "--out", str(tmp_path / "ckpt")]
    assert runner.invoke(app, base + COMMON + ["--set", "max_steps=2"]).exit_code == 0
    again = runner.invoke(app, base + COMMON + ["--set", "max_steps=2", "--set", "rank=4"])
    assert again.exit_code == 2 and "different training run" in _flat(again.output)


def test_missing_data_and_unknown_settings_are_refused(tiny_folder, tmp_path):
    missing = runner.invoke(app, ["train", "serac", "--model", str(tiny_folder), "--train-data", str(tmp_path / "x.json")])
    assert missing.exit_code == 2 and "does not exist" in _flat(missing.output)
    train = tmp_path / "t.json"
    _write_counterfact(train, 4, 0)
    unknown = runner.invoke(app, ["train", "mend", "--model", str(tiny_folder), "--train-data", str(train),
                                  "--val-data", str(train), "--set", "rnak=4"])
    assert unknown.exit_code == 2 and "did you mean 'rank'" in _flat(unknown.output)


def test_a_method_without_networks_is_refused_by_name():
    result = runner.invoke(app, ["train", "rome"])
    assert result.exit_code == 2
    assert "ROME has no networks to train; trainable: MALMEN, MEND, SERAC" in " ".join(result.output.split())


def test_every_sub_command_is_registered_before_main():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lmedit.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("run", "edit", "report", "stats", "trace", "train", "reproduce", "methods", "models"):
        assert f" {command} " in out, command
