"""The demo end to end on a short schedule, through the command line."""

from __future__ import annotations

import re

import pytest

from traintrace.interfaces.cli import main


@pytest.mark.slow
def test_demo_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "10", "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "TracIn self-influence" in summary and "AUROC" in summary
    html = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", html), "report must not link outside"
    assert html.count("data:image/png;base64,") > 8 * 16 + 30
    assert "Finding mislabeled training images" in html
    assert "had their label flipped on purpose" in html and "d.flipped" not in html
    # which label each score explains; a wrong prediction also shows the predicted label's rows
    assert "Which label each score explains" in html
    wrong = len(re.findall(r"true (\d), predicted (?!\1)\d", html))
    assert html.count("true label ") == 2 * 8
    assert html.count(": proponents (raise its margin)") == 8 + wrong
    assert html.count("predicted label ") == 2 * wrong
    assert len(list((out / "checkpoints").glob("*.pt"))) == 5
    auroc = float(
        re.search(r"TracIn self-influence\s+\S+\s+\S+\s+\S+\s+([0-9.]+)", summary).group(1)
    )
    assert auroc > 0.8, summary


def test_cli_reports_configuration_errors(capsys):
    assert main(["demo", "--epochs", "2", "--checkpoints", "5", "--quiet"]) == 2
    assert "need epochs >= checkpoints" in capsys.readouterr().err
