"""Training-set attack forensics (Hammoudeh & Lowd, "Identifying a Training-Set Attack's Target
Using Renormalized Influence Estimation", CCS 2022).

Given a model that may have been poisoned or backdoored:

1. :func:`identify_targets` — which test predictions were *targeted*? The target of a poisoning
   or backdoor attack owes its prediction to a small set of training examples, so its influence
   vector over the training set has an anomalously heavy upper tail: a few examples far above
   the rest. Every candidate gets an anomaly score of that tail (a robust z-score, defined
   below); the ranking puts the most suspicious first.
2. :meth:`TargetReport.attack_set` — which training examples did it? The training examples in a
   candidate's anomalous tail, chosen by the same robust cut (not a fixed ``k``).
3. :func:`mitigate` — remove them, retrain through :class:`~traintrace.Retrainer`, and check
   that the target's prediction returns to its clean label and what clean accuracy it costs.

Use a *renormalized* estimator (GAS: ``TracIn(..., normalize=True)``; renormalized influence
functions): raw estimators are dominated by training examples with large gradient norms (hard
and mislabeled examples), which then top every candidate's influence vector and hide the attack.

Sign convention: positive influence = the training example *helps* the candidate's prediction;
score matrices are ``[n_candidates, n_train]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from traintrace.data import as_loader, dataset_length, iterate_batches
from traintrace.exceptions import ConfigurationError
from traintrace.methods.base import Estimator
from traintrace.methods.retraining import Retrainer, query_predictions
from traintrace.task import Task

__all__ = [
    "MitigationResult",
    "TargetReport",
    "identify_targets",
    "mitigate",
    "robust_tail",
]

#: ``1 / Φ⁻¹(3/4)``: scales the median absolute deviation to the standard deviation of a normal.
MAD_TO_SIGMA = 1.482602218505602
#: ``√(π/2)``: scales the mean absolute deviation to the standard deviation of a normal.
_MEANAD_TO_SIGMA = math.sqrt(math.pi / 2)


# -- the robust tail statistic -------------------------------------------------------------------


def _tail_size(n: int, tail_fraction: float, k: int) -> int:
    return min(n, max(math.ceil(tail_fraction * n), 2 * k, 10))


def robust_tail(
    influence: Tensor | np.ndarray,
    *,
    tail_fraction: float = 0.1,
    k: int = 5,
    threshold: float = 3.5,
) -> tuple[float, np.ndarray, np.ndarray]:
    """The anomaly score and anomalous tail of one influence vector ``s`` over ``n`` examples.

    Definition (all in float64):

    1. ``U`` = the ``m`` largest values of ``s`` with ``m = min(n, max(⌈tail_fraction·n⌉, 2k,
       10))`` — the candidate's *upper tail*: the training examples that support its prediction
       at all (for a classifier, roughly its class).
    2. Robust location and scale of ``U``: ``med = median(U)``,
       ``σ = 1.4826 · median(|U − med|)`` (the MAD, scaled to a normal's standard deviation);
       if that is 0 (ties), ``σ = √(π/2) · mean(|U − med|)``.
    3. Robust z-scores ``z_i = (s_i − med) / σ`` for the examples in ``U``.
    4. **Anomaly score** = ``z`` of the ``k``-th largest value of ``s``: large when at least
       ``k`` training examples stand far above the candidate's own supporting tail.
    5. **Anomalous tail** (the suspected attack set) = ``{i ∈ U : z_i > threshold}``, largest
       first.

    Why the upper tail and not the whole vector: most of a classifier's influence vector is
    examples of other classes near zero, so against the whole vector *every* candidate's own
    class looks like an outlier. Against its own upper tail, a clean candidate's top examples
    are ordinary (z ≈ 2–3 for a normal-shaped tail), while a target's few dozen attack examples
    stand many MADs above it. The statistic is invariant to shifting and positively scaling
    ``s``, so candidates are comparable. The cut assumes the attack set is smaller than half
    of ``U`` (``tail_fraction · n / 2`` examples); raise ``tail_fraction`` for larger attacks.
    ``threshold=3.5`` is Iglewicz & Hoaglin's customary cut for modified z-scores.

    Returns:
        ``(score, indices, z)``: the anomaly score (``0.0`` when ``U`` has no spread at all),
        the tail's training indices ``[t]`` int64 (descending influence) and their z-scores.
    """
    s = np.asarray(
        influence.detach().cpu().double().numpy() if isinstance(influence, Tensor) else influence,
        dtype=np.float64,
    ).reshape(-1)
    n = s.size
    if n < k:
        raise ConfigurationError(f"an influence vector of {n} training examples has no top k={k}")
    m = _tail_size(n, tail_fraction, k)
    top = np.argpartition(-s, m - 1)[:m]
    top = top[np.argsort(-s[top], kind="stable")]
    values = s[top]
    med = float(np.median(values))
    dev = np.abs(values - med)
    sigma = MAD_TO_SIGMA * float(np.median(dev))
    if not sigma > 0:
        sigma = _MEANAD_TO_SIGMA * float(dev.mean())
    if not sigma > 0:  # every value in the tail is equal: nothing stands out
        return 0.0, np.zeros(0, dtype=np.int64), np.zeros(0)
    z = (values - med) / sigma
    keep = z > threshold
    return float(z[k - 1]), top[keep].astype(np.int64), z[keep]


# -- target identification -----------------------------------------------------------------------


@dataclass(frozen=True)
class TargetReport:
    """Candidates ranked by how anomalous the upper tail of their influence vector is.

    Attributes:
        scores: ``[n_candidates]`` float64 anomaly score of each candidate (in input order);
            see :func:`robust_tail` for the definition. Larger = more suspicious.
        ranking: ``[n_candidates]`` int64 candidate positions, most suspicious first.
        labels: ``[n_candidates]`` int64 label each candidate was explained with (its predicted
            class by default), or ``None`` for a precomputed score matrix.
        n_train: number of training examples the influence vectors span.
        settings: the ``tail_fraction``, ``k`` and ``threshold`` used.
    """

    scores: Tensor
    ranking: Tensor
    labels: Tensor | None
    n_train: int
    settings: dict[str, float]
    _tails: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)

    def attack_set(self, position: int) -> Tensor:
        """Training indices in candidate ``position``'s anomalous tail, ``[t]`` int64.

        Ordered by decreasing influence; chosen by the robust cut of :func:`robust_tail`
        (``z > threshold`` against the candidate's upper tail), so its size adapts to the
        attack. Empty when nothing stands out. ``position`` indexes the candidates in input
        order (``report.attack_set(int(report.ranking[0]))`` for the top suspect).
        """
        n = len(self._tails)
        if not isinstance(position, (int, np.integer)) or not -n <= position < n:
            raise ConfigurationError(
                f"position must be an integer candidate position in [0, {n}), got {position!r}"
            )
        return torch.from_numpy(self._tails[int(position)][0].copy())

    def tail_z(self, position: int) -> Tensor:
        """The robust z-scores of :meth:`attack_set` (same order), ``[t]`` float64."""
        self.attack_set(position)  # validates
        return torch.from_numpy(self._tails[int(position)][1].copy())

    def rank_of(self, position: int) -> int:
        """1-based rank of candidate ``position`` in :attr:`ranking` (1 = most suspicious)."""
        self.attack_set(position)
        return int((self.ranking == int(position) % len(self._tails)).nonzero()[0, 0]) + 1


class _Relabelled(Dataset):
    """``dataset`` with the label of item ``i`` replaced by ``labels[i]`` (Task.split's formats)."""

    def __init__(self, dataset: Dataset, labels: Tensor, label_key: str) -> None:
        self.dataset = dataset
        self.labels = labels
        self.label_key = label_key

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        y = self.labels[i]
        if isinstance(item, Tensor):
            return item, y
        if isinstance(item, dict):
            return {**item, self.label_key: y}
        if isinstance(item, (tuple, list)):
            return (item[0], y) if len(item) == 1 else (*item[:-1], y)
        raise ConfigurationError(
            f"cannot relabel a candidate of type {type(item).__name__}: candidates must yield a "
            "tensor, a tuple (inputs..., label) or a dict with a label key; or pass "
            "labels='given' with labelled candidates"
        )


class _AtState(nn.Module):
    """``model`` evaluated functionally at ``state`` (the model object is not modified)."""

    def __init__(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        super().__init__()
        self.inner = model
        self.state = state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.inner, self.state, args, kwargs)


def _final_model(estimator: Estimator) -> nn.Module:
    model = getattr(estimator, "model", None)
    checkpoints = getattr(estimator, "checkpoints", None)
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"{type(estimator).__name__} has no .model to predict the candidates' labels with; "
            "pass labels='given' (labelled candidates) or labels=<tensor of classes>"
        )
    if not checkpoints:
        return model
    return _AtState(model, checkpoints[-1].state_for(model))


def _labels_tensor(labels: Any, n: int) -> Tensor:
    out = torch.as_tensor(labels).reshape(-1)
    if out.is_floating_point() or out.numel() != n:
        raise ConfigurationError(
            f"labels must be {n} integer classes (one per candidate), got dtype {out.dtype} and "
            f"{out.numel()} values"
        )
    return out.long()


def _check_matrix(scores: Any) -> Tensor:
    mat = torch.as_tensor(scores)
    if mat.ndim != 2 or mat.shape[0] < 1 or mat.shape[1] < 1:
        raise ConfigurationError(
            f"a precomputed score matrix must be [n_candidates, n_train], got shape "
            f"{tuple(mat.shape)}"
        )
    bad = ~torch.isfinite(mat)
    if bad.any():
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ConfigurationError(
            f"the influence scores contain {int(bad.sum())} non-finite values (first at "
            f"candidate {row}, training example {col}: {float(mat[row, col])}); fix the "
            "estimator (damping, a smaller learning rate) before looking for targets"
        )
    return mat.double()


def identify_targets(
    source: Estimator | Tensor | np.ndarray,
    candidates: Dataset | DataLoader | None = None,
    *,
    labels: Literal["predicted", "given"] | Tensor | Sequence[int] = "predicted",
    tail_fraction: float = 0.1,
    k: int = 5,
    threshold: float = 3.5,
    block_size: int = 256,
) -> TargetReport:
    """Rank candidate test examples by how likely they are the target of a training-set attack.

    For each candidate ``z'`` the estimator's influence vector ``s = score(z')[0] ∈ ℝⁿ`` over the
    training set is summarized by :func:`robust_tail`: the robust z-score (median and MAD of the
    candidate's own upper tail, the top ``⌈tail_fraction·n⌉`` values) of its ``k``-th largest
    influence. A target owes its prediction to a small attack set, which stands many MADs above
    the rest; a clean prediction is supported by many ordinary examples. Sign: positive
    influence = the training example helps the candidate's (labelled) prediction.

    Args:
        source: a fitted estimator (TracIn, InfluenceFunction, ... — prefer a renormalized one:
            ``normalize=True`` / ``"cosine"``), or a precomputed score matrix
            ``[n_candidates, n_train]`` (tensor or array, positive = helps).
        candidates: the candidate test examples (a Dataset or an unshuffled DataLoader);
            required with an estimator, ignored with a matrix.
        labels: which prediction each candidate is explained with. ``"predicted"`` (default):
            the class the model predicts at the estimator's last checkpoint (argmax of the
            outputs) — what a defender who does not know the truth sees; ``"given"``: the
            candidates' own labels; or a tensor of ``n_candidates`` classes. Ignored for a
            matrix.
        tail_fraction: size of the upper tail the statistic is taken against, as a fraction of
            ``n_train`` (at least ``max(2k, 10)`` examples).
        k: the anomaly score is the z of the ``k``-th largest influence (an attack needs at least
            ``k`` examples standing out to be flagged). ``1 <= k <= n_train``.
        threshold: robust z above which a training example joins a candidate's attack set.
        block_size: candidates scored per call of ``score`` (memory ``block_size × n_train``).

    Returns:
        A :class:`TargetReport` (``.ranking``, ``.scores``, ``.attack_set(position)``).

    Cost: one ``score`` of every candidate (streamed in blocks; only each candidate's tail is
    kept) plus ``O(n)`` per candidate for the statistic.
    """
    if not 0 < tail_fraction <= 1:
        raise ConfigurationError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigurationError(f"k must be a positive integer, got {k!r}")
    if not math.isfinite(threshold):
        raise ConfigurationError(f"threshold must be a finite number, got {threshold}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ConfigurationError(f"block_size must be a positive integer, got {block_size!r}")
    settings = {"tail_fraction": float(tail_fraction), "k": int(k), "threshold": float(threshold)}

    if isinstance(source, (Tensor, np.ndarray)):
        blocks = [_check_matrix(source)]
        used_labels = None
        n_train = blocks[0].shape[1]
    elif isinstance(source, Estimator):
        source._check_fitted()
        if candidates is None:
            raise ConfigurationError("identify_targets(estimator, candidates): candidates missing")
        dataset = candidates.dataset if isinstance(candidates, DataLoader) else candidates
        batch = candidates.batch_size if isinstance(candidates, DataLoader) else None
        loader = as_loader(candidates, block_size)
        n_cand = dataset_length(loader)
        if not n_cand:
            raise ConfigurationError("no candidates: the candidate data set is empty")
        task: Task = source.task  # type: ignore[attr-defined]
        if isinstance(labels, str) and labels == "given":
            used_labels = None
            data: Dataset = dataset
        else:
            if isinstance(labels, str) and labels == "predicted":
                predict = query_predictions(task, dataset, batch_size=batch or 256)
                used_labels = predict(_final_model(source)).long()
            elif isinstance(labels, str):
                raise ConfigurationError(
                    f"labels must be 'predicted', 'given' or a tensor of classes, got {labels!r}"
                )
            else:
                used_labels = _labels_tensor(labels, n_cand)
            data = _Relabelled(dataset, used_labels, task.label_key)
        n_train = source.n_train_
        if k > n_train:
            raise ConfigurationError(f"k={k} exceeds the {n_train} training examples")

        def _blocks():
            for start in range(0, n_cand, block_size):
                part = Subset(data, range(start, min(n_cand, start + block_size)))
                yield _check_matrix(source.score(part))

        blocks = _blocks()  # type: ignore[assignment]
    else:
        raise ConfigurationError(
            "identify_targets needs a fitted estimator (with candidates) or a score matrix "
            f"[n_candidates, n_train], got {type(source).__name__}"
        )
    if k > n_train:
        raise ConfigurationError(f"k={k} exceeds the {n_train} training examples")
    scores: list[float] = []
    tails: list[tuple[np.ndarray, np.ndarray]] = []
    for block in blocks:
        for row in block:
            value, idx, z = robust_tail(row, tail_fraction=tail_fraction, k=k, threshold=threshold)
            scores.append(value)
            tails.append((idx, z))
    score_t = torch.tensor(scores, dtype=torch.float64)
    ranking = torch.from_numpy(np.argsort(-score_t.numpy(), kind="stable").astype(np.int64))
    return TargetReport(score_t, ranking, used_labels, int(n_train), settings, tails)


# -- mitigation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MitigationResult:
    """What removing a suspected attack set and retraining did.

    Both models are trained by the same ``train_fn`` with the same seeds: *before* on the whole
    training set, *after* without the suspected examples, so the difference is the removal.

    Attributes:
        removed: ``[r]`` the training indices removed.
        clean_label: ``[n_target]`` the label each target should have.
        before: ``[n_seeds, n_target]`` targets' predicted classes with the full training set.
        after: ``[n_seeds, n_target]`` predicted classes after removal.
        accuracy_before: mean clean test accuracy over seeds with the full training set.
        accuracy_after: the same after removal.
        seeds: the training seeds.
    """

    removed: Tensor
    clean_label: Tensor
    before: Tensor
    after: Tensor
    accuracy_before: float
    accuracy_after: float
    seeds: tuple[int, ...]

    @property
    def restored(self) -> bool:
        """Every target predicts its clean label after removal, for every seed."""
        return bool((self.after == self.clean_label).all())

    @property
    def attack_effective(self) -> bool:
        """Some target did *not* predict its clean label before removal (the attack worked)."""
        return bool((self.before != self.clean_label).any())

    @property
    def accuracy_change(self) -> float:
        """``accuracy_after − accuracy_before`` (clean test accuracy, fraction)."""
        return self.accuracy_after - self.accuracy_before

    def summary(self) -> str:
        return (
            f"removed {len(self.removed)} training examples; target prediction "
            f"{self.before.tolist()} -> {self.after.tolist()} (clean {self.clean_label.tolist()}"
            f", restored: {self.restored}); clean accuracy {self.accuracy_before:.1%} -> "
            f"{self.accuracy_after:.1%} ({self.accuracy_change:+.1%})"
        )


def _labels_of(task: Task, data: Dataset, what: str) -> Tensor:
    out = []
    for _, batch in iterate_batches(as_loader(data, 256), torch.device("cpu")):
        y = task.labels(batch, required=True, what=what)
        out.append(torch.as_tensor(y).reshape(-1).long())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def mitigate(
    train: Retrainer | Callable[[np.ndarray, int], Any],
    suspected: Tensor | np.ndarray | Sequence[int],
    target: Dataset,
    *,
    n_train: int,
    clean_test: Dataset,
    task: Task,
    clean_label: Tensor | Sequence[int] | int | None = None,
    seeds: Sequence[int] = (0,),
    executor: Any = None,
) -> MitigationResult:
    """Retrain without ``suspected`` and check the target's prediction and clean accuracy.

    Runs ``train_fn(all n_train indices, seed)`` (*before*) and ``train_fn(indices without
    suspected, seed)`` (*after*) for every seed through :class:`~traintrace.Retrainer`, and
    measures the predicted class (argmax) of every ``target`` example and of every
    ``clean_test`` example with :func:`~traintrace.query_predictions`.

    Args:
        train: the user's ``train_fn(indices, seed) -> nn.Module`` (``indices``: sorted 1-D
            int64 numpy array of training positions), or a :class:`~traintrace.Retrainer` built
            with one — its ``train_fn``, executor, workers and cache are reused (its cache
            ``experiment`` gets the suffix ``"/mitigate"``); its ``measure`` is not used.
        suspected: training indices to remove (e.g. ``report.attack_set(position)``).
        target: the targeted example(s), a Dataset.
        n_train: size of the training set ``train_fn`` indexes.
        clean_test: labelled clean test data for the accuracy.
        task: the task whose ``forward`` runs the model (``tt.Classification()``).
        clean_label: the class each target should have; default: the labels in ``target``.
        seeds: training seeds; ``restored`` requires every seed to restore the clean label.
        executor: when ``train`` is a function: ``None`` (this process, default),
            ``"processes"`` or a ``concurrent.futures.Executor`` (see Retrainer).

    Cost: ``2 × len(seeds)`` trainings (cached when the Retrainer has a ``cache_dir``).
    """
    removed = torch.as_tensor(np.asarray(suspected)).reshape(-1)
    if removed.numel() and (removed.is_floating_point() or removed.dtype == torch.bool):
        raise ConfigurationError(
            f"suspected must be integer training indices, got dtype {removed.dtype}"
        )
    removed = removed.long()
    if not isinstance(n_train, (int, np.integer)) or n_train < 1:
        raise ConfigurationError(f"n_train must be a positive integer, got {n_train!r}")
    if removed.numel() and (int(removed.min()) < 0 or int(removed.max()) >= n_train):
        raise ConfigurationError(
            f"suspected indices must lie in [0, {n_train}), got min {int(removed.min())} and "
            f"max {int(removed.max())}"
        )
    removed = torch.unique(removed)
    if len(removed) >= n_train:
        raise ConfigurationError("suspected covers the whole training set: nothing to train on")
    seeds = (seeds,) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seeds:
        raise ConfigurationError("seeds must name at least one training seed")
    n_target = len(target)  # type: ignore[arg-type]
    if n_target < 1:
        raise ConfigurationError("target is empty: give the targeted example(s) as a Dataset")
    if clean_label is None:
        clean = _labels_of(task, target, "the target's clean label (or pass clean_label=)")
    else:
        clean = torch.as_tensor(clean_label).reshape(-1).long()
        if clean.numel() == 1 and n_target > 1:
            clean = clean.expand(n_target)
        if clean.numel() != n_target:
            raise ConfigurationError(
                f"clean_label has {clean.numel()} values for {n_target} target examples"
            )
    truth = _labels_of(task, clean_test, "the clean test accuracy")
    if len(truth) == 0:
        raise ConfigurationError("clean_test is empty")
    measure = query_predictions(task, ConcatDataset([target, clean_test]))
    if isinstance(train, Retrainer):
        if train.train_fn is None:
            raise ConfigurationError(
                "mitigate needs the Retrainer's train_fn(indices, seed) -> model (it measures "
                "predictions itself); this Retrainer was built with measure_fn only"
            )
        engine = Retrainer(
            train.train_fn,
            measure,
            executor=train.executor,
            max_workers=train.max_workers,
            threads_per_worker=train.threads_per_worker,
            cache_dir=train.cache_dir,
            experiment=None if train.experiment is None else f"{train.experiment}/mitigate",
            progress=train.progress,
        )
    elif callable(train):
        engine = Retrainer(train, measure, executor=executor, progress=False)
    else:
        raise ConfigurationError(
            f"train must be train_fn(indices, seed) -> model or a Retrainer, got {train!r}"
        )
    everything = np.arange(n_train, dtype=np.int64)
    kept = np.setdiff1d(everything, removed.numpy()).astype(np.int64)
    runs = [(everything, s) for s in seeds] + [(kept, s) for s in seeds]
    preds = engine.run(runs, desc="mitigation retraining").round().long()
    before, after = preds[: len(seeds)], preds[len(seeds) :]
    acc_before = float((before[:, n_target:] == truth).double().mean())
    acc_after = float((after[:, n_target:] == truth).double().mean())
    return MitigationResult(
        removed=removed,
        clean_label=clean,
        before=before[:, :n_target],
        after=after[:, :n_target],
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        seeds=seeds,
    )
