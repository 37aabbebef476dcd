"""Does the Laplace-evidence damping track leave-one-out better than the spectrum heuristic?

The model and ground truth of ``traintrace evaluate`` (an MLP 64→24→10 trained by full-batch
gradient descent on 300 digits with 10% flipped labels, weight decay 1e-3; leave-one-out retrains
of 32 examples; LDS over 64 half-size subsets). For a grid of dampings λ, exact influence
functions with the Gauss–Newton matrix and with the Hessian, ``(C + λI)``, are scored against
the retrains; the rows chosen by the spectrum heuristic (``max(weight decay,
tt.spectrum(...).suggested_damping)``), by the weight decay, and by the linearized-Laplace
evidence (``tt.select_damping(..., curvature="ggn")``) are marked. Measured in one run:

    .venv/bin/python benchmarks/damping_evidence.py [--seeds 0 1] [--grid 12]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.curvature import LaplaceEvidence
from traintrace.interfaces.evaluate import DigitsMLPTrainer, EvaluateConfig, _digits


def _scores(model, task, final, train, queries, curvature: str, damping: float):
    est = tt.InfluenceFunction(
        model, task, final, hessian=tt.Exact(), curvature=curvature, damping=damping, progress=False
    )
    return est.fit(train).score(queries).double()


def run(seed: int, grid: int, cache: str) -> None:
    cfg = EvaluateConfig(seed=seed, progress=False, workers=1)
    x_train, y_train, _, x_query, y_query = _digits(cfg)
    train, queries = TensorDataset(x_train, y_train), TensorDataset(x_query, y_query)
    task = tt.Classification()
    trainer = DigitsMLPTrainer(x_train, y_train, cfg)
    model = trainer.model(0)
    final = trainer.trace(model, cfg.checkpoints)[-1]
    retrainer = tt.Retrainer(
        trainer,
        tt.query_measurement(task, queries),
        executor=None,
        cache_dir=f"{cache}/seed{seed}",
        experiment=f"damping-evidence-{seed}",
        progress=False,
    )
    n = len(train)
    loo_idx = np.random.default_rng([seed, 7]).choice(n, cfg.loo_examples, replace=False)
    actual = tt.LeaveOneOut(retrainer, n, indices=loo_idx).fit().score()[:, loo_idx]
    subsets = tt.evaluate.SubsetMeasurements.compute(
        retrainer, n, num_subsets=cfg.lds_subsets, alpha=0.5, seed=seed
    )

    spec = tt.spectrum(model, task, final, train, top=4, density=False, progress=False)
    spectrum_damping = max(cfg.weight_decay, spec.suggested_damping)
    start = time.perf_counter()
    evidence = LaplaceEvidence.compute(model, task, final, train, curvature="ggn", progress=False)
    selection = evidence.select()
    evidence_seconds = time.perf_counter() - start
    marks = {
        spectrum_damping: "spectrum",
        cfg.weight_decay: "weight decay",
        selection.damping: "evidence",
    }
    lams = sorted(set(np.logspace(-4, 1, grid).tolist()) | set(marks))
    print(
        f"\nseed {seed}: P={evidence.num_parameters}, n={n}; spectrum λ_min {spec.min_eigenvalue:.4g},"
        f" λ_max {float(spec.top_eigenvalues[0]):.4g}; evidence search "
        f"[{selection.bounds[0]:.3g}, {selection.bounds[1]:.3g}] in {evidence_seconds:.1f}s "
        f"(γ = {selection.effective_parameters:.1f} effective parameters)"
    )
    head = (
        f"{'damping λ':>11}{'log Z(λ)':>11}{'GGN LOO r':>11}{'ρ':>7}{'LDS':>7}"
        f"{'Hess LOO r':>12}{'ρ':>7}{'LDS':>7}  chosen by"
    )
    print(head)
    print("-" * len(head))
    for lam in lams:
        cells = []
        for curvature in ("ggn", "hessian"):
            try:
                scores = _scores(model, task, final, train, queries, curvature, lam)
            except tt.NotPositiveDefiniteError:
                cells.append(f"{'not PD':>{11 if curvature == 'ggn' else 12}}{'':>14}")
                continue
            loo = tt.evaluate.loo_correlation(scores[:, loo_idx], actual)
            lds = subsets.lds(scores).score
            width = 11 if curvature == "ggn" else 12
            cells.append(f"{loo.pearson:>{width}.3f}{loo.spearman:>7.3f}{lds:>7.3f}")
        z = float(evidence(lam))
        print(f"{lam:>11.4g}{z:>11.1f}{''.join(cells)}  {marks.get(lam, '')}")
    if not math.isfinite(selection.log_evidence):
        raise SystemExit("non-finite evidence")

    # the two cheaper log-determinants: stochastic Lanczos quadrature on the GGN, and the
    # Kronecker eigenvalues of EK-FAC (the config of evaluate's "IF EK-FAC" row)
    start = time.perf_counter()
    slq = LaplaceEvidence.compute(
        model, task, final, train, curvature="ggn", method="slq", progress=False
    ).select()
    slq_seconds = time.perf_counter() - start
    print(
        f"SLQ (20 probes × 60 steps): λ = {slq.damping:.4g} ({slq.damping / selection.damping:.2f}"
        f"× the exact one), log Z there {float(evidence(slq.damping)):.1f} (exact optimum "
        f"{selection.log_evidence:.1f}), {slq_seconds:.1f}s"
    )
    config = tt.EKFAC(sampled_labels=False)
    kron = LaplaceEvidence.compute(model, task, final, train, curvature=config, progress=False)
    kron_sel = kron.select()
    for label, lam in (("weight decay", cfg.weight_decay), ("EK-FAC evidence", kron_sel.damping)):
        est = tt.InfluenceFunction(
            model, task, final, hessian=tt.EKFAC(sampled_labels=False, damping=lam), progress=False
        )
        scores = est.fit(train).score(queries).double()
        loo = tt.evaluate.loo_correlation(scores[:, loo_idx], actual)
        print(
            f"IF EK-FAC at λ = {lam:.4g} ({label}): LOO r {loo.pearson:.3f}, ρ {loo.spearman:.3f}, "
            f"LDS {subsets.lds(scores).score:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--grid", type=int, default=11)
    parser.add_argument("--cache", default=None, help="retrain cache folder (default: temporary)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            run(seed, args.grid, args.cache or tmp)


if __name__ == "__main__":
    main()
