"""``traintrace evaluate``: every estimator on one model, judged by retraining.

An MLP is trained on scikit-learn's digits with 10% of the training labels flipped. Every
estimator traintrace offers scores the same queries; each is judged by

* **LDS** — the linear datamodeling score (TRAK): Spearman correlation, per query, between the
  loss actually measured after retraining on random half-size subsets and the loss the
  attribution scores predict for that subset (averaged over queries);
* **LOO** — Pearson correlation between scores and the actual change of each query's loss when
  one training example is left out and the model retrained;
* **mislabel AUROC** — how well the estimator's self-influence separates flipped labels;
* **time** — wall time of fit + score + self-influence.

Influence functions appear twice where the damping matters: with the spectrum heuristic
(``tt.spectrum(...).suggested_damping``, the smallest damping that makes the Hessian positive
definite) or the weight decay, and with the damping that maximizes the linearized-Laplace evidence
(``tt.select_damping``, rows marked "evidence λ"), so the table shows which choice tracks
leave-one-out retraining better.

All retrains go through one :class:`~traintrace.Retrainer` with an on-disk cache, so they are
shared by every estimator and an interrupted evaluation resumes. The table is printed, saved as
``results.json`` and shown with a plot in ``report.html``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.curvature import LaplaceEvidence
from traintrace.interfaces.report import HTMLReport

__all__ = ["DigitsMLPTrainer", "EvaluateConfig", "EvaluationResult", "run_evaluation"]


@dataclass
class EvaluateConfig:
    """Settings of ``traintrace evaluate`` (defaults: what ``make evaluate`` runs)."""

    output: Path = Path("evaluate-output")
    seed: int = 0
    n_train: int = 300
    queries: int = 32
    flip_fraction: float = 0.1
    hidden: int = 24
    steps: int = 300
    lr: float = 0.5
    weight_decay: float = 1e-3
    checkpoints: int = 5
    lds_subsets: int = 64
    loo_examples: int = 32
    ame_subsets: int = 256
    workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.checkpoints < 1 or self.steps < self.checkpoints:
            raise tt.ConfigurationError(
                f"need steps >= checkpoints >= 1, got steps={self.steps}, "
                f"checkpoints={self.checkpoints}"
            )
        if self.loo_examples > self.n_train:
            raise tt.ConfigurationError("loo_examples cannot exceed n_train")

    @classmethod
    def quick(cls, **overrides: object) -> EvaluateConfig:
        """A small configuration for smoke tests (seconds, not minutes)."""
        base = dict(n_train=80, queries=4, steps=60, lds_subsets=8, loo_examples=6, ame_subsets=16)
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


def _digits(cfg: EvaluateConfig):
    """Standardized digits: ``n_train`` training examples with flipped labels, and queries."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(digits.target))
    x = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    x_train, y_clean = x[: cfg.n_train], y[: cfg.n_train]
    x_query, y_query = (
        x[cfg.n_train : cfg.n_train + cfg.queries],
        y[cfg.n_train : cfg.n_train + cfg.queries],
    )
    n_flip = max(1, round(cfg.flip_fraction * cfg.n_train))
    flip_idx = torch.from_numpy(rng.choice(cfg.n_train, n_flip, replace=False))
    y_train = y_clean.clone()
    y_train[flip_idx] = (y_clean[flip_idx] + torch.from_numpy(rng.integers(1, 10, n_flip))) % 10
    flipped = torch.zeros(cfg.n_train, dtype=torch.bool)
    flipped[flip_idx] = True
    return x_train, y_train, flipped, x_query, y_query


class DigitsMLPTrainer:
    """``train_fn(indices, seed) -> model``: full-batch gradient descent on a subset.

    The objective is ``mean cross-entropy + (weight_decay/2)‖θ‖²`` (so influence functions use
    ``damping=weight_decay``), deterministic given the seed. Picklable, so retrains can run in
    worker processes. :meth:`trace` trains on everything and also saves TracIn checkpoints
    and feeds a HYDRA recorder.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cfg: EvaluateConfig) -> None:
        self.x, self.y = x, y
        self.hidden, self.steps, self.lr = cfg.hidden, cfg.steps, cfg.lr
        self.weight_decay, self.base_seed = cfg.weight_decay, cfg.seed

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(self.base_seed * 1000 + seed)
        return nn.Sequential(nn.Linear(64, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 10))

    def _step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss = loss + self.weight_decay / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= self.lr * p.grad

    def __call__(self, indices: np.ndarray, seed: int) -> nn.Module:
        idx = torch.as_tensor(indices, dtype=torch.long)
        model = self.model(seed)
        x, y = self.x[idx], self.y[idx]
        for _ in range(self.steps):
            self._step(model, x, y)
        return model

    def trace(
        self, model: nn.Module, checkpoints: int, recorder: tt.TrajectoryRecorder | None = None
    ) -> list[tt.Checkpoint]:
        """Train ``model`` on all examples, keeping evenly spaced checkpoints, recording HYDRA.

        ``model`` should come from :meth:`model` (seed 0) so that it equals ``self(all, 0)``.
        """
        save_at = set(
            np.linspace(self.steps / checkpoints, self.steps, checkpoints).round().astype(int)
        )
        saved = []
        everything = torch.arange(len(self.y))
        for step in range(1, self.steps + 1):
            if recorder is not None:
                recorder.record((self.x, self.y), everything, self.lr)
            self._step(model, self.x, self.y)
            if step in save_at:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                saved.append(tt.Checkpoint(state, lr=self.lr, name=f"step {step}"))
        return saved


@dataclass
class Row:
    """One estimator's line in the table."""

    estimator: str
    lds: float
    lds_se: float
    loo_pearson: float
    loo_spearman: float
    mislabel_auroc: float | None
    seconds: float
    note: str = ""


@dataclass
class EvaluationResult:
    rows: list[Row]
    report: Path
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        head = (
            f"{'estimator':<30}{'LDS':>7}{'± s.e.':>8}{'LOO r':>8}{'LOO ρ':>8}{'mislabel':>10}"
            f"{'time s':>9}"
        )
        lines = [head, "-" * len(head)]
        for r in sorted(self.rows, key=lambda r: -_nan_low(r.lds)):
            auroc = "—" if r.mislabel_auroc is None else f"{r.mislabel_auroc:.3f}"
            lines.append(
                f"{r.estimator:<30}{r.lds:>7.3f}{r.lds_se:>8.3f}{r.loo_pearson:>8.3f}"
                f"{r.loo_spearman:>8.3f}"
                f"{auroc:>10}{r.seconds:>9.2f}"
            )
        return "\n".join(lines)


def _nan_low(v: float) -> float:
    return -math.inf if v is None or math.isnan(v) else v


Estimate = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def _estimators(ctx: dict) -> dict[str, Estimate]:
    """Each entry computes ``(scores [n_query, n_train], self-influence [n_train] or None)``."""
    model, task, train, queries = ctx["model"], ctx["task"], ctx["train"], ctx["queries"]
    final, ckpts, wd = ctx["final"], ctx["checkpoints"], ctx["weight_decay"]
    quiet = {"progress": False}

    def gradient(est: tt.Estimator, self_influence: bool = True) -> Estimate:
        def run() -> tuple[torch.Tensor, torch.Tensor | None]:
            est.fit(train)
            return est.score(queries), est.self_influence() if self_influence else None

        return run

    def influence(self_influence: bool = True, **kw: object) -> Estimate:
        est = tt.InfluenceFunction(model, task, final, **kw, **quiet)
        return gradient(est, self_influence)

    def hydra() -> tuple[torch.Tensor, torch.Tensor | None]:
        est = tt.HYDRA(model, task, ctx["recorder"], final, progress=False).fit()
        return est.score(queries), est.self_influence(train)

    def ame() -> tuple[torch.Tensor, torch.Tensor | None]:
        est = tt.AME(ctx["retrainer"], len(train), num_subsets=ctx["ame_subsets"], seed=1).fit()
        return est.score(), None

    damp, evidence = ctx["damping"], ctx["evidence_damping"]
    return {
        "TracIn": gradient(tt.TracIn(model, task, ckpts, **quiet)),
        "TracIn (last layer)": gradient(tt.TracIn(model, task, ckpts, layers="last", **quiet)),
        # a cosine with itself is 1: GAS has no informative self-influence
        "GAS (cosine TracIn)": gradient(
            tt.TracIn(model, task, ckpts, normalize=True, **quiet), False
        ),
        "IF exact Hessian": influence(hessian=tt.Exact(), damping=damp),
        "IF exact GGN": influence(hessian=tt.Exact(), curvature="ggn", damping=wd),
        # the damping maximizing the Laplace evidence of the GGN (tt.select_damping); the
        # Hessian is not a Laplace posterior precision here (indefinite), so no Hessian row
        "IF exact GGN (evidence λ)": influence(
            hessian=tt.Exact(), curvature="ggn", damping=evidence
        ),
        # self-influence would cost one iterative solve per training example: skipped
        "IF CG": influence(False, hessian=tt.CG(tol=1e-8), damping=damp),
        "IF LiSSA": influence(False, hessian=tt.LiSSA(depth=1000), damping=damp),
        "IF Arnoldi (r=32)": influence(hessian=tt.Arnoldi(rank=32, iterations=64), damping=damp),
        "IF EK-FAC": influence(hessian=tt.EKFAC(sampled_labels=False), damping=wd),
        "IF M-FAC (emp. Fisher)": influence(hessian=tt.MFAC(), damping=wd),
        "Representer points": gradient(tt.RepresenterPoints(model, task, final, l2=wd, **quiet)),
        # TRAK needs k well below n: ΦᵀΦ is k × k of rank <= n
        "TRAK (3 models, k=64)": gradient(
            tt.TRAK(model, task, ctx["ensemble"], projection=min(64, len(train) // 4), **quiet)
        ),
        "HYDRA": hydra,
        "AME": ame,
    }


def run_evaluation(cfg: EvaluateConfig | None = None) -> EvaluationResult:
    """Run every estimator, judge it by retraining, write ``results.json`` and ``report.html``."""
    cfg = cfg or EvaluateConfig()
    cfg.output.mkdir(parents=True, exist_ok=True)
    x_train, y_train, flipped, x_query, y_query = _digits(cfg)
    train, queries = TensorDataset(x_train, y_train), TensorDataset(x_query, y_query)
    task = tt.Classification()
    trainer = DigitsMLPTrainer(x_train, y_train, cfg)
    model = trainer.model(0)
    recorder = tt.TrajectoryRecorder(
        model, task, len(train), cfg.output / "hydra", mode="overwrite"
    )
    checkpoints = trainer.trace(model, cfg.checkpoints, recorder)
    recorder.close()
    final = checkpoints[-1]
    # TRAK's ensemble: independently initialized models trained on all the data
    everything = np.arange(len(train))
    ensemble = [final] + [
        tt.Checkpoint(trainer(everything, seed).state_dict(), name=f"model {seed}")
        for seed in (1, 2)
    ]
    experiment = json.dumps(
        {k: str(v) for k, v in asdict(cfg).items() if k not in ("output", "progress", "workers")}
    )
    retrainer = tt.Retrainer(
        trainer,
        tt.query_measurement(task, queries),
        executor="processes" if cfg.workers > 1 else None,
        max_workers=cfg.workers,
        cache_dir=cfg.output / "retrains",
        experiment=experiment,
        progress=cfg.progress,
    )
    # Ground truth, computed once and shared by every estimator.
    subsets = tt.evaluate.SubsetMeasurements.compute(
        retrainer, len(train), num_subsets=cfg.lds_subsets, alpha=0.5, seed=cfg.seed
    )
    loo_idx = np.random.default_rng([cfg.seed, 7]).choice(
        len(train), cfg.loo_examples, replace=False
    )
    actual_loo = tt.LeaveOneOut(retrainer, len(train), indices=loo_idx).fit().score()[:, loo_idx]

    # Damping for the Hessian paths: the suggestion of the spectrum (the Hessian of a
    # non-convex MLP is indefinite), never below the weight decay. Every Hessian path (exact,
    # CG, LiSSA, Arnoldi) gets the same damping, so they differ only in how they invert.
    spec = tt.spectrum(model, task, final, train, top=4, density=False, progress=False)
    damping = max(cfg.weight_decay, spec.suggested_damping)
    # ... or the prior precision that maximizes the linearized-Laplace evidence (GGN, exact
    # eigenvalues), on the same scale: (C + λI) with C the curvature of the mean loss.
    evidence = LaplaceEvidence.compute(model, task, final, train, curvature="ggn", progress=False)
    selection = evidence.select()  # what tt.select_damping(..., curvature="ggn") returns
    if cfg.progress:
        print(
            f"  damping: spectrum {damping:.4g}, Laplace evidence {selection.damping:.4g}",
            flush=True,
        )

    ctx = {
        "model": model,
        "task": task,
        "train": train,
        "queries": queries,
        "final": final,
        "checkpoints": checkpoints,
        "weight_decay": cfg.weight_decay,
        "damping": damping,
        "evidence_damping": selection.damping,
        "recorder": recorder.path,
        "retrainer": retrainer,
        "ame_subsets": cfg.ame_subsets,
        "ensemble": ensemble,
    }
    rows = []
    for name, estimate in _estimators(ctx).items():
        start = time.perf_counter()
        try:
            scores, self_inf = estimate()
        except tt.TraintraceError as exc:  # reported in the table, never a crash of the whole run
            rows.append(
                Row(name, math.nan, math.nan, math.nan, math.nan, None, 0.0, f"failed: {exc}")
            )
            continue
        seconds = time.perf_counter() - start
        scores = scores.detach().double().cpu()
        if bool((scores == scores.flatten()[0]).all()):
            note = "all scores equal (AME: Lasso kept no coefficient; give it more subsets)"
            rows.append(Row(name, math.nan, math.nan, math.nan, math.nan, None, seconds, note))
            continue
        lds_result = subsets.lds(scores)
        lds = lds_result.score
        per_query = np.asarray(lds_result.per_query, dtype=float)
        per_query = per_query[~np.isnan(per_query)]
        lds_se = (
            float(per_query.std(ddof=1) / math.sqrt(len(per_query)))
            if len(per_query) > 1
            else math.nan
        )
        loo = tt.evaluate.loo_correlation(scores[:, loo_idx], actual_loo)
        auroc = None
        if self_inf is not None:
            auroc = tt.mislabel_detection(self_inf.detach().double().cpu(), flipped).auroc
        rows.append(
            Row(name, float(lds), lds_se, float(loo.pearson), float(loo.spearman), auroc, seconds)
        )
        if cfg.progress:
            print(
                f"  {name:<28} LDS {lds:.3f}  LOO r {loo.pearson:.3f}  ({seconds:.1f}s)", flush=True
            )
    settings = {
        **asdict(cfg),
        "output": str(cfg.output),
        "damping": damping,
        "evidence_damping": selection.damping,
        "log_evidence": selection.log_evidence,
        "log_evidence_at_damping": float(evidence(damping)),
    }
    result = EvaluationResult(rows, cfg.output / "report.html", settings)
    (cfg.output / "results.json").write_text(
        json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=2, default=str)
    )
    _write_report(result, cfg)
    return result


def _write_report(result: EvaluationResult, cfg: EvaluateConfig) -> None:
    from matplotlib.figure import Figure

    rep = HTMLReport("traintrace evaluate — which estimator to trust on this model")
    rep.paragraph(
        f"An MLP (64→{cfg.hidden}→10) trained by full-batch gradient descent on {cfg.n_train} "
        f"digits ({cfg.flip_fraction:.0%} labels flipped), {cfg.queries} query digits, seed "
        f"{cfg.seed}. LDS over {cfg.lds_subsets} retrained half-size subsets; LOO over "
        f"{cfg.loo_examples} retrains without one example; mislabel AUROC from self-influence. "
        "Higher is better for every metric except time. ± s.e. is the standard error of the LDS "
        "over queries: estimators closer than about two of those are not distinguishable here."
    )
    settings = result.settings
    if "evidence_damping" in settings:
        rep.paragraph(
            f"Damping of the influence functions: spectrum heuristic λ = "
            f"{settings['damping']:.4g} (Hessian rows without a mark), weight decay "
            f"{cfg.weight_decay:g} (GGN, EK-FAC, M-FAC), and the λ maximizing the linearized-Laplace "
            f"evidence of the GGN, λ = {settings['evidence_damping']:.4g} (the row marked "
            f"'evidence λ'; log evidence {settings['log_evidence']:.1f} there, "
            f"{settings['log_evidence_at_damping']:.1f} at the spectrum's λ)."
        )
    rows = sorted(result.rows, key=lambda r: -_nan_low(r.lds))
    rep.table(
        [
            "estimator",
            "LDS",
            "± s.e.",
            "LOO Pearson",
            "LOO Spearman",
            "mislabel AUROC",
            "time (s)",
            "note",
        ],
        [
            [
                r.estimator,
                f"{r.lds:.3f}",
                f"{r.lds_se:.3f}",
                f"{r.loo_pearson:.3f}",
                f"{r.loo_spearman:.3f}",
                "—" if r.mislabel_auroc is None else f"{r.mislabel_auroc:.3f}",
                f"{r.seconds:.2f}",
                r.note,
            ]
            for r in rows
        ],
    )
    ok = [r for r in rows if not math.isnan(r.lds)]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.scatter([max(r.seconds, 1e-3) for r in ok], [r.lds for r in ok])
    for r in ok:
        ax.annotate(
            r.estimator,
            (max(r.seconds, 1e-3), r.lds),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("time for fit + score + self-influence (s, log scale; AME: its retrains)")
    ax.set_ylabel("LDS (higher is better)")
    ax.grid(alpha=0.3)
    rep.figure(fig, "LDS against time per estimator")
    rep.save(result.report)
