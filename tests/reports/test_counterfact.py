"""ROME's CounterFact table from run summaries."""

from __future__ import annotations

import pytest

from lmedit.reports.counterfact import counterfact_rows, counterfact_table


def _run(method: str, data: str, post: dict, pre: dict | None = None, n: int = 10) -> dict:
    return {"folder": f"/runs/{method}", "config": {"method": method, "data": data, "protocol": "single"},
            "summary": {"n": n, "pre": pre or {}, "post": post, "complete": True}}


def test_counterfact_table_has_romes_harmonic_score():
    post = {"cf_efficacy": 1.0, "cf_paraphrase": 0.5, "cf_neighborhood": 0.25, "cf_generation_entropy": 6.0}
    rows = counterfact_rows([_run("ROME", "/d/cf.json", post, pre={"cf_efficacy": 0.2, "cf_paraphrase": 0.2,
                                                                      "cf_neighborhood": 0.8})])
    assert rows[0]["S_post"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 25))
    assert rows[0]["GE_post"] == pytest.approx(600.0)
    table = counterfact_table(rows)
    assert "| ROME | 10 | post | 42.9 | 100.0 | 50.0 | 25.0 |" in table
