"""``traintrace evaluate`` on the user's own model: a tiny project written to a temporary folder.

The project (``evaluser_proj``) has a model factory, a training set of 40 examples, 5 queries, a
``train_fn(indices, seed)`` doing a few SGD steps and appending one line per call to a counter
file, and three saved checkpoints. The expected LDS of each estimator is recomputed here from
its scores and the saved subsets with ``tt.evaluate.lds`` (an independent path from the table).
"""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch

import traintrace as tt
from traintrace.interfaces.cli import main
from traintrace.interfaces.config import (
    DEFAULT_EVALUATE_ESTIMATORS,
    EVALUATE_ESTIMATORS,
    EvaluateUserConfig,
)
from traintrace.interfaces.evaluate import evaluate_user_model, run_evaluation

PROJECT = '''
"""A user's model, data and training function."""
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

CALLS = {calls!r}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def train_set():
    return TensorDataset(*_data(40, 0))


def test_set():
    return TensorDataset(*_data(5, 1))


def _fit(model, x, y, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def _train(indices, seed, steps):
    """One line in the counter file per call, then ``steps`` SGD steps on ``indices``."""
    with open(CALLS, "a") as fh:
        fh.write(f"{{len(indices)}} {{seed}}\\n")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = train_set().tensors
    idx = torch.as_tensor(indices)
    _fit(model, x[idx], y[idx], steps)
    return model


def train_fn(indices, seed):
    import os

    if os.path.exists(CALLS + ".stop"):  # the test's stand-in for kill -9 mid-run
        done = len(open(CALLS).read().splitlines()) if os.path.exists(CALLS) else 0
        if done >= int(open(CALLS + ".stop").read()):
            raise KeyboardInterrupt
    return _train(indices, seed, 30)


def train_fn_longer(indices, seed):
    return _train(indices, seed, 40)


def make_regressor():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def _regression_data(n, seed):
    x, _ = _data(n, seed)
    return TensorDataset(x, torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1])


def regression_train():
    return _regression_data(40, 0)


def regression_test():
    return _regression_data(5, 1)


def regression_train_fn(indices, seed):
    torch.manual_seed(seed)
    model = make_regressor()
    x, y = regression_train().tensors
    idx = torch.as_tensor(indices)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        ((model(x[idx]).squeeze(1) - y[idx]) ** 2).mean().backward()
        opt.step()
    return model


def save_regression_checkpoints(folder):
    import os

    os.makedirs(folder, exist_ok=True)
    model = regression_train_fn(np.arange(40), 0)
    torch.save(model.state_dict(), os.path.join(folder, "final.pt"))


def returns_state(indices, seed):
    return train_fn(indices, seed).state_dict()


def save_checkpoints(folder):
    import os

    os.makedirs(folder, exist_ok=True)
    model = make_model()
    x, y = train_set().tensors
    for epoch in range(1, 4):
        opt = _fit(model, x, y, 10)
        torch.save({{"model": model.state_dict(), "optimizer": opt.state_dict()}},
                   os.path.join(folder, f"epoch_{{epoch}}.pt"))


def regression_task():
    import traintrace as tt

    return tt.Regression()
'''

SMALL = {"subsets": 6, "seeds_per_subset": 1, "progress": False}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """``(folder, calls file)``: ``folder/evaluser_proj.py`` and ``folder/ckpt/epoch_*.pt``."""
    import importlib
    import sys

    folder = tmp_path_factory.mktemp("evaluser")
    calls = folder / "calls.txt"
    (folder / "evaluser_proj.py").write_text(textwrap.dedent(PROJECT.format(calls=str(calls))))
    sys.path.insert(0, str(folder))
    try:
        mod = importlib.import_module("evaluser_proj")
        mod.save_checkpoints(str(folder / "ckpt"))
        mod.save_regression_checkpoints(str(folder / "regression"))
    finally:
        sys.path.remove(str(folder))
    calls.unlink(missing_ok=True)
    return folder, calls


def _config(folder, output, **overrides):
    values = dict(
        model="evaluser_proj:make_model",
        train="evaluser_proj:train_set",
        queries="evaluser_proj:test_set",
        checkpoints=str(folder / "ckpt" / "*.pt"),
        retrain="evaluser_proj:train_fn",
        path=(str(folder),),
        output=output,
        **SMALL,
    )
    values.update(overrides)
    return EvaluateUserConfig(**values)


def _count(calls) -> int:
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def _toml(path, folder, output, **extra):
    lines = [
        'model = "evaluser_proj:make_model"',
        'train = "evaluser_proj:train_set"',
        'queries = "evaluser_proj:test_set"',
        f'checkpoints = "{folder / "ckpt" / "*.pt"}"',
        'retrain = "evaluser_proj:train_fn"',
        f'path = ["{folder}"]',
        f'output = "{output}"',
        "subsets = 6",
        "seeds_per_subset = 1",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_ranks_every_estimator_and_lds_matches_an_independent_computation(
    project, tmp_path, capsys
):
    folder, calls = project
    out = tmp_path / "out"
    config = _toml(tmp_path / "my.toml", folder, out)
    before = _count(calls)
    assert main(["evaluate", "--config", str(config), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert _count(calls) - before == 6  # 6 subsets × 1 seed, nothing else

    saved = json.loads((out / "results.json").read_text())
    rows = {r["estimator"]: r for r in saved["rows"]}
    names = ["TracIn", "IF CG", "IF EK-FAC", "IF K-FAC", "IF Arnoldi", "TRAK"]
    names.append("Representer points")
    assert list(rows) == names
    for name in names:  # one line of the printed table per estimator
        assert any(line.startswith(name + " ") for line in printed.splitlines()), printed
    assert "LOO" not in printed and "mislabel" not in printed  # not measured: no columns
    assert (out / "report.html").is_file() and (out / "lds_subsets.npz").is_file()

    # recompute each LDS from the estimator's own scores and the saved ground truth
    subsets = tt.evaluate.SubsetMeasurements.load(out / "lds_subsets.npz")
    assert subsets.measurements.shape == (6, 5) and subsets.subsets.shape == (6, 20)
    model = __import__("evaluser_proj").make_model()
    task = tt.Classification()
    train = __import__("evaluser_proj").train_set()
    queries = __import__("evaluser_proj").test_set()
    ckpts = [tt.Checkpoint(str(folder / "ckpt" / f"epoch_{e}.pt")) for e in (1, 2, 3)]
    quiet = {"progress": False}
    independent = {
        "TracIn": tt.TracIn(model, task, ckpts, **quiet),
        "IF CG": tt.InfluenceFunction(model, task, ckpts[-1], hessian=tt.CG(), **quiet),
        "IF EK-FAC": tt.InfluenceFunction(model, task, ckpts[-1], hessian=tt.EKFAC(), **quiet),
        "TRAK": tt.TRAK(model, task, [ckpts[-1]], **quiet),
    }
    for name, est in independent.items():
        expected = tt.evaluate.lds(est.fit(train).score(queries), subsets)
        assert math.isfinite(rows[name]["lds"]), rows[name]
        assert rows[name]["lds"] == pytest.approx(expected.score, abs=1e-9), name
        per_query = expected.per_query[~np.isnan(expected.per_query)]
        se = per_query.std(ddof=1) / math.sqrt(len(per_query))
        assert rows[name]["lds_se"] == pytest.approx(se, abs=1e-9)
    # the measurements are the retrained models' query losses (train_fn run here directly)
    mod = __import__("evaluser_proj")
    first = mod.train_fn(subsets.subsets[0], int(subsets.seeds[0, 0]))
    losses = torch.nn.functional.cross_entropy(
        first(queries.tensors[0]), queries.tensors[1], reduction="none"
    )
    np.testing.assert_allclose(subsets.measurements[0], losses.detach().numpy(), rtol=1e-10)

    # a rerun trains nothing: every retrain comes from the cache
    before = _count(calls)
    assert main(["evaluate", "--config", str(config), "--quiet", "--estimators", "tracin"]) == 0
    assert _count(calls) == before
    # another retrain spec is another experiment: all 6 retrained, none reused
    assert (
        main(["evaluate", "--config", str(config), "-q", "--estimators", "tracin", "--retrain",
              "evaluser_proj:train_fn_longer"])
        == 0
    )  # fmt: skip
    assert _count(calls) == before + 6
    assert len(list((out / "retrains").glob("*.npz"))) == 12


def test_python_function_with_loo_and_a_trak_ensemble(project, tmp_path):
    folder, calls = project
    cfg = _config(
        folder, tmp_path, loo_examples=3, estimators=("tracin", "ekfac", "trak"), trak_models=2
    )
    before = _count(calls)
    result = run_evaluation(cfg)
    # 6 subsets + LOO (one retrain on everything, one without each of 3 examples) + one more
    # model on everything for TRAK's ensemble
    assert _count(calls) - before == 6 + 1 + 3 + 1
    assert [r.estimator for r in result.rows] == ["TracIn", "IF EK-FAC", "TRAK"]
    assert result.ranked()[0].lds >= result.ranked()[1].lds >= result.ranked()[2].lds
    for r in result.rows:
        assert -1 <= r.lds <= 1 and r.seconds >= 0
        assert r.loo_pearson is not None and math.isfinite(r.loo_pearson)
    assert result.rows[2].note.startswith("2 model(s), gaussian projection")
    assert "LOO r" in result.table() and "mislabel" not in result.table()
    assert result.settings["experiment"].startswith("evaluate evaluser_proj:train_fn ")
    # the LOO columns are the actual leave-one-out changes, recomputed from train_fn here
    mod = __import__("evaluser_proj")
    queries = mod.test_set().tensors
    columns = np.random.default_rng([0, 7]).choice(40, 3, replace=False)

    def losses(model):
        return torch.nn.functional.cross_entropy(model(queries[0]), queries[1], reduction="none")

    everything = np.arange(40)
    actual = (
        torch.stack([losses(mod.train_fn(np.delete(everything, i), 0)) for i in columns], dim=1)
        - losses(mod.train_fn(everything, 0))[:, None]
    )
    scores = (
        tt.TracIn(
            mod.make_model(),
            tt.Classification(),
            [tt.Checkpoint(str(folder / "ckpt" / f"epoch_{e}.pt")) for e in (1, 2, 3)],
            progress=False,
        )
        .fit(mod.train_set())
        .score(mod.test_set())
    )
    expected = tt.evaluate.loo_correlation(scores[:, columns], actual.detach().double())
    assert result.rows[0].loo_pearson == pytest.approx(float(expected.pearson), abs=1e-9)
    # a rerun retrains nothing (subsets, LOO and TRAK's extra model all come from disk)
    before = _count(calls)
    again = run_evaluation(cfg)
    assert _count(calls) == before
    assert [r.lds for r in again.rows] == pytest.approx([r.lds for r in result.rows], abs=1e-12)


def test_an_interrupted_evaluation_resumes_where_it_stopped(project, tmp_path):
    folder, calls = project
    cfg = _config(folder, tmp_path, estimators=("tracin",))
    before = _count(calls)
    stop = calls.with_name(calls.name + ".stop")
    stop.write_text(str(before + 4))  # the 5th retrain is interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            evaluate_user_model(cfg)
    finally:
        stop.unlink()
    assert _count(calls) - before == 4
    assert len(list((tmp_path / "retrains").glob("*.npz"))) == 4  # each finished run kept
    evaluate_user_model(cfg)
    assert _count(calls) - before == 6  # only the 2 missing retrains ran


def test_a_regression_model_where_representer_points_do_not_apply(project, tmp_path):
    folder, _ = project
    cfg = _config(
        folder,
        tmp_path,
        model="evaluser_proj:make_regressor",
        train="evaluser_proj:regression_train",
        queries="evaluser_proj:regression_test",
        checkpoints=str(folder / "regression" / "*.pt"),  # no optimizer state: TracIn needs lr
        retrain="evaluser_proj:regression_train_fn",
        task="regression",
    )
    result = evaluate_user_model(cfg)
    rows = {r.estimator: r for r in result.rows}
    assert len(rows) == len(DEFAULT_EVALUATE_ESTIMATORS)
    # refusals are rows with the named error, the rest are ranked
    assert "ConfigurationError" in rows["Representer points"].note
    assert "Classification" in rows["Representer points"].note
    assert "has no learning rate" in rows["TracIn"].note and "--lr" in rows["TracIn"].note
    for name in ("IF CG", "IF EK-FAC", "IF K-FAC", "IF Arnoldi", "TRAK"):
        assert math.isfinite(rows[name].lds), result.table()
    assert {r.estimator for r in result.ranked()[-2:]} == {"Representer points", "TracIn"}


def test_the_experiment_name_follows_the_specs_and_the_source(project, tmp_path):
    from traintrace.interfaces.evaluate import experiment_name

    folder, _ = project
    cfg = _config(folder, tmp_path)
    __import__("evaluser_proj")
    name = experiment_name(cfg, 40, 5)
    assert name == experiment_name(_config(folder, tmp_path / "elsewhere", workers=2), 40, 5)
    assert name != experiment_name(_config(folder, tmp_path, retrain="evaluser_proj:f"), 40, 5)
    assert name != experiment_name(_config(folder, tmp_path, measurement="margin"), 40, 5)
    assert name != experiment_name(cfg, 41, 5)
    source = folder / "evaluser_proj.py"
    original = source.read_text()
    try:  # an edit of the user's module (e.g. more training steps) is another experiment
        edited = original.replace("_train(indices, seed, 30)", "_train(indices, seed, 31)")
        assert edited != original
        source.write_text(edited)
        assert experiment_name(cfg, 40, 5) != name
    finally:
        source.write_text(original)
    assert experiment_name(cfg, 40, 5) == name


def test_the_checked_train_fn_goes_to_worker_processes(project):
    # workers > 1 sends the wrapped train_fn to spawned processes: it must pickle by reference
    import pickle

    from traintrace.interfaces.evaluate import CheckedTrainFn

    mod = __import__("evaluser_proj")
    again = pickle.loads(pickle.dumps(CheckedTrainFn(mod.train_fn, "evaluser_proj:train_fn")))
    assert again.train_fn is mod.train_fn and again.spec == "evaluser_proj:train_fn"


def test_failed_estimators_do_not_stop_the_evaluation(project, tmp_path, monkeypatch):
    folder, _ = project

    def refuse(*args, **kwargs):
        raise tt.NotPositiveDefiniteError("the damped Hessian is not positive definite")

    monkeypatch.setattr(tt, "RepresenterPoints", refuse)
    cfg = _config(folder, tmp_path, estimators=("representer", "tracin"))
    result = evaluate_user_model(cfg)
    rows = {r.estimator: r for r in result.rows}
    assert math.isnan(rows["Representer points"].lds)
    assert "NotPositiveDefiniteError" in rows["Representer points"].note
    assert math.isfinite(rows["TracIn"].lds)
    assert result.ranked()[-1].estimator == "Representer points"
    assert "not positive definite" in result.table()
    assert "not positive definite" in (tmp_path / "report.html").read_text()


@pytest.mark.filterwarnings("ignore::traintrace.ConvergenceWarning")
def test_every_estimator_key_runs(project, tmp_path):
    folder, _ = project
    cfg = _config(folder, tmp_path, estimators=tuple(EVALUATE_ESTIMATORS))
    result = evaluate_user_model(cfg)
    assert len(result.rows) == len(EVALUATE_ESTIMATORS)
    # LiSSA at its defaults does not converge on this model: its warning is in the row's note
    lissa = next(r for r in result.rows if r.estimator == "IF LiSSA")
    assert "ConvergenceWarning: LiSSA" in lissa.note
    assert set(DEFAULT_EVALUATE_ESTIMATORS) < set(EVALUATE_ESTIMATORS)
    failed = [r for r in result.rows if not math.isfinite(r.lds)]
    assert not failed, result.table()


# -- named errors ----------------------------------------------------------------------------------


def test_missing_retrain_says_what_to_write(project, tmp_path, capsys):
    folder, _ = project
    with pytest.raises(tt.ConfigurationError, match=r"retrain = 'pkg.mod:train_fn'.*indices"):
        _config(folder, tmp_path, retrain=None)
    config = _toml(tmp_path / "c.toml", folder, tmp_path / "o")
    config.write_text(config.read_text().replace('retrain = "evaluser_proj:train_fn"\n', ""))
    assert main(["evaluate", "--config", str(config), "-q"]) == 2
    assert "train_fn(indices, seed) -> torch.nn.Module" in capsys.readouterr().err


def test_train_fn_returning_a_state_dict_is_named(project, tmp_path):
    folder, _ = project
    cfg = _config(folder, tmp_path, retrain="evaluser_proj:returns_state")
    with pytest.raises(tt.RetrainingError, match=r"returned OrderedDict, not a torch\.nn\.Module"):
        evaluate_user_model(cfg)


def test_subsets_larger_than_the_training_set_are_refused(project, tmp_path):
    folder, calls = project
    before = _count(calls)
    with pytest.raises(tt.ConfigurationError, match="subsets of 40; they must hold 1 to 39"):
        evaluate_user_model(_config(folder, tmp_path, subset_fraction=0.99))
    with pytest.raises(tt.ConfigurationError, match="loo_examples=41 exceeds the 40"):
        evaluate_user_model(_config(folder, tmp_path, loo_examples=41))
    assert _count(calls) == before  # refused before any retrain
    for bad in ({"subset_fraction": 1.0}, {"subsets": 2}, {"estimators": ("nope",)}):
        with pytest.raises(tt.ConfigurationError):
            _config(folder, tmp_path, **bad)


def test_measurement_of_the_wrong_shape_is_named(project, tmp_path, monkeypatch):
    folder, _ = project
    orig = tt.Classification.oriented_measurement

    def per_logit(self, outputs, batch):  # [batch, classes] instead of [batch]
        return orig(self, outputs, batch)[:, None].expand(-1, 3)

    monkeypatch.setattr(tt.Classification, "oriented_measurement", per_logit)
    with pytest.raises(tt.ConfigurationError, match=r"shape \(15,\).*one number per query \[5\]"):
        evaluate_user_model(_config(folder, tmp_path))


def test_quick_and_a_user_config_do_not_mix(project, tmp_path, capsys):
    folder, _ = project
    config = _toml(tmp_path / "c.toml", folder, tmp_path / "o")
    assert main(["evaluate", "--config", str(config), "--quick", "-q"]) == 2
    assert "--subsets" in capsys.readouterr().err
    assert main(["evaluate", "--retrain", "evaluser_proj:train_fn", "-q"]) == 2
    assert "missing required setting(s): model" in capsys.readouterr().err


# -- the README's example ------------------------------------------------------------------------


def test_the_readme_example_runs_as_documented(tmp_path, monkeypatch, capsys):
    """examples/evaluate_own_model: README shows its TOML; the commands run (smaller here)."""
    import runpy
    import shutil
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    example = root / "examples" / "evaluate_own_model"
    toml = (example / "evaluate.toml").read_text()
    assert "```toml\n" + toml + "```" in (root / "README.md").read_text()
    for name in ("digits_mlp.py", "evaluate.toml"):
        shutil.copy(example / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "digits_mlp", raising=False)
    runpy.run_path(str(tmp_path / "digits_mlp.py"), run_name="__main__")  # python digits_mlp.py
    assert len(list((tmp_path / "ckpt").glob("step_*.pt"))) == 5
    small = ["--subsets", "4", "--seeds-per-subset", "1", "--workers", "1", "-q"]
    status = main(
        ["evaluate", "--config", "evaluate.toml", *small, "--estimators", "tracin", "kfac"]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "TracIn" in printed and "IF K-FAC" in printed
    assert (tmp_path / "evaluate-output" / "report.html").is_file()
