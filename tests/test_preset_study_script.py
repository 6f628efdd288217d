"""scripts/preset_study.py: one row per setting, the balance computed by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "preset_study.py"


def _module():
    spec = importlib.util.spec_from_file_location("preset_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(folder: Path, label: str, data: str, post: dict, seconds: float, done: bool = True) -> dict:
    name = f"{label}-{Path(data).stem}"
    if done:
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps(
            {"post": post, "timing": {"edit_seconds_per_request": seconds}}))
    return {"method": "ROME", "label": label, "data": data, "folder": name, "overrides": {"kl_factor": 1.0}}


def test_a_setting_gets_one_row_with_both_localities_and_their_balance(tmp_path):
    zsre = {"rewrite_acc": 0.9, "rephrase_acc": 0.6, "locality/Relation_Specificity": 0.5, "portability": 0.3}
    cf = {"rewrite_acc": 1.0, "rephrase_acc": 0.4, "locality": 0.8}
    jobs = [_job(tmp_path, "ROME-kl1", "d/ZsRE-test-all.json", zsre, 8.0),
            _job(tmp_path, "ROME-kl1", "d/counterfact_portability_gpt4.json", cf, 10.0),
            _job(tmp_path, "ROME-kl1", "d/counterfact-train.json", cf, 99.0),  # not a study file: left out
            _job(tmp_path, "ROME-L8", "d/ZsRE-test-all.json", zsre, 1.0, done=False)]  # unfinished: no row
    (tmp_path / "sweep.json").write_text(json.dumps({"jobs": jobs}))
    study = _module()
    rows = study.read_study([tmp_path])
    assert list(rows) == ["ROME-kl1"]
    cells = study._cells(rows["ROME-kl1"])
    assert cells["balance"] == pytest.approx((0.9 + 0.6 + 0.5 + 1.0 + 0.4 + 0.8) / 6)
    assert cells["seconds"] == pytest.approx(9.0)
    line = study.markdown(rows).splitlines()[2]
    assert line.startswith("| ROME-kl1 | kl_factor=1.0 | 90.0 | 60.0 | 50.0 | 30.0 | 100.0 | 40.0 | 80.0 | 70.0 | 9.0 |")
