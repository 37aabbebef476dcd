"""The text demo, small: sentences shown as text, self-influence finds the flipped intents."""

from __future__ import annotations

import re

from traintrace.interfaces.cli import main
from traintrace.interfaces.text_demo import (
    INTENTS,
    TextDemoConfig,
    Vocabulary,
    intent_dataset,
    run_text_demo,
)


def test_intent_data_is_seeded_and_round_trips_through_the_vocabulary():
    a, ya = intent_dataset(50, seed=3)
    b, yb = intent_dataset(50, seed=3)
    assert (a, ya) == (b, yb) and len(set(ya)) == len(INTENTS)
    vocab = Vocabulary(a)
    ids = vocab.encode(a, 12)
    assert [vocab.decode(row) for row in ids] == [" ".join(Vocabulary.split(s)) for s in a]


def test_small_text_demo(tmp_path):
    cfg = TextDemoConfig(
        output=tmp_path / "t", n_train=240, n_test=60, epochs=12, checkpoints=3, progress=False
    )
    result = run_text_demo(cfg)
    assert result.test_accuracy > 0.7, result.summary()
    auroc = result.detection["TracIn self-influence"].auroc
    assert auroc > 0.85, result.summary()
    page = result.report.read_text()
    # the first query is "disable my alarm", shown as text with its proponents and opponents
    first = page.split('<div class="query">')[1]
    assert '<div class="text">disable my alarm</div>' in first
    assert first.count('<div class="text">') == 1 + 2 * cfg.k
    assert "label disable_alarm (1)" in first and "opponents (hurt)" in first
    assert "Finding the mislabeled training examples" in page
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", page)
    assert len(list((tmp_path / "t" / "checkpoints").glob("*.pt"))) == 3


def test_text_demo_through_the_cli(tmp_path, capsys):
    assert main(["demo", "--text", "--epochs", "2", "--checkpoints", "5", "--quiet"]) == 2
    assert "need epochs >= checkpoints" in capsys.readouterr().err
