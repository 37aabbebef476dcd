"""``traintrace forensics``: plant training-set attacks on digits, then find, explain and undo them.

The scenario (Hammoudeh & Lowd, CCS 2022, on scikit-learn's 8×8 digits and a small MLP):

1. **Backdoor** — a 4-pixel trigger in the always-blank left column is stamped on
   ``backdoor_poison`` training images of a source class, relabelled to a target class. The
   target is a held-out test image of the source class carrying the trigger.
2. **Targeted label flip** — the ``flip_poison`` training images nearest (in pixel space) to
   one chosen test image, of its class, are relabelled to the class the model likes second
   best; the poison count grows until the test image's prediction flips.

For each attack and seed, and for each estimator row (raw TracIn, GAS, layer-wise GAS, raw and
renormalized influence functions...): the rank of the true target among ``n_candidates`` test
images by :func:`~traintrace.applications.forensics.identify_targets`, the AUROC of the anomaly
score (targets vs. every non-target candidate, including all candidates of a model trained
without the attack), the attack set's precision/recall at the robust cut, and the recall at
zero clean false positives (the share of attack examples ranked above the first clean one).
Finally the primary estimator's (RIF's) attack set of the top-ranked suspect is removed and the
model retrained (:func:`~traintrace.applications.forensics.mitigate`) — and, when the top suspect
is not the target, the target's own attack set too.

Everything goes to ``<output>/report.html`` and ``<output>/results.json``.

Estimator rows are ``(name, factory)`` pairs, ``factory(model, checkpoints) -> estimator``; a
factory raising ``TypeError`` or :class:`~traintrace.ConfigurationError` (a keyword this
version does not accept) is skipped with a note, so new renormalized variants slot in.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.applications.forensics import (
    MitigationResult,
    TargetReport,
    identify_targets,
    mitigate,
)
from traintrace.exceptions import ConfigurationError
from traintrace.methods.base import Estimator

__all__ = [
    "ForensicsConfig",
    "ForensicsResult",
    "add_parser",
    "default_estimators",
    "run",
    "run_forensics",
]

Factory = Callable[[nn.Module, list[tt.Checkpoint]], Estimator]
TRIGGER_PIXELS = ((1, 0), (3, 0), (5, 0), (7, 0))  # column 0 is blank in >99% of digits


# -- model, data and attacks ---------------------------------------------------------------------


class MLP(nn.Module):
    """64 → hidden → 10 with ReLU: small enough for exact influence functions."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def stamp_trigger(images: Tensor) -> Tensor:
    """A copy of ``images`` ``[..., 8, 8]`` with the trigger pixels set to full ink (1.0)."""
    out = images.clone()
    for r, c in TRIGGER_PIXELS:
        out[..., r, c] = 1.0
    return out


class Trainer:
    """Picklable ``train_fn(indices, seed) -> model`` (SGD with momentum, fixed schedule).

    ``checkpoints(indices, seed)`` also returns the states saved at ``n_checkpoints`` evenly
    spaced epochs with the learning rate, for TracIn.
    """

    def __init__(
        self, x: Tensor, y: Tensor, *, hidden: int, epochs: int, lr: float, n_checkpoints: int
    ) -> None:
        self.x, self.y = x, y
        self.hidden, self.epochs, self.lr, self.n_checkpoints = hidden, epochs, lr, n_checkpoints

    def checkpoints(self, indices: np.ndarray, seed: int) -> tuple[MLP, list[tt.Checkpoint]]:
        torch.manual_seed(seed)
        model = MLP(self.hidden)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        x, y = self.x[torch.as_tensor(indices)], self.y[torch.as_tensor(indices)]
        save = set(
            np.linspace(self.epochs / self.n_checkpoints, self.epochs, self.n_checkpoints)
            .round()
            .astype(int)
        )
        ckpts = []
        for epoch in range(1, self.epochs + 1):
            model.train()
            for batch in torch.randperm(len(y), generator=gen).split(32):
                opt.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
            if epoch in save:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                ckpts.append(tt.Checkpoint(state, lr=self.lr, name=f"epoch {epoch}"))
        model.eval()
        return model, ckpts

    def __call__(self, indices: np.ndarray, seed: int) -> MLP:
        return self.checkpoints(indices, seed)[0]


@dataclass
class Attack:
    """One planted attack: the poisoned training labels/images and the target."""

    kind: str
    x_train: Tensor
    y_train: Tensor
    poison: np.ndarray  # training indices that were changed
    target_x: Tensor  # [1, 1, 8, 8] the targeted input as the attacker presents it
    clean_label: int  # its true class
    adversarial_label: int  # the class the attacker wants
    target_test_index: int  # position in the test set it comes from
    description: str


def load_digits_split(seed: int, n_train: int | None = None):
    """Digits scaled to [0, 1], a stratified 75/25 split (``n_train`` caps the training set)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    i_tr, i_te = train_test_split(
        np.arange(len(y)), test_size=0.25, stratify=d.target, random_state=seed
    )
    if n_train is not None:
        i_tr = i_tr[:n_train]
    return x[i_tr], y[i_tr], x[i_te], y[i_te]


def plant_backdoor(x_tr, y_tr, x_te, y_te, poison: int, rng: np.random.Generator) -> Attack:
    target_cls = int(rng.integers(10))
    source = int((target_cls + rng.integers(1, 10)) % 10)
    pool = np.flatnonzero(y_tr.numpy() == source)
    if len(pool) < poison:
        raise ConfigurationError(
            f"backdoor_poison={poison} exceeds the {len(pool)} training images of class {source}"
        )
    idx = np.sort(rng.choice(pool, poison, replace=False))
    x, y = x_tr.clone(), y_tr.clone()
    x[idx] = stamp_trigger(x[idx])
    y[idx] = target_cls
    test_pool = np.flatnonzero(y_te.numpy() == source)
    ti = int(rng.choice(test_pool))
    return Attack(
        "backdoor",
        x,
        y,
        idx,
        stamp_trigger(x_te[ti : ti + 1]),
        source,
        target_cls,
        ti,
        f"{poison} training images of class {source} stamped with a 4-pixel trigger and "
        f"relabelled {target_cls}; target: test image #{ti} (a {source}) with the trigger",
    )


def plant_label_flip(
    x_tr,
    y_tr,
    x_te,
    y_te,
    clean_model: nn.Module,
    trainer_args: dict,
    seed: int,
    counts: Sequence[int],
    rng,
) -> tuple[Attack, MLP, list[tt.Checkpoint]]:
    """Flip the labels of the target's nearest same-class neighbours until its prediction flips.

    The target is one of up to 4 random test images the clean model classifies correctly; the
    adversarial label is the clean model's second choice for it; ``counts`` are tried in order.
    """
    with torch.no_grad():
        logits = clean_model(x_te)
    correct = np.flatnonzero((logits.argmax(1) == y_te).numpy())
    tried = []
    for ti in rng.permutation(correct)[:4].tolist():
        src = int(y_te[ti])
        adv = int(logits[ti].topk(2).indices[1])
        same = np.flatnonzero(y_tr.numpy() == src)
        dist = ((x_tr[same] - x_te[ti]).flatten(1) ** 2).sum(1).numpy()
        near = same[np.argsort(dist, kind="stable")]
        for count in counts:
            idx = np.sort(near[:count])
            y = y_tr.clone()
            y[idx] = adv
            model, ckpts = Trainer(x_tr, y, **trainer_args).checkpoints(np.arange(len(y)), seed)
            with torch.no_grad():
                pred = int(model(x_te[ti : ti + 1]).argmax())
            tried.append((ti, count, pred))
            if pred == adv:
                attack = Attack(
                    "label flip",
                    x_tr.clone(),
                    y,
                    idx,
                    x_te[ti : ti + 1].clone(),
                    src,
                    adv,
                    ti,
                    f"the {count} training {src}s nearest to test image #{ti} (a {src}) "
                    f"relabelled {adv}",
                )
                return attack, model, ckpts
    raise ConfigurationError(
        f"the label-flip attack did not succeed for any tried (test image, poison count, "
        f"prediction): {tried}; raise flip_poison"
    )


# -- estimators ----------------------------------------------------------------------------------


def _if(model, ckpts, hessian: str = "exact", **kw) -> Estimator:
    """Influence functions at the last checkpoint: exact damped Gauss–Newton, or EK-FAC."""
    if hessian == "ekfac":
        return tt.InfluenceFunction(
            model,
            tt.Classification(),
            ckpts[-1],
            hessian=tt.EKFAC(),
            damping=0.01,
            progress=False,
            **kw,
        )
    return tt.InfluenceFunction(
        model,
        tt.Classification(),
        ckpts[-1],
        hessian="exact",
        curvature="ggn",
        damping=0.01,
        progress=False,
        **kw,
    )


def default_estimators(
    quick: bool = False, hessian: Literal["ekfac", "exact"] = "ekfac"
) -> list[tuple[str, Factory]]:
    """The estimator rows of the scenario: raw and renormalized TracIn and influence functions.

    The renormalized rows use the estimators' ``normalize=`` / ``layerwise=`` keywords (GAS:
    ``"cosine"``; renormalized influence: ``"train"``).
    ``hessian``: the influence functions' curvature — EK-FAC (default, a fraction of a second)
    or the exact damped Gauss–Newton matrix (``O(P)`` passes over the data: ~10 s per fit here).
    ``quick``: raw TracIn, GAS and RIF only.
    """
    task = tt.Classification()

    def tracin(**kw) -> Factory:
        return lambda model, ckpts: tt.TracIn(model, task, ckpts, progress=False, **kw)

    def inf(**kw) -> Factory:
        return lambda model, ckpts: _if(model, ckpts, hessian, **kw)

    curv = "EK-FAC" if hessian == "ekfac" else "exact GGN"
    raw_tracin = ("TracIn (raw)", tracin())
    gas = ("GAS (cosine TracIn)", tracin(normalize="cosine"))
    rif = (f"RIF ({curv})", inf(normalize="train"))
    if quick:
        return [raw_tracin, gas, rif]
    return [
        raw_tracin,
        gas,
        ("layer-wise GAS", tracin(normalize="cosine", layerwise=True)),
        ("renormalized TracIn", tracin(normalize="train")),
        (f"IF (raw, {curv})", inf()),
        rif,
        (f"layer-wise RIF ({curv})", inf(normalize="train", layerwise=True)),
    ]


def build_or_skip(name: str, factory: Factory, model, ckpts, notes: list[str]) -> Any:
    """``factory(model, ckpts)``, or ``None`` with a note when this version lacks a keyword."""
    try:
        return factory(model, ckpts)
    except (TypeError, ConfigurationError) as exc:
        note = f"skipped {name!r}: {type(exc).__name__}: {exc}"
        if note not in notes:
            notes.append(note)
        return None


# -- the scenario --------------------------------------------------------------------------------


@dataclass
class ForensicsConfig:
    """Settings of the scenario (defaults: the figures reported in the issue)."""

    output: Path = Path("forensics-output")
    seeds: tuple[int, ...] = (0, 1)
    n_candidates: int = 100
    n_train: int | None = None  # cap on training images (None: all 1,347)
    backdoor_poison: int = 30
    flip_poison: tuple[int, ...] = (10, 20, 30)
    hidden: int = 32
    epochs: int = 30
    checkpoints: int = 5
    lr: float = 0.05
    hessian: Literal["ekfac", "exact"] = "ekfac"  # curvature of the influence functions
    primary: str = "RIF"  # rows whose name starts with this supply the removed attack set
    mitigate: bool = True
    quick: bool = False
    progress: bool = True

    @classmethod
    def quick_config(cls, **kw: Any) -> ForensicsConfig:
        """A < 30 s configuration: one seed, 30 candidates, 3 estimator rows."""
        base = dict(seeds=(0,), n_candidates=30, quick=True)
        base.update(kw)
        return cls(**base)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ConfigurationError("seeds must name at least one seed")
        if self.n_candidates < 2:
            raise ConfigurationError(f"n_candidates must be >= 2, got {self.n_candidates}")
        if self.epochs < self.checkpoints or self.checkpoints < 1:
            raise ConfigurationError(
                f"need epochs >= checkpoints >= 1, got epochs={self.epochs}, "
                f"checkpoints={self.checkpoints}"
            )
        if self.backdoor_poison < 1 or not self.flip_poison or min(self.flip_poison) < 1:
            raise ConfigurationError(
                f"poison counts must be positive: backdoor_poison={self.backdoor_poison}, "
                f"flip_poison={self.flip_poison}"
            )


@dataclass
class RowResult:
    """One estimator on one attack and seed."""

    estimator: str
    attack: str
    seed: int
    target_rank: int
    target_score: float
    candidate_scores: list[float]  # non-target candidates of the attacked model
    clean_scores: list[float]  # every candidate of the model trained without the attack
    attack_set_size: int
    precision: float
    recall: float
    recall_at_zero_fp: float
    seconds: float
    outranked_by: list[int] = field(default_factory=list)  # candidates ranked above the target


@dataclass
class ForensicsResult:
    """What the scenario measured (also in ``results.json`` and the report)."""

    rows: list[RowResult]
    mitigations: list[dict[str, Any]]
    notes: list[str]
    report: Path
    seconds: float
    attacks: list[dict[str, Any]] = field(default_factory=list)

    def aggregate(self) -> list[dict[str, Any]]:
        """Per (attack, estimator): target ranks per seed, AUROC, mean precision/recall."""
        from sklearn.metrics import roc_auc_score

        out = []
        keys = dict.fromkeys((r.attack, r.estimator) for r in self.rows)
        for attack, est in keys:
            rs = [r for r in self.rows if r.attack == attack and r.estimator == est]
            pos = [r.target_score for r in rs]
            neg = [s for r in rs for s in r.candidate_scores + r.clean_scores]
            labels = [1] * len(pos) + [0] * len(neg)
            out.append(
                {
                    "attack": attack,
                    "estimator": est,
                    "ranks": [r.target_rank for r in rs],
                    "auroc": float(roc_auc_score(labels, pos + neg)),
                    "precision": float(np.mean([r.precision for r in rs])),
                    "recall": float(np.mean([r.recall for r in rs])),
                    "recall_at_zero_fp": [round(r.recall_at_zero_fp, 3) for r in rs],
                    "attack_set_size": [r.attack_set_size for r in rs],
                    "seconds": float(np.mean([r.seconds for r in rs])),
                }
            )
        return out

    def table(self) -> str:
        lines = [
            f"{'attack':<11}{'estimator':<27}{'target rank':>13}{'AUROC':>7}{'prec':>6}"
            f"{'recall':>7}{'recall@0FP':>16}{'|set|':>10}"
        ]
        for a in self.aggregate():
            lines.append(
                f"{a['attack']:<11}{a['estimator']:<27}{a['ranks']!s:>13}{a['auroc']:>7.3f}"
                f"{a['precision']:>6.2f}{a['recall']:>7.2f}{a['recall_at_zero_fp']!s:>16}"
                f"{a['attack_set_size']!s:>10}"
            )
        for m in self.mitigations:
            lines.append(
                f"mitigation [{m['attack']}, seed {m['seed']}, {m['estimator']}, top suspect is "
                f"target: {m['top_is_target']}, removing the {m['removed_set_of']}'s attack set "
                f"({m['removed_planted']} planted)]: {m['summary']}"
            )
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"whole scenario: {self.seconds:.1f} s; report: {self.report}")
        return "\n".join(lines)


def _recall_at_zero_fp(row: Tensor, poison: np.ndarray) -> float:
    order = torch.argsort(row, descending=True, stable=True).numpy()
    is_poison = np.zeros(len(row), dtype=bool)
    is_poison[poison] = True
    clean_at = np.flatnonzero(~is_poison[order])
    first_clean = int(clean_at[0]) if len(clean_at) else len(order)
    return first_clean / len(poison)


def _candidates(attack: Attack, x_te: Tensor, n: int, rng) -> tuple[Tensor, list[int]]:
    """The target first, then ``n − 1`` other test images (random, fixed by the seed)."""
    others = [i for i in rng.permutation(len(x_te)).tolist() if i != attack.target_test_index]
    chosen = others[: n - 1]
    return torch.cat([attack.target_x, x_te[chosen]]), chosen


def run_forensics(
    cfg: ForensicsConfig | None = None, estimators: Sequence[tuple[str, Factory]] | None = None
) -> ForensicsResult:
    """Run the scenario, write ``report.html`` and ``results.json``; return the figures."""
    cfg = cfg or ForensicsConfig()
    rows_spec = (
        list(estimators) if estimators is not None else default_estimators(cfg.quick, cfg.hessian)
    )
    t0 = time.perf_counter()
    notes: list[str] = []
    rows: list[RowResult] = []
    mitigations: list[dict[str, Any]] = []
    shown: list[dict[str, Any]] = []
    targs = dict(hidden=cfg.hidden, epochs=cfg.epochs, lr=cfg.lr, n_checkpoints=cfg.checkpoints)
    # the primary row (its attack set is removed for mitigation): the first row whose name
    # starts with cfg.primary
    primary_names = [n for n, _ in rows_spec if n.startswith(cfg.primary)] or [rows_spec[-1][0]]
    for seed in cfg.seeds:
        x_tr, y_tr, x_te, y_te = load_digits_split(seed, cfg.n_train)
        everything = np.arange(len(y_tr))
        clean_model, clean_ckpts = Trainer(x_tr, y_tr, **targs).checkpoints(everything, seed)
        clean_fitted: dict[str, Estimator] = {}
        clean_train = TensorDataset(x_tr, y_tr)
        for kind in ("backdoor", "label flip"):
            rng = np.random.default_rng([seed, 0 if kind == "backdoor" else 1])
            if kind == "backdoor":
                attack = plant_backdoor(x_tr, y_tr, x_te, y_te, cfg.backdoor_poison, rng)
                model, ckpts = Trainer(attack.x_train, attack.y_train, **targs).checkpoints(
                    everything, seed
                )
            else:
                attack, model, ckpts = plant_label_flip(
                    x_tr, y_tr, x_te, y_te, clean_model, targs, seed, cfg.flip_poison, rng
                )
            cand_x, others = _candidates(attack, x_te, cfg.n_candidates, rng)
            candidates = TensorDataset(cand_x, torch.zeros(len(cand_x), dtype=torch.long))
            train = TensorDataset(attack.x_train, attack.y_train)
            with torch.no_grad():
                target_pred = int(model(attack.target_x).argmax())
                accuracy = float((model(x_te).argmax(1) == y_te).float().mean())
                changed = (model(cand_x).argmax(1) != clean_model(cand_x).argmax(1)).nonzero()
            cand_y = torch.cat([torch.tensor([attack.clean_label]), y_te[others]])
            with torch.no_grad():
                wrong = (model(cand_x).argmax(1) != cand_y).nonzero()
            info = {
                "attack": kind,
                "seed": seed,
                "description": attack.description,
                "target_prediction": target_pred,
                "clean_label": attack.clean_label,
                "adversarial_label": attack.adversarial_label,
                "clean_accuracy": accuracy,
                "n_poison": len(attack.poison),
                # candidates whose prediction the attack changed (collateral victims) and
                # candidates the attacked model gets wrong
                "changed_by_attack": changed.flatten().tolist(),
                "misclassified": wrong.flatten().tolist(),
            }
            reports: dict[str, TargetReport] = {}
            for name, factory in rows_spec:
                t1 = time.perf_counter()
                est = build_or_skip(name, factory, model, ckpts, notes)
                if est is None:
                    continue
                est.fit(train)
                rep = identify_targets(est, candidates)
                target_row = est.score(TensorDataset(attack.target_x, torch.tensor([target_pred])))[
                    0
                ]
                seconds = time.perf_counter() - t1
                if name not in clean_fitted:  # fitted once per seed, shared by both attacks
                    clean_est = build_or_skip(name, factory, clean_model, clean_ckpts, notes)
                    clean_fitted[name] = clean_est.fit(clean_train)
                clean_rep = identify_targets(clean_fitted[name], candidates)
                found = rep.attack_set(0).numpy()
                hits = np.isin(found, attack.poison)
                rows.append(
                    RowResult(
                        estimator=name,
                        attack=kind,
                        seed=seed,
                        target_rank=rep.rank_of(0),
                        target_score=float(rep.scores[0]),
                        candidate_scores=rep.scores[1:].tolist(),
                        clean_scores=clean_rep.scores.tolist(),
                        attack_set_size=len(found),
                        precision=float(hits.mean()) if len(found) else 0.0,
                        recall=float(hits.sum() / len(attack.poison)),
                        recall_at_zero_fp=_recall_at_zero_fp(target_row, attack.poison),
                        seconds=seconds,
                        outranked_by=rep.ranking[: rep.rank_of(0) - 1].tolist(),
                    )
                )
                reports[name] = rep
            available = [n for n in primary_names if n in reports]
            primary = available[0] if available else ""
            if cfg.mitigate and primary in reports:
                rep = reports[primary]
                top = int(rep.ranking[0])
                # what a defender does: remove the top suspect's attack set; and, when the top
                # suspect is not the target, what removing the target's own attack set does
                for position in dict.fromkeys([top, 0]):
                    result = mitigate(
                        Trainer(attack.x_train, attack.y_train, **targs),
                        rep.attack_set(position),
                        TensorDataset(attack.target_x, torch.tensor([attack.clean_label])),
                        n_train=len(attack.y_train),
                        clean_test=TensorDataset(x_te, y_te),
                        task=tt.Classification(),
                        seeds=(seed,),
                    )
                    record = _mitigation_record(kind, seed, primary, position, result)
                    record["top_is_target"] = top == 0
                    record["removed_set_of"] = "target" if position == 0 else "top suspect"
                    record["removed_planted"] = int(
                        np.isin(result.removed.numpy(), attack.poison).sum()
                    )
                    mitigations.append(record)
            if primary in reports:
                rep = reports[primary]
                shown.append(
                    {
                        **info,
                        "attack_obj": attack,
                        "found": rep.attack_set(0).numpy(),
                        "z": rep.tail_z(0).numpy(),
                        "rank": rep.rank_of(0),
                        "top": int(rep.ranking[0]),
                        "candidates": cand_x,
                        "labels": rep.labels,
                        "primary": primary,
                        "outranked_by": rep.ranking[: rep.rank_of(0) - 1].tolist(),
                    }
                )
            else:
                shown.append({**info, "attack_obj": attack})
            if cfg.progress:
                print(
                    f"[seed {seed}] {kind}: target predicted {target_pred} "
                    f"(clean {attack.clean_label}), accuracy {accuracy:.1%}, "
                    f"{time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
    seconds = time.perf_counter() - t0
    cfg.output.mkdir(parents=True, exist_ok=True)
    result = ForensicsResult(rows, mitigations, notes, cfg.output / "report.html", seconds)
    result.attacks = [
        {k: v for k, v in s.items() if k in _JSON_KEYS and not isinstance(v, (Tensor, Attack))}
        for s in shown
    ]
    _write_report(cfg, result, shown)
    payload = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "aggregate": result.aggregate(),
        "rows": [asdict(r) for r in rows],
        "mitigations": mitigations,
        "attacks": result.attacks,
        "notes": notes,
        "seconds": seconds,
    }
    (cfg.output / "results.json").write_text(json.dumps(payload, indent=2, default=_jsonable))
    return result


_JSON_KEYS = {
    "attack",
    "seed",
    "description",
    "target_prediction",
    "clean_label",
    "adversarial_label",
    "clean_accuracy",
    "n_poison",
    "rank",
    "top",
    "changed_by_attack",
    "misclassified",
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, Tensor)):
        return value.tolist()
    return str(value)


def _mitigation_record(
    kind: str, seed: int, estimator: str, top: int, result: MitigationResult
) -> dict[str, Any]:
    return {
        "attack": kind,
        "seed": seed,
        "estimator": estimator,
        "top_is_target": top == 0,
        "removed": len(result.removed),
        "before": result.before.tolist(),
        "after": result.after.tolist(),
        "clean_label": result.clean_label.tolist(),
        "restored": result.restored,
        "attack_effective": result.attack_effective,
        "accuracy_before": result.accuracy_before,
        "accuracy_after": result.accuracy_after,
        "summary": result.summary(),
    }


# -- the report ----------------------------------------------------------------------------------


def _write_report(cfg: ForensicsConfig, result: ForensicsResult, shown) -> Path:
    from traintrace.interfaces.report import Card, HTMLReport, image_png

    rep = HTMLReport("traintrace forensics — which prediction was attacked, and by whom?")
    rep.paragraph(
        "Two training-set attacks planted on scikit-learn's digits (an MLP 64-"
        f"{cfg.hidden}-10, {cfg.epochs} epochs, {cfg.checkpoints} checkpoints; seeds "
        f"{list(cfg.seeds)}). For every estimator: the rank of the true target among "
        f"{cfg.n_candidates} candidate test images (anomaly score: robust z of the k-th largest "
        "influence against the candidate's upper tail), the AUROC of that score (targets vs. "
        "every other candidate, including those of a model trained without the attack), the "
        "attack set's precision and recall at the robust cut, and the recall at zero clean "
        "false positives. Positive influence = the training image helps the prediction."
    )

    def img(x: Tensor, alt: str) -> str:
        return f'<img src="{image_png(x.reshape(8, 8).numpy())}" alt="{alt}">'

    trigger = torch.zeros(8, 8)
    for r, c in TRIGGER_PIXELS:
        trigger[r, c] = 1.0
    rep.heading("Results", anchor="results")
    agg = result.aggregate()
    rep.table(
        [
            "attack",
            "estimator",
            "target rank per seed",
            "AUROC",
            "precision",
            "recall",
            "recall @0 FP",
            "|attack set|",
        ],
        [
            [
                a["attack"],
                a["estimator"],
                a["ranks"],
                f"{a['auroc']:.3f}",
                f"{a['precision']:.2f}",
                f"{a['recall']:.2f}",
                a["recall_at_zero_fp"],
                a["attack_set_size"],
            ]
            for a in agg
        ],
    )
    if result.mitigations:
        rep.heading("Mitigation: remove an attack set and retrain (same seed before and after)")
        rep.table(
            [
                "attack",
                "seed",
                "estimator",
                "top suspect = target",
                "attack set removed",
                "removed (planted)",
                "target before → after (clean)",
                "restored",
                "clean accuracy before → after",
            ],
            [
                [
                    m["attack"],
                    m["seed"],
                    m["estimator"],
                    m["top_is_target"],
                    m["removed_set_of"],
                    f"{m['removed']} ({m['removed_planted']})",
                    f"{m['before'][0]} → {m['after'][0]} ({m['clean_label'][0]})",
                    m["restored"],
                    f"{m['accuracy_before']:.1%} → {m['accuracy_after']:.1%}",
                ]
                for m in result.mitigations
            ],
        )
    for s in shown:
        attack: Attack = s["attack_obj"]
        rep.heading(f"{attack.kind}, seed {s['seed']}")
        rep.paragraph(
            f"{attack.description}. The attacked model predicts {s['target_prediction']} for the "
            f"target (clean label {attack.clean_label}); clean test accuracy "
            f"{s['clean_accuracy']:.1%}."
        )
        cards = [
            Card(
                img(attack.target_x, "target"),
                ["target", f"pred {s['target_prediction']}"],
                True,
                True,
            )
        ]
        if attack.kind == "backdoor":
            cards.append(Card(img(trigger, "trigger"), ["the trigger"], big=True))
        rows = [("target", cards)]
        if "found" in s:
            found, z = s["found"], s["z"]
            rep.paragraph(
                f"{s['primary']}: the target ranks {s['rank']} of {len(s['candidates'])}; its attack "
                f"set at the robust cut has {len(found)} images, "
                f"{int(np.isin(found, attack.poison).sum())} of the {len(attack.poison)} planted "
                "(red = planted).",
                note=True,
            )
            found_cards = [
                Card(
                    img(attack.x_train[int(i)], f"train {int(i)}"),
                    [f"#{int(i)} label {int(attack.y_train[int(i)])}", f"z {float(v):.1f}"],
                    bool(np.isin(int(i), attack.poison)),
                )
                for i, v in zip(found[:40], z[:40], strict=True)
            ]
            rows.append((f"recovered ({len(found)})", found_cards))
            missed = [int(i) for i in attack.poison if int(i) not in set(found.tolist())]
            if missed:
                rows.append(
                    (
                        f"missed ({len(missed)})",
                        [
                            Card(img(attack.x_train[i], f"train {i}"), [f"#{i}"])
                            for i in missed[:20]
                        ],
                    )
                )
        above = s.get("outranked_by", [])
        if above:
            changed, wrong = set(s["changed_by_attack"]), set(s["misclassified"])
            rows.append(
                (
                    f"ranked above the target ({len(above)})",
                    [
                        Card(
                            img(s["candidates"][p], f"candidate {p}"),
                            [
                                f"candidate {p}",
                                f"explained as {int(s['labels'][p])}",
                                "changed by the attack"
                                if p in changed
                                else ("misclassified" if p in wrong else "clean, correct"),
                            ],
                            p in changed,
                        )
                        for p in above[:10]
                    ],
                )
            )
        rep.gallery(rows)
    for note in result.notes:
        rep.paragraph(note, note=True)
    rep.paragraph(f"Whole scenario: {result.seconds:.1f} s.", note=True)
    return rep.save(result.report)


# -- command line --------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``forensics`` subcommand to ``traintrace``'s subparsers."""
    p = subparsers.add_parser(
        "forensics",
        help="plant a backdoor and a targeted label flip on digits; identify the target, "
        "recover the attack set with raw vs renormalized influence, remove it and retrain",
    )
    p.add_argument("--output", default="forensics-output", help="folder for the report")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (one run each)")
    p.add_argument("--candidates", type=int, default=100, help="candidate test images")
    p.add_argument("--quick", action="store_true", help="a small configuration (< 30 s)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``traintrace forensics``."""
    kw = dict(output=Path(args.output), progress=not args.quiet)
    if args.quick:
        cfg = ForensicsConfig.quick_config(**kw)
    else:
        cfg = ForensicsConfig(seeds=tuple(args.seeds), n_candidates=args.candidates, **kw)
    print(run_forensics(cfg).table())
    return 0
