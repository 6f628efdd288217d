"""Kill safety, proved: ``lmedit run``, ``lmedit stats`` and ``lmedit train`` SIGKILLed at random moments end
with exactly what an uninterrupted command writes (issue 15).

Each scenario runs the real command line in subprocesses on a tiny random Llama
saved to a temporary folder. It first runs the command once, uninterrupted, to
get the reference output and the command's duration D; then it starts the same
command again and again into a second folder, killing it (SIGKILL) after a
seeded uniform delay in [0.2 s, D], until it has been killed the wanted number
of times. A start that finishes before its kill is compared with the reference
and its folder cleared, so later kills land mid-work again. Finally the command
runs to its end and its output must equal the reference:

* run: every line of ``results.jsonl`` a whole JSON record, request indices
  0..n-1 once each, records equal after dropping the timing fields
  (:data:`RECORD_TIMINGS`), ``summary.json`` equal without its ``timing`` and ``memory``,
  ``config.json`` equal;
* stats: the cache entries hold bit-identical tensors and the same metadata
  (safetensors writes its metadata in no fixed order, so the files' bytes and
  hence their sha256 may differ), each sidecar's sha256 matches its entry, the
  sidecars are equal without ``compute_seconds``, ``created`` and ``sha256``,
  and no partial or temp file is left;
* train: the kept checkpoint (``model.safetensors``) byte-identical and
  ``config.json`` equal, the resume tensors (network and Adam state) equal,
  the resume state and validation curve equal without their ``seconds``.

Start-up (importing torch) is most of a command's time on a small machine, so
the four scenarios run two at a time; the whole file takes about a minute or two.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from safetensors.torch import load_file

from conftest import build_tiny_llama, build_word_tokenizer

SEED = 15
RUN_KILLS = 10  # per run protocol (single, sequential): 20 kills of `lmedit run`
STATS_KILLS = 3
TRAIN_KILLS = 3
N_REQUESTS = 16
RECORD_TIMINGS = ("edit_seconds", "step_seconds", "eval_seconds")  # top-level record fields that are wall times
EDIT_INFO_TIMINGS = ("seconds",)  # the method's own timing inside edit_info
SIDECAR_TIMINGS = ("compute_seconds", "created")


# --------------------------------------------------------------------------- the workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny model folder, edit files and a word corpus; LMEDIT_HOME inside it."""
    from lmedit.smoke import write_corpus, write_edit_file

    root = tmp_path_factory.mktemp("kill")
    tok = build_word_tokenizer()
    build_tiny_llama(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_edit_file(tok, root, "edits.json", N_REQUESTS)
    write_edit_file(tok, root, "train.json", 64, seed=2)
    write_edit_file(tok, root, "val.json", 8, seed=3)
    write_corpus(tok, root / "corpus", documents=2000, length=60)
    return root


def _env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LMEDIT_HOME=str(workspace / "home"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", LMEDIT_STATS_CHECKPOINT_SECONDS="0")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmedit.cli", *args]


# --------------------------------------------------------------------------- what a kill can leave, in-process


def _records(path: Path) -> list[dict[str, Any]]:
    return [_without_timings(json.loads(line)) for line in path.read_text().splitlines()]


def test_a_chunk_whose_records_were_cut_off_runs_again_and_is_recorded_once(tiny_llama, word_tok, tmp_path):
    """A kill while a chunk's records were appended leaves some of them and half a line: the chunk runs again."""
    from lmedit.editor import Editor
    from lmedit.smoke import edit_records
    from lmedit.data import load_requests

    (tmp_path / "edits.json").write_text(json.dumps(edit_records(word_tok, 5)))
    requests = load_requests(tmp_path / "edits.json")
    editor = Editor(tiny_llama, word_tok, "FT-M", overrides={"layers": [1], "lr": 5e-2, "num_steps": 5})
    editor.run(requests, protocol="sequential", T=2, out_dir=tmp_path / "ref", show_progress=False)
    reference = _records(tmp_path / "ref" / "results.jsonl")
    lines = (tmp_path / "ref" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["chunk"] for line in lines] == [0, 0, 1, 1, 2]

    out = tmp_path / "killed"
    editor.run(requests, protocol="sequential", T=2, out_dir=out, show_progress=False)
    # chunk 0 whole, chunk 1 cut after its first record and in the middle of its second
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    (out / ".tmp-summary.json.abc").write_text("{")  # a temp file of a write the kill interrupted
    summary, _ = editor.run(requests, protocol="sequential", T=2, out_dir=out, show_progress=False)
    assert _records(out / "results.jsonl") == reference  # each request once, chunk 1 redone whole
    assert summary["complete"] and summary["n"] == 5
    assert not list(out.glob(".tmp-*"))


def test_a_damaged_config_is_one_clear_error(tiny_llama, word_tok, tmp_path):
    from lmedit.editor import Editor
    from lmedit.requests import EditRequest
    from lmedit.runner import RunError

    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text('{"method": "FT')
    editor = Editor(tiny_llama, word_tok, "FT-M", overrides={"layers": [1], "num_steps": 1})
    with pytest.raises(RunError, match="config.json is damaged .*delete the run folder"):
        editor.run([EditRequest("the sky is", "red")], out_dir=out, show_progress=False)


def test_a_checkpoint_whose_weights_and_config_disagree_is_refused(tmp_path):
    """A kill between the two files of a kept checkpoint (or a changed file) is caught on load."""
    import torch

    from lmedit.training import CheckpointError, load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, {"w": torch.zeros(2)}, {"method": "TOY"})
    assert load_checkpoint(tmp_path, "TOY", "lmedit train toy")[0]["w"].shape == (2,)
    config = json.loads((tmp_path / "config.json").read_text())
    save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"method": "TOY"})
    (tmp_path / "config.json").write_text(json.dumps(config))  # the older config beside newer weights
    with pytest.raises(CheckpointError, match="does not match .*run `lmedit train toy` again"):
        load_checkpoint(tmp_path, "TOY", "lmedit train toy")


def test_the_statistics_checkpoint_interval_is_checked(monkeypatch, tiny_llama, word_tok, tmp_path):
    from lmedit.locate.stats import StatsConfig, StatsError, layer_stats

    monkeypatch.setenv("LMEDIT_STATS_CHECKPOINT_SECONDS", "soon")
    with pytest.raises(StatsError, match="LMEDIT_STATS_CHECKPOINT_SECONDS='soon' is not a number"):
        layer_stats(tiny_llama, word_tok, [1], StatsConfig(corpus=str(tmp_path)), cache_dir=tmp_path)


# --------------------------------------------------------------------------- killing


@dataclass
class KillLog:
    """What happened to one scenario: kills, starts that finished first, durations."""

    name: str
    duration: float = 0.0
    kills: int = 0
    finished_early: int = 0
    delays: list[float] = field(default_factory=list)
    kills_mid_work: int = 0  # kills after the command had written some of its output
    seconds: float = 0.0


def _run_to_end(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return time.perf_counter() - started


def kill_and_resume(name: str, argv: list[str], env: dict[str, str], cwd: Path, kills: int,
                    compare: Callable[[], None], clear: Callable[[], None], progress: Callable[[], bool],
                    duration: float) -> KillLog:
    """Start ``argv`` and SIGKILL it after a seeded delay in [0.2 s, duration], ``kills`` times, resuming each
    time; ``compare`` checks a finished output, ``clear`` removes it, ``progress`` says whether any output exists."""
    log = KillLog(name, duration=duration)
    rng = random.Random(f"{SEED}-{name}")
    started = time.perf_counter()
    stderr_path = cwd / f"{name}.stderr"
    while log.kills < kills:
        delay = rng.uniform(0.2, max(duration, 0.3))
        with stderr_path.open("w") as stderr:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                code = proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                log.kills += 1
                log.delays.append(round(delay, 2))
                log.kills_mid_work += progress()
                continue
        assert code == 0, f"a resumed {name} failed:\n{stderr_path.read_text()[-3000:]}"
        log.finished_early += 1
        compare()
        clear()
    _run_to_end(argv, env, cwd)
    compare()
    log.seconds = time.perf_counter() - started
    return log


# --------------------------------------------------------------------------- lmedit run


def _lines(path: Path) -> list[dict[str, Any]]:
    """Every line of results.jsonl as a record: a torn or non-JSON line fails here."""
    text = path.read_text()
    assert text.endswith("\n"), f"{path} ends in a torn line"
    return [json.loads(line) for line in text.splitlines()]


def _without_timings(record: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in record.items() if k not in RECORD_TIMINGS}
    kept["edit_info"] = {k: v for k, v in record.get("edit_info", {}).items() if k not in EDIT_INFO_TIMINGS}
    return kept


def _run_output(folder: Path) -> dict[str, Any]:
    records = _lines(folder / "results.jsonl")
    assert [r["index"] for r in records] == list(range(N_REQUESTS)), "a request is doubled, lost or out of order"
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("timing")
    assert summary.pop("memory")["cpu_peak_rss_bytes"] > 0  # like timing, a measurement of the process that wrote it
    assert summary["complete"] is True
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, f"temp files left behind: {leftovers}"
    return {"records": [_without_timings(r) for r in records], "summary": summary,
            "config": json.loads((folder / "config.json").read_text())}


def _run_scenario(workspace: Path, protocol: list[str], name: str) -> KillLog:
    env = _env(workspace)
    common = ["run", "--method", "FT-M", "--model", str(workspace / "model"), "--data", str(workspace / "edits.json"),
              "--no-progress", "--set", "layers=[2]", "--set", "lr=0.05", "--set", "num_steps=80", *protocol]
    reference_dir, killed_dir = workspace / f"ref-{name}", workspace / f"kill-{name}"
    duration = _run_to_end(_cli(*common, "--out", str(reference_dir)), env, workspace)
    reference = _run_output(reference_dir)

    def compare() -> None:
        assert _run_output(killed_dir) == reference

    def clear() -> None:
        import shutil

        shutil.rmtree(killed_dir)

    def progress() -> bool:
        results = killed_dir / "results.jsonl"
        return results.is_file() and results.stat().st_size > 0

    return kill_and_resume(name, _cli(*common, "--out", str(killed_dir)), env, workspace, RUN_KILLS,
                           compare, clear, progress, duration)


# --------------------------------------------------------------------------- lmedit stats


def _stats_output(cache: Path) -> dict[str, Any]:
    """The cache entries as tensors and metadata (safetensors orders its metadata at random, so files holding
    the same numbers need not be byte-identical), and their sidecars without timings."""
    from safetensors import safe_open

    files = sorted(p for p in cache.rglob("*") if p.is_file() and p.name not in (".lock",))
    names = [p.name for p in files]
    assert not [n for n in names if n.startswith(("partial.", ".tmp-"))], f"leftovers in the cache: {names}"
    entries, sidecars = {}, {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                entries[path.name] = {"metadata": handle.metadata(),
                                      "mom2": handle.get_tensor("mom2").numpy().tobytes()}
        elif path.suffix == ".json":
            sidecar = json.loads(path.read_text())
            assert sidecar.pop("sha256") == hashlib.sha256(path.with_suffix(".safetensors").read_bytes()).hexdigest()
            sidecars[path.name] = {k: v for k, v in sidecar.items() if k not in SIDECAR_TIMINGS}
    assert len(entries) == 3 and len(sidecars) == 3, names
    return {"entries": entries, "sidecars": sidecars}


def _stats_scenario(workspace: Path) -> KillLog:
    env = _env(workspace)
    common = ["stats", "--model", str(workspace / "model"), "--layers", "0-2",
              "--corpus", str(workspace / "corpus" / "smoke-corpus.txt"), "--n-samples", "2000",
              "--sample-length", "60", "--batch-tokens", "600", "--no-progress"]
    reference_dir, killed_dir = workspace / "stats-ref", workspace / "stats-kill"
    duration = _run_to_end(_cli(*common, "--cache-dir", str(reference_dir)), env, workspace)
    reference = _stats_output(reference_dir)

    def compare() -> None:
        assert _stats_output(killed_dir) == reference

    def clear() -> None:
        import shutil

        shutil.rmtree(killed_dir)

    def progress() -> bool:
        return any(killed_dir.rglob("partial.*"))

    return kill_and_resume("stats", _cli(*common, "--cache-dir", str(killed_dir)), env, workspace, STATS_KILLS,
                           compare, clear, progress, duration)


# --------------------------------------------------------------------------- lmedit train


def _train_output(folder: Path) -> dict[str, Any]:
    state = load_file(str(folder / "resume" / "state.safetensors"))
    saved = json.loads((folder / "resume" / "state.json").read_text())
    curve = [{k: v for k, v in row.items() if k != "seconds"} for row in saved.pop("curve")]
    saved.pop("seconds")
    return {"weights": (folder / "model.safetensors").read_bytes(),
            "config": json.loads((folder / "config.json").read_text()),
            "state": {k: v.tolist() for k, v in state.items()}, "saved": saved, "curve": curve}


def _train_scenario(workspace: Path) -> KillLog:
    env = _env(workspace)
    common = ["train", "mend", "--model", str(workspace / "model"), "--train-data", str(workspace / "train.json"),
              "--val-data", str(workspace / "val.json"), "--no-progress", "--set", "layers=[1,2]", "--set", "rank=8",
              "--set", "batch_size=4", "--set", "max_steps=40", "--set", "val_every=10", "--set", "save_every=3",
              "--set", "val_examples=8", "--set", "patience=10", "--set", "edit_lr=0.01"]
    reference_dir, killed_dir = workspace / "train-ref", workspace / "train-kill"
    duration = _run_to_end(_cli(*common, "--out", str(reference_dir)), env, workspace)
    reference = _train_output(reference_dir)

    def compare() -> None:
        assert _train_output(killed_dir) == reference

    def clear() -> None:
        import shutil

        shutil.rmtree(killed_dir)

    def progress() -> bool:
        return (killed_dir / "resume" / "state.safetensors").is_file()

    return kill_and_resume("train", _cli(*common, "--out", str(killed_dir)), env, workspace, TRAIN_KILLS,
                           compare, clear, progress, duration)


# --------------------------------------------------------------------------- the scenarios, two at a time


@pytest.fixture(scope="module")
def kill_logs(workspace) -> dict[str, KillLog]:
    scenarios = {  # the two longest first: the pool hands the shorter ones to whichever worker frees first
        "run-sequential": lambda: _run_scenario(workspace, ["--protocol", "sequential", "--T", "4"], "sequential"),
        "run-single": lambda: _run_scenario(workspace, ["--protocol", "single"], "single"),
        "train": lambda: _train_scenario(workspace),
        "stats": lambda: _stats_scenario(workspace),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(scenario) for name, scenario in scenarios.items()}
        logs = {name: future.result() for name, future in futures.items()}
    for log in logs.values():
        print(f"\n{log.name}: {log.kills} kills ({log.kills_mid_work} after output began), "
              f"{log.finished_early} finished before their kill, D={log.duration:.1f} s, "
              f"{log.seconds:.1f} s of kills and resumes; delays {log.delays}")
    return logs


@pytest.mark.parametrize("scenario", ["run-single", "run-sequential"])
def test_killed_runs_resume_to_the_uninterrupted_results(kill_logs, scenario):
    assert kill_logs[scenario].kills == RUN_KILLS


def test_killed_statistics_resume_to_the_uninterrupted_cache_entry(kill_logs):
    assert kill_logs["stats"].kills == STATS_KILLS


def test_killed_training_resumes_to_the_uninterrupted_checkpoint(kill_logs):
    assert kill_logs["train"].kills == TRAIN_KILLS


def test_at_least_twenty_kills_of_lmedit_run(kill_logs):
    assert kill_logs["run-single"].kills + kill_logs["run-sequential"].kills >= 20
