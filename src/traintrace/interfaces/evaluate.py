"""``traintrace evaluate``: every estimator on one model, judged by retraining.

Two runs share one ranking, table and report:

* **built in** (:class:`EvaluateConfig`): an MLP trained on scikit-learn's digits with 10% of
  the training labels flipped;
* **your own model** (:class:`~traintrace.interfaces.config.EvaluateUserConfig`, ``traintrace
  evaluate --config my.toml``): the model, data, checkpoints and task named as for ``traintrace
  fit``, plus ``retrain = "pkg.mod:train_fn"``, ``train_fn(indices, seed) -> nn.Module``.

Every estimator scores the same queries (``[n_query, n_train]``, positive = the training
example helps the query) and is judged by

* **LDS** — the linear datamodeling score (TRAK): Spearman correlation, per query, between the
  loss actually measured after retraining on random subsets (half-size by default) and the loss
  the attribution scores predict for that subset, ``−Σ_{i∈S} score[q, i]``; mean ± standard
  error over queries;
* **LOO** — Pearson and Spearman correlation between scores and the actual change of each
  query's loss when one training example is left out and the model retrained (built in; opt-in
  with ``loo_examples`` for your model, one retrain per example);
* **mislabel AUROC** — how well the estimator's self-influence separates flipped labels (built
  in only: it needs known flips);
* **time** — wall time of fit + score (+ self-influence where computed).

An estimator that refuses the model (a named :class:`~traintrace.TraintraceError`: a
non-positive-definite curvature, an unsupported layer, a task it does not apply to) becomes a
row with the reason, never a crash of the whole evaluation.

Built in, influence functions appear twice where the damping matters: with the spectrum
heuristic (``tt.spectrum(...).suggested_damping``, the smallest damping that makes the Hessian
positive definite) or the weight decay, and with the damping that maximizes the
linearized-Laplace evidence (``tt.select_damping``, rows marked "evidence λ"). On your model
every estimator runs at its defaults.

All retrains go through one :class:`~traintrace.Retrainer` with an on-disk cache
(``<output>/retrains``), so they are shared by every estimator and an interrupted evaluation
resumes. The table is printed, saved as ``results.json`` and shown with a plot in
``report.html``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.curvature import LaplaceEvidence
from traintrace.features.store import write_atomic
from traintrace.interfaces.config import EvaluateUserConfig
from traintrace.interfaces.report import HTMLReport

__all__ = [
    "DigitsMLPTrainer",
    "EvaluateConfig",
    "EvaluateUserConfig",
    "EvaluationResult",
    "Row",
    "evaluate_user_model",
    "experiment_name",
    "run_evaluation",
]


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


# -- the shared ranking, table and report ---------------------------------------------------------


@dataclass
class Row:
    """One estimator's line in the table (``None``: not measured in this run; NaN: it failed)."""

    estimator: str
    lds: float
    lds_se: float
    seconds: float
    loo_pearson: float | None = None
    loo_spearman: float | None = None
    mislabel_auroc: float | None = None
    note: str = ""


#: The table's metric columns: header, width, attribute, format.
_COLUMNS = (
    ("LDS", 7, "lds", "{:.3f}"),
    ("± s.e.", 8, "lds_se", "{:.3f}"),
    ("LOO r", 8, "loo_pearson", "{:.3f}"),
    ("LOO ρ", 8, "loo_spearman", "{:.3f}"),
    ("mislabel", 10, "mislabel_auroc", "{:.3f}"),
    ("time s", 9, "seconds", "{:.2f}"),
)


def _nan_low(v: float | None) -> float:
    return -math.inf if v is None or math.isnan(v) else v


@dataclass
class EvaluationResult:
    """The ranking: one :class:`Row` per estimator, the report's path and the run's settings."""

    rows: list[Row]
    report: Path
    settings: dict = field(default_factory=dict)

    def ranked(self) -> list[Row]:
        """The rows by LDS, best first (failed rows last)."""
        return sorted(self.rows, key=lambda r: -_nan_low(r.lds))

    def columns(self) -> list[tuple[str, int, str, str]]:
        """The metric columns measured for at least one row (LOO and mislabel are optional)."""
        return [c for c in _COLUMNS if any(getattr(r, c[2]) is not None for r in self.rows)]

    def cells(self, row: Row) -> list[str]:
        """``row``'s values in the order of :meth:`columns` (``—`` where not measured)."""
        values = [getattr(row, attr) for _, _, attr, _ in self.columns()]
        return [
            "—" if v is None else fmt.format(v)
            for v, (_, _, _, fmt) in zip(values, self.columns(), strict=True)
        ]

    def table(self) -> str:
        """The ranking as text, best LDS first; a failed estimator's reason in its note."""
        columns = self.columns()
        width = max([30, *(len(r.estimator) + 2 for r in self.rows)])
        head = f"{'estimator':<{width}}" + "".join(f"{h:>{w}}" for h, w, _, _ in columns)
        notes = any(r.note for r in self.rows)
        lines = [head + ("  note" if notes else ""), "-" * (len(head) + (6 if notes else 0))]
        for r in self.ranked():
            cells = "".join(
                f"{c:>{w}}" for c, (_, w, _, _) in zip(self.cells(r), columns, strict=True)
            )
            lines.append(f"{r.estimator:<{width}}{cells}" + (f"  {r.note}" if r.note else ""))
        return "\n".join(lines)


@dataclass
class Estimated:
    """What one estimator gave: scores ``[n_query, n_train]``, self-influence ``[n_train]``."""

    scores: torch.Tensor
    self_influence: torch.Tensor | None = None
    note: str = ""


#: Computes one estimator's :class:`Estimated`; a named error becomes a failed row.
Estimate = Callable[[], Estimated]


def _lds_with_error(subsets: tt.evaluate.SubsetMeasurements, scores: torch.Tensor) -> tuple:
    """``(LDS, its standard error over queries)``."""
    result = subsets.lds(scores)
    per_query = np.asarray(result.per_query, dtype=float)
    per_query = per_query[~np.isnan(per_query)]
    se = (
        float(per_query.std(ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else math.nan
    )
    return float(result.score), se


def _rank(
    estimates: dict[str, Estimate],
    subsets: tt.evaluate.SubsetMeasurements,
    *,
    loo: tuple[np.ndarray, torch.Tensor] | None = None,
    flipped: torch.Tensor | None = None,
    progress: bool = True,
) -> list[Row]:
    """Run each estimate and judge it: one :class:`Row` each, in the order given.

    ``loo``: ``(columns, actual [n_query, len(columns)])`` leave-one-out changes; ``flipped``:
    ``[n_train]`` known mislabeled examples (for the AUROC of the self-influence).
    """
    rows = []
    n_query, n_train = subsets.n_query, subsets.n_train
    for name, estimate in estimates.items():
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = estimate()
            seconds = time.perf_counter() - start
            for w in caught:  # shown as usual, and traintrace's own in the row's note
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                if issubclass(w.category, (tt.ConvergenceWarning, tt.TraintraceWarning)):
                    first = re.split(r"[:.] ", str(w.message))[0][:100]
                    out.note = "; ".join(
                        filter(None, [out.note, f"{w.category.__name__}: {first}"])
                    )
            scores = out.scores.detach().double().cpu()
            if tuple(scores.shape) != (n_query, n_train):
                raise tt.ConfigurationError(
                    f"scores have shape {tuple(scores.shape)}, the ground truth measured "
                    f"[n_query={n_query}, n_train={n_train}]"
                )
            bad = int((~torch.isfinite(scores)).sum())
            if bad:
                raise tt.NonFiniteGradientError(
                    f"{bad} of {scores.numel()} scores are NaN or infinite"
                )
            if bool((scores == scores.flatten()[0]).all()):
                note = "all scores equal (AME: Lasso kept no coefficient; give it more subsets)"
                rows.append(Row(name, math.nan, math.nan, seconds, note=note))
                continue
            lds, lds_se = _lds_with_error(subsets, scores)
        except tt.TraintraceError as exc:  # a row with the reason, never a crash of the run
            seconds = time.perf_counter() - start
            note = f"failed: {type(exc).__name__}: {exc}"
            rows.append(Row(name, math.nan, math.nan, seconds, note=note))
            if progress:
                print(f"  {name:<28} {note}", flush=True)
            continue
        row = Row(name, lds, lds_se, seconds, note=out.note)
        if loo is not None:
            corr = tt.evaluate.loo_correlation(scores[:, loo[0]], loo[1])
            row.loo_pearson, row.loo_spearman = float(corr.pearson), float(corr.spearman)
        if flipped is not None and out.self_influence is not None:
            self_inf = out.self_influence.detach().double().cpu()
            row.mislabel_auroc = tt.mislabel_detection(self_inf, flipped).auroc
        rows.append(row)
        if progress:
            loo_text = "" if row.loo_pearson is None else f"  LOO r {row.loo_pearson:.3f}"
            print(f"  {name:<28} LDS {lds:.3f} ± {lds_se:.3f}{loo_text}  ({seconds:.1f}s)")
    return rows


def _finish(
    rows: list[Row],
    settings: dict,
    output: Path,
    *,
    title: str,
    paragraphs: list[str],
    time_label: str,
) -> EvaluationResult:
    """Write ``results.json`` and ``report.html`` (table and LDS-against-time plot)."""
    from matplotlib.figure import Figure

    result = EvaluationResult(rows, output / "report.html", settings)
    (output / "results.json").write_text(
        json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=2, default=str)
    )
    rep = HTMLReport(title)
    for text in paragraphs:
        rep.paragraph(text)
    ranked = result.ranked()
    header = [h.replace("time s", "time (s)") for h, _, _, _ in result.columns()]
    rep.table(
        ["estimator", *header, "note"],
        [[r.estimator, *result.cells(r), r.note] for r in ranked],
    )
    ok = [r for r in ranked if not math.isnan(r.lds)]
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
    ax.set_xlabel(time_label)
    ax.set_ylabel("LDS (higher is better)")
    ax.grid(alpha=0.3)
    rep.figure(fig, "LDS against time per estimator")
    rep.save(result.report)
    return result


_SE_NOTE = (
    "Higher is better for every metric except time. ± s.e. is the standard error of the LDS "
    "over queries: estimators closer than about two of those are not distinguishable here."
)


def run_evaluation(cfg: EvaluateConfig | EvaluateUserConfig | None = None) -> EvaluationResult:
    """Run every estimator, judge it by retraining, write ``results.json`` and ``report.html``.

    ``cfg``: an :class:`EvaluateConfig` (or ``None``) runs the built-in digits evaluation; an
    :class:`~traintrace.interfaces.config.EvaluateUserConfig` ranks the estimators on the
    user's own model (see :func:`evaluate_user_model`).
    """
    if isinstance(cfg, EvaluateUserConfig):
        return evaluate_user_model(cfg)
    if cfg is not None and not isinstance(cfg, EvaluateConfig):
        raise tt.ConfigurationError(
            f"run_evaluation takes an EvaluateConfig (built-in digits run) or an "
            f"EvaluateUserConfig (your model), got {type(cfg).__name__}"
        )
    return _run_builtin(cfg or EvaluateConfig())


# -- the built-in digits evaluation ----------------------------------------------------------------


def _estimators(ctx: dict) -> dict[str, Estimate]:
    """Each entry computes ``(scores [n_query, n_train], self-influence [n_train] or None)``."""
    model, task, train, queries = ctx["model"], ctx["task"], ctx["train"], ctx["queries"]
    final, ckpts, wd = ctx["final"], ctx["checkpoints"], ctx["weight_decay"]
    quiet = {"progress": False}

    def gradient(est: tt.Estimator, self_influence: bool = True) -> Estimate:
        def run() -> Estimated:
            est.fit(train)
            return Estimated(est.score(queries), est.self_influence() if self_influence else None)

        return run

    def influence(self_influence: bool = True, **kw: object) -> Estimate:
        est = tt.InfluenceFunction(model, task, final, **kw, **quiet)
        return gradient(est, self_influence)

    def hydra() -> Estimated:
        est = tt.HYDRA(model, task, ctx["recorder"], final, progress=False).fit()
        return Estimated(est.score(queries), est.self_influence(train))

    def ame() -> Estimated:
        est = tt.AME(ctx["retrainer"], len(train), num_subsets=ctx["ame_subsets"], seed=1).fit()
        return Estimated(est.score())

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


def _run_builtin(cfg: EvaluateConfig) -> EvaluationResult:
    """The digits MLP: every estimator, LDS, LOO, mislabel AUROC; results and report."""
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
    rows = _rank(
        _estimators(ctx),
        subsets,
        loo=(loo_idx, actual_loo),
        flipped=flipped,
        progress=cfg.progress,
    )
    settings = {
        **asdict(cfg),
        "output": str(cfg.output),
        "damping": damping,
        "evidence_damping": selection.damping,
        "log_evidence": selection.log_evidence,
        "log_evidence_at_damping": float(evidence(damping)),
    }
    paragraphs = [
        f"An MLP (64→{cfg.hidden}→10) trained by full-batch gradient descent on {cfg.n_train} "
        f"digits ({cfg.flip_fraction:.0%} labels flipped), {cfg.queries} query digits, seed "
        f"{cfg.seed}. LDS over {cfg.lds_subsets} retrained half-size subsets; LOO over "
        f"{cfg.loo_examples} retrains without one example; mislabel AUROC from self-influence. "
        + _SE_NOTE,
        f"Damping of the influence functions: spectrum heuristic λ = {damping:.4g} (Hessian rows "
        f"without a mark), weight decay {cfg.weight_decay:g} (GGN, EK-FAC, M-FAC), and the λ "
        f"maximizing the linearized-Laplace evidence of the GGN, λ = {selection.damping:.4g} "
        f"(the row marked 'evidence λ'; log evidence {selection.log_evidence:.1f} there, "
        f"{settings['log_evidence_at_damping']:.1f} at the spectrum's λ).",
    ]
    return _finish(
        rows,
        settings,
        cfg.output,
        title="traintrace evaluate — which estimator to trust on this model",
        paragraphs=paragraphs,
        time_label="time for fit + score + self-influence (s, log scale; AME: its retrains)",
    )


# -- the user's own model ------------------------------------------------------------------------


class CheckedTrainFn:
    """The user's ``train_fn(indices, seed)``, checked to return a ``torch.nn.Module``.

    Picklable when ``train_fn`` is (it is held by reference), so retrains can run in worker
    processes. ``spec`` names it in the error.
    """

    def __init__(self, train_fn: Callable[[np.ndarray, int], nn.Module], spec: str) -> None:
        self.train_fn = train_fn
        self.spec = spec

    def __repr__(self) -> str:
        return f"retrain {self.spec!r}"

    def __call__(self, indices: np.ndarray, seed: int) -> nn.Module:
        model = self.train_fn(indices, seed)
        if not isinstance(model, nn.Module):
            raise tt.ConfigurationError(
                f"retrain {self.spec!r} returned {type(model).__name__}, not a torch.nn.Module: "
                "train_fn(indices, seed) must return the model it trained on the examples at "
                "indices (return model, not its state dict, loss or optimizer)"
            )
        return model


def _source_digest(specs: list[str]) -> str:
    """SHA-256 over the source files of the modules named by ``'pkg.mod:attr'`` specs."""
    h = hashlib.sha256()
    for spec in specs:
        module = sys.modules.get(spec.split(":")[0])
        source = getattr(module, "__file__", None)
        h.update(spec.encode() + b"\0")
        if source and Path(source).is_file():
            h.update(Path(source).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def experiment_name(cfg: EvaluateUserConfig, n_train: int, n_query: int) -> str:
    """The retrain cache's experiment name for ``cfg``: changes with what is trained/measured.

    ``"evaluate <retrain> <hash>"``, the hash over ``model``, ``train``, ``queries``,
    ``retrain``, ``task``, ``measurement``, ``n_train``, ``n_query`` and the source files of
    the modules they name (imported already). Edit any of them and earlier retrains are not
    reused; data read from files by unchanged code is not seen — use another ``output`` then.
    """
    record = {k: getattr(cfg, k) for k in ("model", "train", "queries", "retrain", "task")}
    record.update(measurement=cfg.measurement, n_train=n_train, n_query=n_query)
    specs = [cfg.model, cfg.train, cfg.queries, cfg.retrain]  # type: ignore[list-item]
    if ":" in cfg.task:
        specs.append(cfg.task)
    h = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    h.update(_source_digest(specs).encode())
    return f"evaluate {cfg.retrain} {h.hexdigest()[:16]}"


def _ensemble_member(
    cfg: EvaluateUserConfig, train_fn: CheckedTrainFn, n_train: int, experiment: str, seed: int
) -> tt.Checkpoint:
    """A model trained by ``train_fn`` on everything with ``seed``, saved once per experiment."""
    tag = hashlib.sha256(experiment.encode()).hexdigest()[:16]
    path = cfg.output / "models" / f"{tag}-seed{seed}.pt"
    if not path.exists():
        state = train_fn(np.arange(n_train, dtype=np.int64), seed).state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
        write_atomic(path, buffer.getvalue(), durable=False)  # a killed run leaves no half file
    return tt.Checkpoint(str(path), name=f"retrained seed {seed}")


def _user_estimators(
    cfg: EvaluateUserConfig,
    run: Any,
    final: tt.Checkpoint,
    ensemble: Callable[[], list[tt.Checkpoint]],
) -> dict[str, Estimate]:
    """The estimators chosen in ``cfg.estimators``, each at its defaults, by display name.

    ``ensemble()``: TRAK's checkpoints (the last one, then ``trak_models - 1`` retrained).
    """
    model, task, train, queries = run.model, run.task, run.train, run.queries
    common = {"batch_size": cfg.batch_size, "progress": cfg.progress}

    def fitted(make: Callable[[], Any], note: Callable[[Any], str]) -> Estimate:
        def estimate() -> Estimated:
            est = make()  # inside: a constructor's refusal is the row's reason too
            est.fit(train)
            return Estimated(est.score(queries), note=note(est))

        return estimate

    def damping_note(est: Any) -> str:
        if getattr(est, "damping_", None) is None:  # K-FAC / EK-FAC: the config's own damping
            config = est.hessian
            return f"damping {config.damping:g} ({config.damping_scale}, the config's)"
        return f"damping {est.damping_:.3g} ({est.damping_reason_.split(':')[0]})"

    def influence(hessian: Callable[[], Any]) -> Estimate:
        return fitted(
            lambda: tt.InfluenceFunction(model, task, final, hessian=hessian(), **common),
            damping_note,
        )

    table: dict[str, tuple[str, Estimate]] = {
        "tracin": (
            "TracIn",
            fitted(
                lambda: tt.TracIn(model, task, run.checkpoints, **common),
                lambda est: f"{len(est.checkpoints)} checkpoints",
            ),
        ),
        "cg": ("IF CG", influence(tt.CG)),
        "ekfac": ("IF EK-FAC", influence(tt.EKFAC)),
        "kfac": ("IF K-FAC", influence(tt.KFAC)),
        "arnoldi": ("IF Arnoldi", influence(tt.Arnoldi)),
        "trak": (
            "TRAK",
            fitted(
                lambda: tt.TRAK(model, task, ensemble(), **common),
                lambda est: (
                    f"{len(est.checkpoints)} model(s), {est.projection_.kind} projection "
                    f"k={est.projection_.dim}"
                ),
            ),
        ),
        "representer": (
            "Representer points",
            fitted(
                lambda: tt.RepresenterPoints(model, task, final, **common),
                lambda est: "",
            ),
        ),
        "exact": ("IF exact Hessian", influence(tt.Exact)),
        "lissa": ("IF LiSSA", influence(tt.LiSSA)),
    }
    return dict(table[key] for key in cfg.estimators)


def _check_measure(
    measure: Callable[[nn.Module], torch.Tensor],
    model: nn.Module,
    final: tt.Checkpoint,
    cfg: EvaluateUserConfig,
    n_query: int,
) -> None:
    """Measure the queries once at the last checkpoint: one finite number per query."""
    trained = copy.deepcopy(model)
    trained.load_state_dict(final.state_for(model))
    values = torch.as_tensor(measure(trained))
    if tuple(values.shape) != (n_query,):
        raise tt.ConfigurationError(
            f"the task {cfg.task!r} measures the {n_query} queries of {cfg.queries!r} as shape "
            f"{tuple(values.shape)} at the last checkpoint, not one number per query "
            f"[{n_query}]: the scores are [n_query, n_train], so a custom Task's "
            "oriented_measurement(outputs, batch) must return [batch] (sum over tokens or "
            "outputs inside it)"
        )
    if not bool(torch.isfinite(values).all()):
        raise tt.ConfigurationError(
            f"the queries' measurement at the last checkpoint ({final.name}) is not finite: "
            f"{values.tolist()[:8]}; check the checkpoint and the queries"
        )


def evaluate_user_model(cfg: EvaluateUserConfig) -> EvaluationResult:
    """Rank every applicable estimator on the user's own model by retraining it.

    Resolves ``cfg`` like ``traintrace fit`` (:class:`~traintrace.interfaces.run.Run`: the
    model factory, data, checkpoints and task), then:

    1. ground truth: ``cfg.subsets`` random subsets of ``round(cfg.subset_fraction · n)``
       training examples, each retrained by ``cfg.retrain`` with ``cfg.seeds_per_subset``
       seeds and the queries' oriented measurement (lower is better) averaged
       (:class:`tt.evaluate.SubsetMeasurements`), cached in ``<output>/retrains`` under
       :func:`experiment_name` and saved to ``<output>/lds_subsets.npz``; with
       ``loo_examples > 0`` also leave-one-out retrains of that many random examples;
    2. every estimator of ``cfg.estimators`` at its defaults (TracIn over every checkpoint,
       the others at the last), scores ``[n_query, n_train]`` (positive = helps);
    3. ``LDS_q = Spearman_j(measurement[j, q], −Σ_{i∈S_j} score[q, i])``, mean ± standard
       error over queries, and the wall time of fit + score; a refusing estimator is a row
       with the reason.

    Writes ``results.json`` and ``report.html`` into ``cfg.output`` and returns the ranking.
    Cost: ``subsets × seeds_per_subset`` (+ ``seeds_per_subset · (loo_examples + 1)``, +
    ``trak_models − 1``) calls of ``train_fn`` — a rerun with the same settings loads them from
    the cache — plus one fit and score per estimator (TRAK's time includes its extra models).

    Raises:
        ConfigurationError: a spec that cannot be imported, ``retrain`` not callable, subsets
            that do not fit the training set, a measurement that is not one number per query.
        RetrainingError: a retrain failed (also when ``train_fn`` returns something that is
            not a ``torch.nn.Module``); the finished ones are cached, rerun to resume.
    """
    from traintrace.data import as_loader, dataset_length
    from traintrace.interfaces.run import Run, load_object

    if not isinstance(cfg, EvaluateUserConfig):
        raise tt.ConfigurationError(f"expected an EvaluateUserConfig, got {type(cfg).__name__}")
    cfg.output.mkdir(parents=True, exist_ok=True)
    run_cfg = cfg.run_config()

    def log(message: str) -> None:
        if cfg.progress:
            print(f"  {message}", flush=True)

    run = Run(run_cfg)
    model, task, train, queries = run.model, run.task, run.train, run.queries
    sizes = {}
    for name, data in (("train", train), ("queries", queries)):
        size = dataset_length(as_loader(data, cfg.batch_size))
        if size is None:
            raise tt.UnsizedDataError(
                f"{name} {getattr(cfg, name)!r} has no length: retraining on subsets needs a "
                "data set with len() (a torch Dataset, a tensor tuple, a list)"
            )
        sizes[name] = size
    n_train, n_query = sizes["train"], sizes["queries"]
    subset_size = round(cfg.subset_fraction * n_train)
    if not 1 <= subset_size < n_train:
        raise tt.ConfigurationError(
            f"subset_fraction={cfg.subset_fraction} of the {n_train} training examples gives "
            f"subsets of {subset_size}; they must hold 1 to {n_train - 1} examples (fewer than "
            "the whole training set): change subset_fraction or use a larger training set"
        )
    if cfg.loo_examples > n_train:
        raise tt.ConfigurationError(
            f"loo_examples={cfg.loo_examples} exceeds the {n_train} training examples; "
            f"use at most {n_train}"
        )
    # the last checkpoint, without reading learning rates (only TracIn needs them)
    final = Run(replace(run_cfg, method="influence")).checkpoints[0]
    train_fn = load_object(cfg.retrain, paths=cfg.path, what="retrain")  # type: ignore[arg-type]
    if not callable(train_fn):
        raise tt.ConfigurationError(
            f"retrain {cfg.retrain!r} is a {type(train_fn).__name__}, not a function "
            "train_fn(indices, seed) -> torch.nn.Module"
        )
    measure = tt.query_measurement(task, queries, batch_size=cfg.batch_size)
    _check_measure(measure, model, final, cfg, n_query)
    experiment = experiment_name(cfg, n_train, n_query)
    checked = CheckedTrainFn(train_fn, cfg.retrain)  # type: ignore[arg-type]
    try:
        retrainer = tt.Retrainer(
            checked,
            measure,
            executor="processes" if cfg.workers > 1 else None,
            max_workers=cfg.workers,
            cache_dir=cfg.output / "retrains",
            experiment=experiment,
            progress=cfg.progress,
        )
    except tt.ConfigurationError as exc:  # e.g. unpicklable data for the worker processes
        raise tt.ConfigurationError(
            f"{exc}\nFor traintrace evaluate: workers = 1 (--workers 1) retrains in this process"
        ) from exc
    n_runs = cfg.subsets * cfg.seeds_per_subset
    log(
        f"ground truth: {cfg.subsets} subsets of {subset_size}/{n_train} training examples × "
        f"{cfg.seeds_per_subset} seed(s) = {n_runs} retrains of {cfg.retrain} "
        f"(cached in {cfg.output / 'retrains'}, experiment {experiment!r})"
    )
    subsets = tt.evaluate.SubsetMeasurements.compute(
        retrainer,
        n_train,
        num_subsets=cfg.subsets,
        alpha=cfg.subset_fraction,
        seed=cfg.seed,
        seeds_per_subset=cfg.seeds_per_subset,
    )
    subsets.save(cfg.output / "lds_subsets.npz")
    loo = None
    if cfg.loo_examples:
        columns = np.random.default_rng([cfg.seed, 7]).choice(
            n_train, cfg.loo_examples, replace=False
        )
        seeds = tuple(range(cfg.seeds_per_subset))
        actual = tt.LeaveOneOut(retrainer, n_train, indices=columns, seeds=seeds).fit().score()
        loo = (columns, actual[:, columns])

    def ensemble() -> list[tt.Checkpoint]:
        seeds = range(1, cfg.trak_models)
        return [final] + [_ensemble_member(cfg, checked, n_train, experiment, s) for s in seeds]

    estimates = _user_estimators(cfg, run, final, ensemble)
    rows = _rank(estimates, subsets, loo=loo, progress=cfg.progress)
    settings = {
        **asdict(cfg),
        "output": str(cfg.output),
        "path": list(cfg.path),
        "n_train": n_train,
        "n_query": n_query,
        "subset_size": subset_size,
        "experiment": experiment,
        "checkpoint": final.name,
    }
    helps = (
        "raises its logit margin"
        if cfg.measurement == "margin"
        else "lowers its loss, the task's measurement"
    )
    paragraphs = [
        f"Model {cfg.model}, training set {cfg.train} ({n_train} examples), queries "
        f"{cfg.queries} ({n_query}), task {cfg.task}, checkpoints {cfg.checkpoints} (TracIn: "
        f"every one; the other estimators: the last, {final.name}); every estimator at its "
        f"defaults. Scores: positive = the training example helps the query ({helps}).",
        f"Ground truth: {cfg.subsets} random subsets of {subset_size} training examples, each "
        f"retrained by {cfg.retrain} with {cfg.seeds_per_subset} seed(s) and the queries' "
        "measurement averaged; LDS = Spearman correlation per query between the measured value "
        "and the value the scores predict for each subset, mean over queries"
        + (
            f"; LOO over {cfg.loo_examples} retrains without one example"
            if cfg.loo_examples
            else ""
        )
        + ". "
        + _SE_NOTE,
    ]
    return _finish(
        rows,
        settings,
        cfg.output,
        title=f"traintrace evaluate — which estimator to trust on {cfg.model}",
        paragraphs=paragraphs,
        time_label="time for fit + score (s, log scale)",
    )
