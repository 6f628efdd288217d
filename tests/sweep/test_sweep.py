"""Sweeps: the grid checked before any work, run serially or as Ray chunks into the same run folders."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmedit.cli import app
from lmedit.sweep.plan import SweepError, expand, read_sweep

WORDS = "france italy germany london paris berlin".split()


from conftest import require_ray as _ray


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A tiny model folder, a data file and a sweep file: FT-M and GRACE × T=1, 2 over 4 requests."""
    from conftest import build_tiny_llama, build_word_tokenizer
    from lmedit.registry import get_method

    root = tmp_path_factory.mktemp("grid")
    tok = build_word_tokenizer()
    model = build_tiny_llama(len(tok))
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    data = root / "cf.json"
    data.write_text(json.dumps([
        {"case_id": i, "prompt": f"the capital of {w} is", "target_new": "rome", "ground_truth": "paris", "subject": w,
         "locality_prompt": "the sky color is", "locality_ground_truth": "blue"} for i, w in enumerate(WORDS)]))
    overrides = {m: get_method(m).tiny_setup(model, tok, root / m) for m in ("FT-M", "GRACE")}
    sweep = {"model": str(root / "tiny"), "data": {"path": str(data), "limit": 4}, "protocol": "sequential",
             "T": [1, 2], "methods": [{"name": m, "set": o} for m, o in overrides.items()]}
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _comparable(summary: dict) -> dict:
    """A summary without what measures the process that wrote it (seconds, peak memory)."""
    return {k: v for k, v in summary.items() if k not in ("timing", "memory")}


def test_the_grid_expands_in_a_fixed_order(grid):
    jobs = expand(read_sweep(grid))
    assert [(j.method, j.T) for j in jobs] == [("FT-M", 1), ("FT-M", 2), ("GRACE", 1), ("GRACE", 2)]
    assert len({j.name for j in jobs}) == 4 and all(j.limit == 4 for j in jobs)
    assert all(j.suites == () for j in jobs)
    raw = {**yaml.safe_load(grid.read_text()), "suites": ["fluency:max_new_tokens=5"]}
    with_suite = expand(raw)[0]
    assert with_suite.suites == ("fluency:max_new_tokens=5",)
    assert type(with_suite).from_dict(json.loads(json.dumps(with_suite.to_dict()))) == with_suite  # a JSON round trip


@pytest.mark.parametrize("change, message", [
    ({"methods": ["NOPE"]}, "NOPE"),
    ({"methods": [{"name": "FT-M", "preset": "nope"}]}, "no preset 'nope'"),
    ({"methods": [{"name": "FT-M", "set": {"not_a_setting": 1}}]}, "not_a_setting"),
    ({"methods": [{"name": "FT-M", "colour": 1}]}, "colour"),
    ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
    ({"data": "/no/such/file.json"}, "/no/such/file.json"),
    ({"protocol": "parallel"}, "unknown protocol 'parallel'"),
    ({"eval_mode": "vibes"}, "unknown eval mode 'vibes'"),
    ({"suites": ["fluencyy"]}, "suites: .*fluencyy"),
    ({"Tee": [1]}, "unknown key(s) Tee"),
    ({"methods": ["FT-M", "FT-M"]}, "share the run folder"),
])
def test_bad_sweep_files_are_named_before_any_work(grid, tmp_path, change, message):
    raw = {**yaml.safe_load(grid.read_text()), **change}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand(read_sweep(bad))
    result = CliRunner().invoke(app, ["sweep", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and not (tmp_path / "out").exists(), result.output


def test_an_unreachable_address_fails_within_seconds(grid, tmp_path):
    _ray()
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["sweep", str(grid), "--engine", "ray", "--address", "127.0.0.1:9",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "cannot reach the Ray cluster at 127.0.0.1:9" in result.output, result.output
    assert time.perf_counter() - started < 10


@pytest.fixture(scope="module")
def serial(grid, tmp_path_factory):
    from lmedit.sweep.engine import run_serial

    root = tmp_path_factory.mktemp("serial")
    return root, run_serial(expand(read_sweep(grid)), root, show_progress=False)


def test_serial_sweep_writes_run_folders_and_the_sweep_table(serial):
    root, summaries = serial
    assert len(summaries) == 4 and all(s["complete"] for s in summaries.values())
    config = json.loads((root / next(iter(summaries)) / "config.json").read_text())
    assert config["method"] == "FT-M" and config["T"] == 1 and config["n_requests"] == 4
    result = CliRunner().invoke(app, ["report", "--sweep", str(root)])
    assert result.exit_code == 0 and "4 of 4 jobs complete; 12 of 12 chunks written" in result.output, result.output


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sweeps"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_sweep_file_expands(path, monkeypatch):
    """The files the docs tell users to run are checked like any sweep file, from the checkout's root."""
    monkeypatch.chdir(EXAMPLES.parents[1])
    if not (EXAMPLES.parents[2] / "shared" / "data").is_dir():
        pytest.skip("the shared benchmark files (../shared/data) are not next to this checkout")
    assert expand(read_sweep(path), check_models=False)


def test_the_sweep_table_tells_jobs_on_different_data_apart(tmp_path):
    from lmedit.sweep.status import sweep_rows, sweep_table

    jobs = [{"name": f"ROME-{stem}", "label": "ROME-base", "method": "ROME", "model": "tiny", "data": f"d/{stem}.json",
             "offset": offset, "limit": 20, "protocol": "single", "T": None, "seed": 0, "eval_mode": "teacher",
             "chunks": 20} for stem, offset in (("zsre", 1000), ("counterfact", 0))]
    (tmp_path / "sweep.json").write_text(json.dumps({"jobs": jobs}))
    table = sweep_table(sweep_rows(tmp_path))
    assert "| ROME-base | tiny | zsre.json[1000:1020] | single |" in table
    assert "| ROME-base | tiny | counterfact.json[0:20] | single |" in table
    assert "0 of 2 jobs complete; 0 of 40 chunks written" in table


@pytest.fixture(scope="module")
def local_ray():
    ray = _ray()
    from lmedit.sweep.engine import start_ray

    start_ray(2, None)
    yield ray
    ray.shutdown()


def test_local_workers_run_at_the_drivers_niceness(local_ray):
    """Ray's default (15) starved the workers beside busy processes: one FT-M edit took 86 s instead of 3.8 s."""

    @local_ray.remote
    def niceness() -> int:
        return os.nice(0)

    assert local_ray.get(niceness.remote()) == os.nice(0)


def test_ray_sweep_on_two_workers_equals_the_serial_run(grid, serial, local_ray, tmp_path):
    from lmedit.sweep.engine import run_ray

    root, expected = serial
    got = run_ray(expand(read_sweep(grid)), tmp_path / "ray", workers=2, show_progress=False)
    assert got.keys() == expected.keys()
    for name in expected:
        assert _comparable(got[name]) == _comparable(expected[name]), name
        config = json.loads((tmp_path / "ray" / name / "config.json").read_text())
        assert config["n_requests"] == 4
        session = json.loads((tmp_path / "ray" / name / "sessions.jsonl").read_text())
        assert session["environment"]["engine"] == "ray" and session["environment"]["workers"] == "2"
        assert config["environment"] == session["environment"]  # the workers' threads, not the driver's


def test_a_killed_worker_costs_a_retry_not_a_chunk(grid, serial, local_ray, tmp_path):
    from lmedit.sweep.engine import run_ray

    _, expected = serial
    seen: list[int] = []
    killed: list[int] = []

    def kill_once(job, chunk, result):
        """Once both workers have reported, kill the one that did not just report: it is running a chunk."""
        if result["pid"] not in seen:
            seen.append(result["pid"])
        if not killed and len(seen) == 2:
            busy = next(pid for pid in seen if pid != result["pid"])
            killed.append(busy)
            os.kill(busy, signal.SIGKILL)

    got = run_ray(expand(read_sweep(grid)), tmp_path / "ray", workers=2, show_progress=False, on_chunk=kill_once)
    assert killed
    for name in expected:
        assert _comparable(got[name]) == _comparable(expected[name]), name
        lines = (tmp_path / "ray" / name / "results.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2, 3]  # every chunk once


def test_a_rerun_runs_only_the_unfinished_chunks(grid, serial, local_ray, tmp_path):
    from lmedit.sweep.engine import run_ray

    _, expected = serial
    jobs = expand(read_sweep(grid))
    first = tmp_path / "ray" / jobs[0].name
    run_ray(jobs, tmp_path / "ray", workers=2, show_progress=False)
    # as if the driver died: the first job lost its last two chunks and its summary (the workers may have written
    # its chunks in any order, so the kept ones are chosen by index, not by line)
    lines = (first / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["index"] in (0, 1)]
    (first / "results.jsonl").write_text("\n".join(kept) + "\n")
    (first / "summary.json").unlink()
    ran: list[tuple[str, int]] = []
    got = run_ray(jobs, tmp_path / "ray", workers=2, show_progress=False, on_chunk=lambda j, c, r: ran.append((j.name, c)))
    assert sorted(ran) == [(jobs[0].name, 2), (jobs[0].name, 3)]
    for name in expected:
        assert _comparable(got[name])["post"] == _comparable(expected[name])["post"], name


def test_a_job_a_worker_cannot_prepare_is_reported_or_stops_the_sweep(grid, local_ray, tmp_path):
    from lmedit.sweep.engine import run_ray

    jobs = expand(read_sweep(grid))[:2]
    broken = dataclasses.replace(jobs[1], preset="no-such-preset", folder="broken")
    with pytest.raises(local_ray.exceptions.RayTaskError, match="no-such-preset"):
        run_ray([jobs[0], broken], tmp_path / "stopped", workers=2, show_progress=False)
    assert not (tmp_path / "stopped" / jobs[0].name).exists()  # checked before any folder was touched
    reported: list[tuple[str, str]] = []
    got = run_ray([jobs[0], broken], tmp_path / "ray", workers=2, show_progress=False,
                  on_plan_error=lambda job, error: reported.append((job.name, error)))
    assert list(got) == [jobs[0].name] and [name for name, _ in reported] == ["broken"]
    assert "no-such-preset" in reported[0][1]
    assert [job["name"] for job in json.loads((tmp_path / "ray" / "sweep.json").read_text())["jobs"]] == [jobs[0].name]


def test_a_worker_continues_a_chunk_from_the_checkpoint_a_dead_worker_left(grid, tmp_path):
    """What a Ray retry does after a worker died inside a chunk (here without Ray: the worker class itself)."""
    from lmedit.sweep.engine import ChunkWorker

    job = next(j for j in expand(read_sweep(grid)) if j.method == "GRACE" and j.T == 2)
    folder = tmp_path / "checkpoints"
    reference = ChunkWorker().run(job.to_dict(), 0, [0, 1])
    dying = ChunkWorker()
    prepared = dying.prepared(job)
    apply = prepared.session.method.apply
    calls = []

    def apply_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit("the worker's process ends in the chunk's second edit")
        return apply(*args, **kwargs)

    prepared.session.method = dataclasses.replace(prepared.session.method, apply=apply_then_die)
    with pytest.raises(SystemExit):
        dying.run(job.to_dict(), 0, [0, 1], str(folder), checkpoint_minutes=1e-9)
    assert json.loads((folder / "chunk-0" / "progress.json").read_text())["progress"]["steps_done"] == 1
    retried = ChunkWorker().run(job.to_dict(), 0, [0, 1], str(folder), checkpoint_minutes=1e-9)
    strip = lambda records: [{k: r[k] for k in ("index", "pre", "post")} for r in records]  # noqa: E731
    assert strip(retried["records"]) == strip(reference["records"])
