"""The command line on a user's model and data written outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import traintrace as tt
from traintrace.interfaces.cli import SUBCOMMANDS, build_parser, main
from traintrace.interfaces.config import RunConfig, config_from_args, load_config

pd = pytest.importorskip("pandas")
SRC = Path(__file__).resolve().parents[2] / "src"

FLAGS = [
    "--model", "userproj:make_model",
    "--train", "userproj:train_set",
    "--queries", "userproj:test_set",
    "--checkpoints", "ckpt/*.pt",
    "--path", "src",
]  # fmt: skip


def _reference(folder: Path, module_dir: Path):
    """TracIn through the Python API on the same model, data and checkpoints."""
    sys.path.insert(0, str(module_dir))
    try:
        import userproj

        ckpts = [tt.Checkpoint(p) for p in sorted((folder / "ckpt").glob("*.pt"))]
        est = tt.TracIn(userproj.make_model(), tt.Classification(), ckpts, progress=False)
        est.fit(userproj.train_set())
        return est, userproj.test_set()
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop("userproj", None)


def test_top_k_through_a_subprocess_matches_the_python_api(user_project):
    folder, module_dir = user_project
    out = folder / "run-subprocess"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "traintrace.interfaces.cli", "top-k", *FLAGS]
    proc = subprocess.run(
        [*cmd, "--k", "4", "--output", str(out), "--quiet"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "top_k.csv")
    frame = pd.read_csv(out / "top_k.csv")
    assert list(frame.columns) == ["query", "kind", "rank", "train_index", "score"]
    est, queries = _reference(folder, module_dir)
    expected = est.top_k(queries, k=4).to_pandas()
    assert (frame["train_index"] == expected["train_index"]).all()
    np.testing.assert_allclose(frame["score"], expected["score"], rtol=1e-5, atol=1e-7)
    assert not (out / "store").exists()  # exact TracIn streams: nothing of size n × P is written


def test_every_command_in_process(user_project, monkeypatch, capsys):
    folder, module_dir = user_project
    monkeypatch.chdir(folder)
    est, queries = _reference(folder, module_dir)
    flags = [*FLAGS, "--output", "run-all", "--quiet"]
    assert main(["fit", *flags]) == 0
    assert main(["score", *flags]) == 0
    scores = np.load(folder / "run-all" / "scores.npy", allow_pickle=False)
    np.testing.assert_allclose(scores, est.score(queries).numpy(), rtol=1e-5, atol=1e-7)
    wide = pd.read_csv(folder / "run-all" / "scores.csv")
    np.testing.assert_allclose(wide.drop(columns="query").to_numpy(), scores, rtol=1e-6)
    assert main(["self-influence", *flags]) == 0
    si = pd.read_csv(folder / "run-all" / "self_influence.csv")
    ref = est.self_influence().numpy()
    assert si["train_index"].tolist() == np.argsort(-ref, kind="stable").tolist()
    np.testing.assert_allclose(si["self_influence"], np.sort(ref)[::-1], rtol=1e-5)
    assert main(["report", *flags, "--flipped", "userproj:flipped", "--k", "2"]) == 0
    page = (folder / "run-all" / "report.html").read_text()
    assert "Finding the mislabeled training examples" in page
    assert page.count("proponents (help)") == len(queries)


def test_an_interrupted_score_command_resumes_and_cleans_up(user_project, monkeypatch):
    folder, module_dir = user_project
    monkeypatch.chdir(folder)
    est, queries = _reference(folder, module_dir)
    flags = [*FLAGS, "--output", "run-resume", "--quiet", "--batch-size", "8"]
    from traintrace.features.engine import ExactGradients

    calls, dot = [0], ExactGradients.dot

    def interrupted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt  # the stand-in for kill -9 after some work
        return dot(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ExactGradients, "dot", interrupted)
        assert main(["score", *flags]) == 130  # interrupted
    journal = folder / "run-resume" / "resume-score"
    assert (journal / "manifest.json").exists()
    assert main(["score", *flags]) == 0
    scores = np.load(folder / "run-resume" / "scores.npy", allow_pickle=False)
    np.testing.assert_allclose(scores, est.score(queries).numpy(), rtol=1e-5, atol=1e-7)
    assert not journal.exists()  # finished: the journal is removed


def test_influence_method(user_project, monkeypatch):
    folder, _ = user_project
    monkeypatch.chdir(folder)
    flags = [*FLAGS, "--method", "influence", "--hessian", "exact", "--damping", "1"]
    assert main(["top-k", *flags, "--k", "2", "--output", "run-if", "--quiet"]) == 0
    frame = pd.read_csv(folder / "run-if" / "top_k.csv")
    assert len(frame) == 5 * 2 * 2


def test_config_file_and_flags_give_the_same_config(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'model = "userproj:make_model"\ntrain = "userproj:train_set"\n'
        'queries = "userproj:test_set"\ncheckpoints = "ckpt/*.pt"\npath = ["src"]\n'
        "batch-size = 8\nlr = 0.1\nprojection = 64\nnormalize = 'cosine'\nk = 3\nstore = true\n"
        'output = "out"\nlabel_names = ["a", "b"]\n'
    )
    flags = [
        *FLAGS,
        "--batch-size",
        "8",
        "--lr",
        "0.1",
        "--projection",
        "64",
        "--normalize",
        "cosine",
    ]
    flags += ["--store"]
    flags += ["--k", "3", "--output", "out", "--label-names", "a", "b"]
    parser = build_parser()
    from_flags = load_config(
        RunConfig, None, config_from_args(parser.parse_args(["fit", *flags]), RunConfig)
    )
    args = parser.parse_args(["fit", "--config", str(toml)])
    from_file = load_config(RunConfig, args.config, config_from_args(args, RunConfig))
    python = RunConfig(
        model="userproj:make_model", train="userproj:train_set", queries="userproj:test_set",
        checkpoints="ckpt/*.pt", path=("src",), batch_size=8, lr=(0.1,), projection=64,
        normalize="cosine", k=3, output=Path("out"), label_names=("a", "b"), store=True,
    )  # fmt: skip
    assert from_flags == from_file == python
    # flags override the file
    args = parser.parse_args(["fit", "--config", str(toml), "--k", "7", "--normalize", "none"])
    cfg = load_config(RunConfig, args.config, config_from_args(args, RunConfig))
    assert (cfg.k, cfg.normalize, cfg.batch_size, cfg.store) == (7, "none", 8, True)


def test_every_config_field_is_a_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in SUBCOMMANDS:
        dests = {a.dest for a in sub.choices[command.name]._actions}
        fields = set(command.config.__dataclass_fields__)
        assert fields <= dests, fields - dests


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "FILE"], "is a file, not a folder"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--model", "nosuchmodule:make"], "could not import module 'nosuchmodule'"),
        (["--model", "userproj:nope"], "has no attribute 'nope'"),
        (["--model", "userproj.make_model"], "package.module:attribute"),
        (["--model", "os:system"], "returned int|not a torch.nn.Module"),
        (["--checkpoints", "nothing/*.pt"], "no checkpoint files match"),
        (["--lr", "0.1", "0.2"], "2 learning rates for 3 checkpoints"),
        (["--lr", "-1"], "finite and > 0"),
        (["--k", "0"], "k must be >= 1"),
        (["--task", "rubbish"], "task must be one of"),
        (["--task", "regression", "--measurement", "margin"], "classification only|applies to"),
    ],
)
def test_user_errors_exit_2_with_a_message(user_project, monkeypatch, capsys, extra, message):
    folder, _ = user_project
    monkeypatch.chdir(folder)
    (folder / "FILE").write_text("not a folder")
    if "os:system" in extra:
        extra = ["--model", "os:getpid"]
    status = main(["fit", *FLAGS, "--output", "run-err", "--quiet", *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("traintrace: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "a:b"\nmodle = "typo"\n')
    assert main(["fit", "--config", str(bad)]) == 2
    assert "unknown key 'modle'" in capsys.readouterr().err
    bad.write_text("k = [unclosed\n")
    assert main(["fit", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    bad.write_text('model = "a:b"\nk = "5"\n')
    assert main(["fit", "--config", str(bad)]) == 2
    assert "missing required setting(s): train" in capsys.readouterr().err
    assert main(["fit", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(tt.ConfigurationError, match="k must be a int, got '5'"):
        RunConfig(model="a:b", train="a:c", checkpoints="*.pt", k="5")


def test_demo_and_evaluate_refuse_bad_seed_and_output(tmp_path, capsys):
    afile = tmp_path / "f"
    afile.write_text("x")
    assert main(["demo", "--seed", "-1", "--quiet"]) == 2
    assert "seed must be an integer >= 0" in capsys.readouterr().err
    assert main(["demo", "--output", str(afile), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["evaluate", "--seed", "-3", "--quiet"]) == 2
    assert main(["evaluate", "--output", str(afile), "--quiet"]) == 2


def test_checkpoint_order_is_numeric(tmp_path, monkeypatch):
    from traintrace.interfaces.run import Run

    monkeypatch.chdir(tmp_path)
    for e in (10, 2, 1):
        torch.save({"w": torch.zeros(1)}, tmp_path / f"ep{e}.pt")
    run = Run(RunConfig(model="a:b", train="a:c", checkpoints="ep*.pt", lr=(0.1,)))
    assert [c.name for c in run.checkpoints] == ["ep1.pt", "ep2.pt", "ep10.pt"]


def test_custom_task_and_a_changed_setting_on_an_existing_store(user_project, monkeypatch, capsys):
    folder, _ = user_project
    monkeypatch.chdir(folder)
    flags = [*FLAGS, "--k", "2", "--quiet"]
    assert main(["top-k", *flags, "--output", "run-a", "--measurement", "margin", "--store"]) == 0
    assert (folder / "run-a" / "store").is_dir()
    assert main(["top-k", *flags, "--output", "run-b", "--task", "userproj:margin_task"]) == 0
    a, b = (pd.read_csv(folder / d / "top_k.csv") for d in ("run-a", "run-b"))
    pd.testing.assert_frame_equal(a, b)
    # the store in run-a holds exact gradients: a projection is refused, with the CLI's way out
    assert main(["top-k", *flags, "--output", "run-a", "--projection", "8", "--store"]) == 2
    assert "--overwrite-store" in capsys.readouterr().err
