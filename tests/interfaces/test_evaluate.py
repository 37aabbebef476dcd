"""``traintrace evaluate`` end to end on a tiny configuration (retrains in-process)."""

from __future__ import annotations

import json
import math

import pytest

from traintrace.interfaces.evaluate import EvaluateConfig, run_evaluation


@pytest.mark.slow
def test_evaluate_ranks_every_estimator_and_writes_results(tmp_path):
    cfg = EvaluateConfig.quick(
        output=tmp_path,
        n_train=40,
        queries=3,
        steps=40,
        lds_subsets=6,
        loo_examples=4,
        ame_subsets=12,
        workers=1,
        progress=False,
    )
    result = run_evaluation(cfg)
    names = {r.estimator for r in result.rows}
    assert {
        "TracIn",
        "GAS (cosine TracIn)",
        "IF exact Hessian",
        "IF EK-FAC",
        "IF exact GGN (evidence λ)",
        "HYDRA",
        "AME",
    } <= names
    ok = [r for r in result.rows if not math.isnan(r.lds)]
    assert len(ok) >= 10, result.table()
    assert all(-1 <= r.lds <= 1 for r in ok)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(result.rows)
    # the evidence-chosen damping is recorded beside the spectrum's, and maximizes the evidence
    settings = saved["settings"]
    assert settings["evidence_damping"] > 0
    assert settings["log_evidence"] >= settings["log_evidence_at_damping"]
    html = (tmp_path / "report.html").read_text()
    assert "LDS" in html and "± s.e." in html and "data:image/png;base64," in html
    assert "linearized-Laplace" in html
    # the retrains are cached: a second run reuses every one of them
    cached = list((tmp_path / "retrains").glob("*.npz"))
    assert len(cached) >= cfg.lds_subsets + cfg.loo_examples
