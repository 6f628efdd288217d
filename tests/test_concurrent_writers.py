"""Two processes writing the same run folder, training folder or statistics cache entry (issue 15).

A run or training folder is held by one process for the whole command: a
second ``lmedit run`` into it stops at once with one line naming the holder's
pid, and writes nothing. Two computations of the same statistics take turns on
the cache folder's lock: one computes, the other waits and then loads the entry
the first one wrote, so there is one correct entry. A lock whose process was
killed never blocks the next command (the OS drops it with the process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build_tiny_llama, build_word_tokenizer
from lmedit.safe_files import FolderBusy, hold_folder

HOLDER = """
import sys
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""
FOLDER_HOLDER = """
import sys
from lmedit.safe_files import hold_folder
with hold_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LMEDIT_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _holder(script: str, target: Path) -> subprocess.Popen:
    """A small process that holds ``target`` until its stdin closes (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from lmedit.smoke import write_corpus, write_edit_file

    root = tmp_path_factory.mktemp("writers")
    tok = build_word_tokenizer()
    build_tiny_llama(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_edit_file(tok, root, "edits.json", 4)
    write_corpus(tok, root, documents=400, length=60)
    return root


def test_a_second_run_into_a_held_folder_stops_at_once_with_one_line(tiny_folder, tmp_path):
    out = tmp_path / "run"
    with hold_folder(out):  # this test process is "the other lmedit process"
        before = sorted(p.name for p in out.iterdir())
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lmedit.cli", "run", "--method", "FT-M",
                               "--model", str(tiny_folder / "model"), "--data", str(tiny_folder / "edits.json"),
                               "--no-progress", "--set", "layers=[2]", "--out", str(out)],
                              env=_env(tmp_path), capture_output=True, text=True, timeout=120)
        seconds = time.perf_counter() - started
        assert sorted(p.name for p in out.iterdir()) == before, "the second run wrote into the held folder"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == (f"error: run folder {out} is in use by another lmedit process (pid {os.getpid()}); "
                        "wait for it or choose another --out")
    assert "loading" not in done.stdout  # stopped before the model loaded
    assert seconds < 60


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    folder = tmp_path / "run"
    holder = _holder(FOLDER_HOLDER, folder)
    with pytest.raises(FolderBusy, match=rf"in use by another lmedit process \(pid {holder.pid}\)"):
        with hold_folder(folder):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with hold_folder(folder) as held:  # at once: the OS released the dead process's lock
        assert held == folder


class _Task:
    """The smallest training task: one linear layer fitted to zero."""

    method = "TOY"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Linear(2, 1)

    def module(self) -> torch.nn.Module:
        return self.net

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.net.parameters()), "lr": 1e-2}]

    def checkpoint_config(self) -> dict[str, Any]:
        return {}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def train_step(self, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self.net(torch.ones(1, 2)).pow(2).sum(), {}

    def validate(self, examples: Any) -> dict[str, float]:
        with torch.no_grad():
            return {"score": -float(self.net(torch.ones(1, 2)).pow(2).sum())}


def test_a_second_training_into_a_held_folder_stops_with_the_holders_pid(tmp_path):
    from lmedit.training import Trainer, TrainerConfig

    folder = tmp_path / "train"
    holder = _holder(FOLDER_HOLDER, folder)
    try:
        trainer = Trainer(TrainerConfig(max_steps=2, batch_size=1, val_every=1, val_examples=1), show_progress=False)
        with pytest.raises(FolderBusy, match=rf"training folder .* in use by another lmedit process \(pid {holder.pid}\)"):
            trainer.fit(_Task(), [None], [None], folder)
        assert not (folder / "resume").exists()
    finally:
        holder.communicate("")
    result = Trainer(TrainerConfig(max_steps=2, batch_size=1, val_every=1, val_examples=1),
                     show_progress=False).fit(_Task(), [None], [None], folder)
    assert result.status == "finished" and result.steps == 2


def test_two_computations_of_one_statistics_entry_give_one_correct_entry(tiny_folder, tmp_path):
    """Both ``lmedit stats`` start while a third process holds the cache lock, so both must wait for it; when it
    is killed, one computes and the other loads what it wrote."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmedit.locate.stats import StatsConfig, clear_memory_cache, layer_stats, model_fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_folder / "model")
    tok = AutoTokenizer.from_pretrained(tiny_folder / "model")
    cache = tmp_path / "cache"
    folder = cache / model_fingerprint(model)[:16]
    folder.mkdir(parents=True)
    blocker = _holder(HOLDER, folder / ".lock")
    argv = [sys.executable, "-m", "lmedit.cli", "stats", "--model", str(tiny_folder / "model"), "--layers", "1-2",
            "--corpus", str(tiny_folder / "smoke-corpus.txt"), "--n-samples", "400", "--sample-length", "60",
            "--no-progress", "--cache-dir", str(cache)]
    logs = [tmp_path / f"stats{i}.err" for i in range(2)]
    procs = [subprocess.Popen(argv, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
             for log in logs]
    deadline = time.monotonic() + 120
    while not all("waiting" in log.read_text() for log in logs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [l.read_text() for l in logs]
        time.sleep(0.1)
    blocker.send_signal(signal.SIGKILL)  # a killed holder: its lock must not block them
    blocker.wait()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log.read_text() for log in logs]
    sources = sorted(" ".join(o.split()).count("computed") for o in outputs)
    assert sources[0] == 0 and sources[1] >= 2, outputs  # one process computed both layers, the other loaded them

    names = sorted(p.name for p in folder.iterdir() if p.name != ".lock")
    assert len(names) == 4 and all(n.endswith((".safetensors", ".json")) for n in names), names
    expected = layer_stats(model, tok, [1, 2], StatsConfig(corpus=str(tiny_folder / "smoke-corpus.txt"),
                                                            n_samples=400, sample_length=60),
                           progress=False, cache_dir=tmp_path / "fresh")
    clear_memory_cache()  # read the shared cache from disk, not this process's copy of `expected`
    found = layer_stats(model, tok, [1, 2], StatsConfig(corpus=str(tiny_folder / "smoke-corpus.txt"),
                                                         n_samples=400, sample_length=60),
                        progress=False, cache_dir=cache)
    for layer in (1, 2):
        assert found[layer].source == "disk"
        # this process's thread count may order float64 sums differently: equal to rounding, not bit for bit
        torch.testing.assert_close(found[layer].mom2, expected[layer].mom2, rtol=1e-9, atol=0)
        assert json.loads(found[layer].path.with_suffix(".json").read_text())["tokens"] == expected[layer].tokens
