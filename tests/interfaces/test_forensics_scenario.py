"""The forensics scenario end to end in its quick configuration, through its subcommand."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

import traintrace as tt
from traintrace.interfaces import forensics


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traintrace")
    forensics.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.slow
def test_quick_scenario_finds_the_targets_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "forensics"
    args = _parser().parse_args(["forensics", "--quick", "--quiet", "--output", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "recall@0FP" in printed and "mitigation" in printed and "whole scenario" in printed

    results = json.loads((out / "results.json").read_text())
    agg = {(a["attack"], a["estimator"]): a for a in results["aggregate"]}
    assert {a for a, _ in agg} == {"backdoor", "label flip"}
    assert len(agg) == 6  # 3 estimator rows × 2 attacks, each with one seed
    for row in agg.values():
        assert len(row["ranks"]) == 1 and 1 <= row["ranks"][0] <= 30
        assert 0 <= row["auroc"] <= 1 and 0 <= row["recall"] <= 1
    # the renormalized influence function finds the backdoor's target and most of its poison
    rif = agg[("backdoor", "RIF (EK-FAC)")]
    assert rif["ranks"] == [1] and rif["recall"] > 0.5 and rif["precision"] > 0.8, rif
    assert rif["recall"] >= agg[("backdoor", "TracIn (raw)")]["recall"]
    mitigations = {
        m["attack"]: m for m in results["mitigations"] if m["removed_set_of"] == "target"
    }
    assert mitigations["backdoor"]["attack_effective"] and mitigations["backdoor"]["restored"]

    html = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", html), "report must not link outside"
    assert "the trigger" in html and "recovered (" in html
    assert html.count("data:image/png;base64,") > 30
    assert "Mitigation" in html


def test_rows_whose_keyword_is_missing_are_skipped_with_a_note():
    notes: list[str] = []
    model = forensics.MLP(4)
    ckpts = [tt.Checkpoint(model.state_dict(), lr=0.1)]

    def unknown_keyword(m, c):
        return tt.TracIn(m, tt.Classification(), c, no_such_keyword=True)

    assert forensics.build_or_skip("new", unknown_keyword, model, ckpts, notes) is None
    assert len(notes) == 1 and "skipped 'new'" in notes[0] and "no_such_keyword" in notes[0]
    built = forensics.build_or_skip(
        "raw", lambda m, c: tt.TracIn(m, tt.Classification(), c), model, ckpts, notes
    )
    assert isinstance(built, tt.TracIn) and len(notes) == 1


def test_default_rows_include_every_renormalized_variant():
    names = [n for n, _ in forensics.default_estimators()]
    for expected in (
        "TracIn (raw)",
        "GAS",
        "layer-wise GAS",
        "renormalized TracIn",
        "IF (raw",
        "RIF (EK-FAC)",
        "layer-wise RIF",
    ):
        assert any(n.startswith(expected) for n in names), (expected, names)


def test_trigger_and_configuration_checks():
    img = torch.zeros(2, 1, 8, 8)
    stamped = forensics.stamp_trigger(img)
    assert stamped.sum() == 2 * len(forensics.TRIGGER_PIXELS) and img.sum() == 0
    with pytest.raises(tt.ConfigurationError, match="n_candidates"):
        forensics.ForensicsConfig(n_candidates=1)
    with pytest.raises(tt.ConfigurationError, match="epochs >= checkpoints"):
        forensics.ForensicsConfig(epochs=2, checkpoints=5)
