"""Resuming streamed scores after an interruption (``score(..., resume=dir)``).

The reference is the same call run without interruption: a resumed run must give the same
numbers (bit for bit: the partial sums are restored and the remaining terms added in the same
order) while capturing only the training batches it had not streamed, and a resume directory
must refuse any other computation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.features.engine import ExactGradients

DT = torch.float64


def setup(seed: int = 0, n: int = 40):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    x, y = torch.randn(n, 5, dtype=DT), torch.randint(0, 3, (n,))
    xq, yq = torch.randn(9, 5, dtype=DT), torch.randint(0, 3, (9,))
    states = []
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        states.append(tt.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, lr=0.1))
    return model, TensorDataset(x, y), TensorDataset(xq, yq), states


def tracin(model, checkpoints, **kw):
    return tt.TracIn(
        model, tt.Classification(), checkpoints, batch_size=8, query_block=4, progress=False, **kw
    )


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, calls: int) -> list[int]:
    """Make the engine's contraction raise after ``calls`` calls; return the call counter."""
    counter = [0]
    dot = ExactGradients.dot

    def counted(self, *args, **kwargs):
        counter[0] += 1
        if counter[0] > calls:
            raise Interrupt
        return dot(self, *args, **kwargs)

    monkeypatch.setattr(ExactGradients, "dot", counted)
    return counter


def test_an_interrupted_score_resumes_where_it_stopped(tmp_path, monkeypatch):
    model, train, queries, cks = setup()
    with monkeypatch.context() as m:
        total = interrupt_after(m, 10**9)
        expected = tracin(model, cks).fit(train).score(queries)
    # 2 query blocks (batches of 8 and 1) × 2 checkpoints × 5 training batches; stop after 17
    assert total[0] == 20
    with monkeypatch.context() as m:
        interrupt_after(m, 17)
        with pytest.raises(Interrupt):
            tracin(model, cks).fit(train).score(queries, resume=tmp_path, resume_interval=0)
    assert (tmp_path / "block-000000.pt").exists()  # the first block finished
    assert (tmp_path / "block-000001.partial.pt").exists()
    with monkeypatch.context() as m:
        counter = interrupt_after(m, 10**9)
        got = tracin(model, cks).fit(train).score(queries, resume=tmp_path, resume_interval=0)
    assert torch.equal(got, expected)
    assert counter[0] == 20 - 17  # only what had not been streamed
    again = tracin(model, cks).fit(train).score(queries, resume=tmp_path)  # all finished: read
    assert torch.equal(again, expected)


@pytest.mark.parametrize("checkpoints", [1, 2])
def test_an_interrupted_top_k_resumes_where_it_stopped(tmp_path, monkeypatch, checkpoints):
    model, train, queries, cks = setup(seed=1)
    cks = cks[:checkpoints]
    expected = tracin(model, cks).fit(train).top_k(queries, k=3)
    with monkeypatch.context() as m:
        interrupt_after(m, 7)
        with pytest.raises(Interrupt):
            tracin(model, cks).fit(train).top_k(queries, k=3, resume=tmp_path, resume_interval=0)
    got = tracin(model, cks).fit(train).top_k(queries, k=3, resume=tmp_path, resume_interval=0)
    for a, b in ((got.proponents, expected.proponents), (got.opponents, expected.opponents)):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)


def test_an_influence_function_resumes_too(tmp_path, monkeypatch):
    model, train, queries, cks = setup(seed=2)

    def make():
        return tt.InfluenceFunction(
            model,
            tt.Classification(),
            cks[-1],
            hessian=tt.CG(tol=1e-12),
            damping=0.5,
            batch_size=8,
            query_block=5,
            progress=False,
        )

    expected = make().fit(train).score(queries)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupt):
            make().fit(train).score(queries, resume=tmp_path, resume_interval=0)
    # an influence function's fit reads no training data: the streamed batches' hashes catch
    # other data of the same size
    x, y = train.tensors
    with pytest.raises(tt.StoreMismatchError, match="differs from the one streamed"):
        make().fit(TensorDataset(x.flip(0), y.flip(0))).score(queries, resume=tmp_path)
    got = make().fit(train).score(queries, resume=tmp_path, resume_interval=0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_a_resume_directory_refuses_another_computation(tmp_path, monkeypatch):
    model, train, queries, cks = setup(seed=3)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupt):
            tracin(model, cks).fit(train).score(queries, resume=tmp_path, resume_interval=0)
    x, y = train.tensors
    xq, yq = queries.tensors
    # other queries
    other_q = TensorDataset(xq + 1, yq)
    with pytest.raises(tt.StoreMismatchError, match="other queries"):
        tracin(model, cks).fit(train).score(other_q, resume=tmp_path)
    # other training data of the same size: TracIn's fit fingerprints it (the manifest)
    other_train = TensorDataset(x.flip(0), y.flip(0))
    with pytest.raises(tt.StoreMismatchError, match="train_fingerprint"):
        tracin(model, cks).fit(other_train).score(queries, resume=tmp_path)
    # another checkpoint, another k, top-k instead of scores: the manifest
    moved = {k: v + 1e-3 for k, v in cks[0].state_for(model).items()}
    with pytest.raises(tt.StoreMismatchError, match="checkpoints"):
        tracin(model, [tt.Checkpoint(moved, lr=0.1), cks[1]]).fit(train).score(
            queries, resume=tmp_path
        )
    with pytest.raises(tt.StoreMismatchError, match="kind"):
        tracin(model, cks).fit(train).top_k(queries, k=2, resume=tmp_path)
    # a stored featurizer has nothing to resume
    with pytest.raises(tt.ConfigurationError, match="drop resume="):
        tracin(model, cks, projection=8).fit(train).score(queries, resume=tmp_path / "other")


def test_kill_9_mid_run_then_resume(tmp_path):
    """The real thing: a process streaming scores is killed with SIGKILL, then resumed."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            import torch
            from test_streaming import setup, tracin
            from traintrace.features.engine import ExactGradients
            dot = ExactGradients.dot
            def slow(self, *a, **k):
                time.sleep(0.05)
                return dot(self, *a, **k)
            ExactGradients.dot = slow
            model, train, queries, cks = setup(seed=4, n=80)
            tracin(model, cks).fit(train).score(queries, resume=sys.argv[1], resume_interval=0)
            """
        )
    )
    journal = tmp_path / "journal"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script), str(journal)], env=env)
    deadline = time.monotonic() + 120
    while not (journal / "block-000001.partial.pt").exists():
        assert proc.poll() is None, "the scoring process ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    model, train, queries, cks = setup(seed=4, n=80)
    got = tracin(model, cks).fit(train).score(queries, resume=journal)
    expected = tracin(model, cks).fit(train).score(queries)
    assert torch.equal(got, expected)


def test_fit_reads_the_data_once_and_the_first_pass_records_self_influence(monkeypatch):
    model, train, queries, cks = setup(seed=5)
    captured = [0]
    capture = ExactGradients.capture

    def counted(self, state, batch, kind="loss", **kwargs):
        if kind == "loss":
            captured[0] += batch[0].shape[0]
        return capture(self, state, batch, kind, **kwargs)

    monkeypatch.setattr(ExactGradients, "capture", counted)
    reference = tracin(model, cks).fit(train).self_influence()  # no score: one pass each
    assert captured[0] == 8 + 2 * 40  # fit checks the first batch, then a pass per checkpoint
    est = tracin(model, cks).fit(train)
    assert captured[0] == 8 + 2 * 40 + 8  # fit: the first batch only (its data is hashed)
    est.score(queries)
    before = captured[0]
    got = est.self_influence()  # the norms came with the streamed pass: no capture
    assert captured[0] == before
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=0)
    scores = est.score(train)  # and it is the diagonal of the scores
    torch.testing.assert_close(got, scores.diagonal(), rtol=1e-10, atol=1e-14)
