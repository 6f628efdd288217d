"""The shared training loop: resume equals an uninterrupted run, the best checkpoint is kept, early stopping fires."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmedit.training import EditExample, Trainer, TrainerConfig, batch_indices, load_checkpoint
from lmedit.training.checkpoint import CheckpointError


def _examples(n: int) -> list[EditExample]:
    return [EditExample(str(i), "t", "r", "l", "a") for i in range(n)]


class ToyTask:
    """Linear regression; each EditExample's prompt indexes a fixed (x, y) pair."""

    method = "TOY"

    def __init__(self, scripted: list[float] | None = None) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.x = torch.randn(32, 4)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(32)
        self.scripted = list(scripted or [])
        self.weights_at_validation: list[dict[str, torch.Tensor]] = []

    def module(self) -> torch.nn.Module:
        return self.net

    def param_groups(self):
        return [{"params": list(self.net.parameters()), "lr": 0.05}]

    def checkpoint_config(self):
        return {"network": {"in": 4}}

    def checkpoint_tensors(self):
        return dict(self.net.state_dict())

    def train_step(self, batch, generator):
        idx = torch.tensor([int(e.prompt) for e in batch])
        noise = torch.randn(len(batch), generator=generator) * 0.01  # exercises the per-step generator
        dropped = torch.nn.functional.dropout(self.net(self.x[idx]).squeeze(-1), 0.1)  # and the seeded global RNG
        loss = ((dropped + noise - self.y[idx]) ** 2).mean()
        return loss, {"mse": float(loss.detach())}

    def validate(self, examples):
        self.weights_at_validation.append({k: v.clone() for k, v in self.net.state_dict().items()})
        with torch.no_grad():
            mse = float(((self.net(self.x).squeeze(-1) - self.y) ** 2).mean())
        score = self.scripted.pop(0) if self.scripted else -mse
        return {"score": score, "mse": mse}


def _config(**changes) -> TrainerConfig:
    base = dict(max_steps=20, batch_size=4, val_every=5, save_every=5, patience=100, seed=3)
    return TrainerConfig(**{**base, **changes})


def test_batches_are_a_pure_function_of_step_and_seed():
    first = [batch_indices(10, 4, step, 1) for step in range(6)]
    again = [batch_indices(10, 4, step, 1) for step in range(6)]
    assert first == again
    assert all(len(b) == 4 for b in first)
    assert sorted(first[0] + first[1]) != sorted(first[2] + first[3]) or first[0] != first[2]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    examples = _examples(32)
    straight = ToyTask()
    Trainer(_config(), show_progress=False).fit(straight, examples, examples[:8], tmp_path / "a")

    interrupted = ToyTask()

    def crash(step, _metrics):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(), show_progress=False).fit(interrupted, examples, examples[:8], tmp_path / "b", on_step=crash)
    saved = json.loads((tmp_path / "b" / "resume" / "state.json").read_text())
    assert saved["step"] == 10  # the last periodic save before the crash

    resumed = ToyTask()  # a fresh process: new module, state comes from disk
    result = Trainer(_config(), show_progress=False).fit(resumed, examples, examples[:8], tmp_path / "b")
    assert result.resumed_from == 10 and result.steps == 20 and result.status == "finished"
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    curve_a = json.loads((tmp_path / "a" / "training.json").read_text())["curve"]
    curve_b = json.loads((tmp_path / "b" / "training.json").read_text())["curve"]
    assert [c["mse"] for c in curve_a] == [c["mse"] for c in curve_b]


def test_time_budget_ends_a_call_and_the_next_call_continues(tmp_path):
    examples = _examples(32)
    first = Trainer(_config(max_minutes=1e-9), show_progress=False).fit(ToyTask(), examples, examples[:8], tmp_path)
    assert first.status == "time_budget" and first.steps == 0
    task = ToyTask()
    second = Trainer(_config(), show_progress=False).fit(task, examples, examples[:8], tmp_path)
    assert second.status == "finished" and second.steps == 20
    again = Trainer(_config(), show_progress=False).fit(ToyTask(), examples, examples[:8], tmp_path)
    assert again.status == "finished" and again.resumed_from == 20  # nothing left to do


def test_best_checkpoint_is_kept_not_the_last(tmp_path):
    examples = _examples(32)
    task = ToyTask(scripted=[0.1, 0.9, 0.5, 0.3])
    result = Trainer(_config(), show_progress=False).fit(task, examples, examples[:8], tmp_path)
    assert result.best_step == 10 and result.best_metric == 0.9
    tensors, config = load_checkpoint(tmp_path, "TOY", "lmedit train toy")
    for key, value in task.weights_at_validation[1].items():
        assert torch.equal(tensors[key], value)
    assert not torch.equal(tensors["weight"], task.net.weight)  # the model kept training after step 10
    assert config["training"]["step"] == 10 and config["network"] == {"in": 4}


def test_early_stopping_fires_after_patience(tmp_path):
    examples = _examples(32)
    task = ToyTask(scripted=[0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    result = Trainer(_config(max_steps=100, patience=2), show_progress=False).fit(task, examples, examples[:8], tmp_path)
    assert result.status == "stopped_early"
    assert result.steps == 15 and result.best_step == 5
    again = Trainer(_config(max_steps=100, patience=2), show_progress=False).fit(ToyTask(), examples, examples[:8], tmp_path)
    assert again.status == "stopped_early" and again.steps == 15


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    examples = _examples(32)
    Trainer(_config(max_steps=5), show_progress=False).fit(ToyTask(), examples, examples[:8], tmp_path)
    with pytest.raises(CheckpointError, match="different training run"):
        Trainer(_config(max_steps=5, batch_size=2), show_progress=False).fit(ToyTask(), examples, examples[:8], tmp_path)


def test_missing_checkpoint_names_the_training_command(tmp_path):
    with pytest.raises(CheckpointError, match="lmedit train toy"):
        load_checkpoint(tmp_path / "nothing", "TOY", "lmedit train toy")


def test_checkpoints_hold_no_pickle(tmp_path):
    examples = _examples(32)
    Trainer(_config(max_steps=5), show_progress=False).fit(ToyTask(), examples, examples[:8], tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    # .lmedit.lock: the empty OS lock file that keeps a second writer out (see lmedit.safe_files)
    assert files == [".lmedit.lock", "config.json", "model.safetensors", "state.json", "state.safetensors",
                     "training.json"]
    assert "optimizer.0.exp_avg" in load_file(str(tmp_path / "resume" / "state.safetensors"))
