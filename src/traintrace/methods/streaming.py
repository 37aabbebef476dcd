"""Exact streaming scores: featurizer (the engine) × preconditioner × checkpoint weights.

Every gradient estimator computes

    score(z, z') = Σ_c w_c · ⟨P_c ∇f(z', θ_c), ∇l(z, θ_c)⟩

(METHODS.md; DESIGN.md, "the one idea"). This module serves that sum *exactly* when the queries
are known: the query gradients are captured and preconditioned once per block of queries, then
one pass over the training set per checkpoint contracts them with every training example's
per-layer factors (:class:`~traintrace.features.engine.ExactGradients`). Nothing of size
``n × P`` is formed or stored; memory is one training batch's activations plus the ``[m, n]``
result (``top_k`` keeps only ``[m, k]``).

Preconditioners: :mod:`traintrace.methods.preconditioners`. Normalized variants divide each
checkpoint's term by gradient norms from the same capture: ``normalize="train"`` by ``‖∇l(z, θ_c)‖`` (renormalized influence), ``"cosine"`` also
by ``‖∇f(z', θ_c)‖`` (GAS); ``layerwise=True`` does so per layer and sums over layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from traintrace.data import DataHasher, batch_size_of, iterate_batches
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.engine import ExactGradients
from traintrace.features.hooks import Capture
from traintrace.methods.preconditioners import Identity
from traintrace.retrieval.exact import RunningTopK
from traintrace.retrieval.topk import TopK

if TYPE_CHECKING:
    from traintrace.methods.gradient import GradientEstimator

__all__ = ["ExactStream", "Normalize", "check_normalize", "train_sq_norms"]

Normalize = Literal[False, "train", "cosine"]


def check_normalize(normalize: Any, layerwise: Any) -> tuple[Normalize, bool]:
    """Validate ``normalize=`` (``False``, ``"train"``, ``"cosine"``; ``True`` = ``"cosine"``)."""
    if normalize is True:
        normalize = "cosine"
    if normalize is None:
        normalize = False
    if normalize not in (False, "train", "cosine"):
        raise ConfigurationError(
            f"normalize must be False, 'train' (divide by the training gradient norm: "
            f"renormalized influence) or 'cosine' (divide by both norms: GAS), got {normalize!r}"
        )
    if not isinstance(layerwise, bool):
        raise ConfigurationError(f"layerwise must be True or False, got {layerwise!r}")
    if layerwise and normalize is False:
        raise ConfigurationError(
            "layerwise=True normalizes per layer: choose normalize='train' or 'cosine' with it"
        )
    return normalize, layerwise


# ----------------------------------------------------------------------------------------------
# passes
# ----------------------------------------------------------------------------------------------
State = dict[str, Tensor]


def _bar(total: int | None, desc: str, progress: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="ex", disable=not progress, leave=False)


def train_sq_norms(
    engine: ExactGradients,
    state: State,
    loader: DataLoader,
    device: torch.device,
    *,
    n: int,
    where: str,
    progress: bool,
    on_batch: Callable[[Any], None] | None = None,
) -> Tensor:
    """Per-layer squared training-gradient norms ``[U, n]`` at one state (one capture pass)."""
    out: Tensor | None = None
    bar = _bar(n, f"gradient norms ({where})", progress)
    for offset, batch in iterate_batches(loader, device):
        if on_batch is not None:
            on_batch(batch)
        cap = engine.capture(state, batch, "loss", offset=offset, where=where)
        sq = engine.sq_norms(cap, per_unit=True)
        if out is None:
            out = sq.new_zeros(sq.shape[0], n)
        if not bool(torch.isfinite(sq).all()):
            layers = [
                u
                for u, row in zip(engine.units, sq, strict=True)
                if not bool(torch.isfinite(row).all())
            ]
            _check_finite(sq.sum(0), offset, where, f"the squared gradient norm of {layers[:5]}")
        out[:, offset : offset + cap.size] = sq
        bar.update(cap.size)
    bar.close()
    if out is None:
        raise ConfigurationError("the training data set is empty")
    return out


def _check_finite(values: Tensor, offset: int, where: str, what: str) -> None:
    if bool(torch.isfinite(values).all()):
        return
    bad = (~torch.isfinite(values)).reshape(-1, values.shape[-1]).any(0).nonzero().flatten()
    cols = [int(i) for i in bad[:10]]
    raise NonFiniteGradientError(
        f"{what} overflowed to a non-finite value{' at ' + where if where else ''} (training "
        f"examples near {[c + offset for c in cols]}); the gradients are finite but too large "
        "for the dtype: scale the inputs down, use float64, or check the checkpoint"
    )


def _query_caps(
    engine: ExactGradients, state: State, queries: list[tuple[int, Any]], where: str
) -> list[Capture]:
    return [
        engine.capture(state, batch, "measurement", offset=offset, where=f"{where} (query)")
        for offset, batch in queries
    ]


def _query_blocks(
    loader: DataLoader, device: torch.device, block: int
) -> Iterator[list[tuple[int, Any]]]:
    pending: list[tuple[int, Any]] = []
    count = 0
    for offset, batch in iterate_batches(loader, device):
        pending.append((offset, batch))
        count += batch_size_of(batch)
        if count >= block:
            yield pending
            pending, count = [], 0
    if pending:
        yield pending


class ExactStream:
    """The exact featurizer (``R = I``): the engine's captures, streamed; nothing stored.

    ``fit`` records, in one capture pass per checkpoint, the per-layer squared training-gradient
    norms (``[U, n]`` per checkpoint: self-influence for ``P = I`` and the normalized variants)
    and a full-content fingerprint of the training data, unless the estimator needs neither.
    ``score`` / ``top_k`` stream (module docs); ``top_k`` is always exact.

    ``keep_captures=True`` keeps the training captures of ``fit``'s pass in memory (on the
    model's device) and contracts every query block with them, instead of capturing the training
    set again per block: for a small set of layers whose factors are small (representer points'
    last layer: ``n × (d_in + 1 + d_out)`` numbers), it saves one forward pass over the training
    set per query block. Memory grows with ``n``: leave it off for full models.
    """

    kind = "exact"

    def __init__(self, engine: ExactGradients, *, keep_captures: bool = False) -> None:
        self.engine = engine
        self.keep_captures = bool(keep_captures)
        #: per checkpoint, ``[(offset, capture)]`` of every training batch (``keep_captures``)
        self._kept: list[list[tuple[int, Capture]]] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.engine.names)

    @property
    def coverage(self) -> dict[str, str]:
        return self.engine.coverage

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def _needs_norms(self, est: GradientEstimator) -> bool:
        return bool(est.normalize) or all(isinstance(p, Identity) for p in est.preconditioners)

    def fit(self, est: GradientEstimator, loader: DataLoader, n: int) -> None:
        est.train_sq_norms_ = None
        self._kept = None
        if self.keep_captures:
            self._fit_kept(est, loader, n)
        elif self._needs_norms(est):
            hasher = DataHasher()
            est.train_sq_norms_ = [
                train_sq_norms(
                    self.engine,
                    est.state(c),
                    loader,
                    est.device,
                    n=n,
                    where=est.checkpoint_names[c],
                    progress=est.progress,
                    on_batch=hasher.update if c == 0 else None,
                )
                for c in range(len(est.checkpoints))
            ]
            #: full-content fingerprint of the training data seen by ``fit``
            est.data_fingerprint_ = hasher.hexdigest()
        self._train = loader

    def _fit_kept(self, est: GradientEstimator, loader: DataLoader, n: int) -> None:
        """One capture pass per checkpoint, kept; the norms and fingerprint come from it."""
        hasher = DataHasher()
        kept: list[list[tuple[int, Capture]]] = []
        norms: list[Tensor] = []
        for c in range(len(est.checkpoints)):
            state, where = est.state(c), est.checkpoint_names[c]
            caps: list[tuple[int, Capture]] = []
            sq: Tensor | None = None
            bar = _bar(n, f"capturing the training set ({where})", est.progress)
            for offset, batch in iterate_batches(loader, est.device):
                if c == 0:
                    hasher.update(batch)
                cap = self.engine.capture(state, batch, "loss", offset=offset, where=where)
                part = self.engine.sq_norms(cap, per_unit=True)
                _check_finite(part.sum(0), offset, where, "a squared gradient norm")
                if sq is None:
                    sq = part.new_zeros(part.shape[0], n)
                sq[:, offset : offset + cap.size] = part
                caps.append((offset, cap))
                bar.update(cap.size)
            bar.close()
            if sq is None:
                raise ConfigurationError("the training data set is empty")
            kept.append(caps)
            norms.append(sq)
        self._kept = kept
        est.train_sq_norms_ = norms
        est.data_fingerprint_ = hasher.hexdigest()

    def _train_captures(
        self, est: GradientEstimator, c: int, state: State
    ) -> Iterator[tuple[int, Capture]]:
        """``(offset, capture)`` of every training batch at checkpoint ``c``: the kept ones, or
        a fresh capture pass."""
        if self._kept is not None:
            yield from self._kept[c]
            return
        where = est.checkpoint_names[c]
        for offset, batch in iterate_batches(self._train, est.device):
            yield offset, self.engine.capture(state, batch, "loss", offset=offset, where=where)

    # -- the passes --------------------------------------------------------------------------------
    def _block_scores(
        self,
        est: GradientEstimator,
        queries: list[tuple[int, Any]],
        consume: Callable[[int, Tensor], None],
    ) -> int:
        """Stream one block of queries: ``consume(c·n + train offset, scores [m, B])`` per
        checkpoint ``c`` and training batch. Returns ``m``."""
        engine, states, weights = self.engine, est.state, est.weights
        preconditioners, names = est.preconditioners, est.checkpoint_names
        n, progress = est.n_train_, est.progress
        normalize, layerwise, train_norms = est.normalize, est.layerwise, est.train_sq_norms_
        m = sum(batch_size_of(batch) for _, batch in queries)
        # per checkpoint: load its state once, precondition the queries, then one pass over the
        # training data; the consumer sums the checkpoints' terms
        for c, precond in enumerate(preconditioners):
            state = states(c)
            caps = _query_caps(engine, state, queries, names[c])
            dirs = [precond.directions(engine, cap) for cap in caps]
            qn = None  # the query norms of the cosine: [U, m, 1] or [m, 1]
            if normalize == "cosine":
                norms = [engine.sq_norms(cap, per_unit=layerwise).sqrt() for cap in caps]
                qn = torch.cat(norms, dim=-1).unsqueeze(-1)
            del caps
            bar = _bar(n, f"scoring {m} queries ({names[c]})", progress)
            for offset, cap in self._train_captures(est, c, state):
                parts = [engine.dot(cap, d, per_unit=layerwise) for d in dirs]
                block = torch.cat(parts, dim=-2)  # [m, B] or [U, m, B]
                if normalize:
                    assert train_norms is not None
                    tn = train_norms[c][:, offset : offset + cap.size]  # [U, B]
                    tn = tn.sqrt() if layerwise else tn.sum(0).sqrt()
                    denom = tn.unsqueeze(-2)  # [U, 1, B] or [1, B]
                    if qn is not None:
                        denom = denom * qn
                    block = torch.where(denom > 0, block / denom.clamp_min(1e-300), 0.0)
                if layerwise:
                    block = block.sum(0)
                block = block * weights[c]
                _check_finite(block, offset, names[c], "a score")
                consume(c * n + offset, block)
                bar.update(cap.size)
            bar.close()
            del state, dirs
        return m

    def score_blocks(self, est: GradientEstimator, queries: DataLoader) -> Iterator[Tensor]:
        """Exact score blocks ``[m_block, n]`` (positive = the training example helps)."""
        n = est.n_train_
        for block in _query_blocks(queries, est.device, est.query_block):
            m = sum(batch_size_of(b) for _, b in block)
            holder: list[Tensor] = []

            def consume(
                pos: int, scores: Tensor, m: int = m, holder: list[Tensor] = holder
            ) -> None:
                if not holder:
                    holder.append(scores.new_zeros(m, n))
                offset = pos % n
                holder[0][:, offset : offset + scores.shape[1]] += scores

            self._block_scores(est, block, consume)
            yield holder[0].cpu()

    def top_k(self, est: GradientEstimator, queries: DataLoader, k: int, method: str) -> TopK:
        """Exact top-``k`` proponents/opponents, merged on the fly: memory ``[m, k]`` plus one
        batch (one checkpoint), or one block's ``[m, n]`` partial sums (several checkpoints,
        whose terms of a column must be summed before ranking)."""
        if method not in ("exact", "auto"):
            raise ConfigurationError(
                f"top_k(method={method!r}): the exact streaming path has no index; an "
                "approximate FAISS search needs stored features (projection= or store=)"
            )
        n, count = est.n_train_, len(est.preconditioners)
        parts: list[TopK] = []
        for block in _query_blocks(queries, est.device, est.query_block):
            m = sum(batch_size_of(b) for _, b in block)
            runner = RunningTopK(k)
            partial: list[Tensor] = []

            def consume(
                pos: int,
                scores: Tensor,
                m: int = m,
                runner: RunningTopK = runner,
                partial: list[Tensor] = partial,
            ) -> None:
                c, offset = divmod(pos, n)
                if count == 1:
                    runner.update(offset, scores)
                    return
                if not partial:
                    partial.append(scores.new_zeros(m, n))
                cols = slice(offset, offset + scores.shape[1])
                partial[0][:, cols] += scores
                if c == count - 1:
                    runner.update(offset, partial[0][:, cols])

            self._block_scores(est, block, consume)
            parts.append(runner.result())
        return TopK.concat(parts)

    def self_influence(self, est: GradientEstimator) -> Tensor:
        """``Σ_c w_c ∇l(z, θ_c)ᵀ P_c ∇l(z, θ_c)`` for every training example, ``[n]``: from the
        norms ``fit`` recorded when every ``P_c = I``, else one pass per checkpoint."""
        norms = est.train_sq_norms_
        if norms is not None and all(isinstance(p, Identity) for p in est.preconditioners):
            total = torch.zeros(est.n_train_, dtype=norms[0].dtype)
            for w, sq in zip(est.weights, norms, strict=True):
                total += w * sq.sum(0).cpu()
            return total
        engine, states, weights = self.engine, est.state, est.weights
        preconditioners, names = est.preconditioners, est.checkpoint_names
        n, progress = est.n_train_, est.progress
        out: Tensor | None = None
        for c, precond in enumerate(preconditioners):
            state = states(c)
            bar = _bar(n, f"self-influence ({names[c]})", progress)
            for offset, cap in self._train_captures(est, c, state):
                values = precond.quadratic(engine, cap) * weights[c]
                _check_finite(values, offset, names[c], "self-influence")
                if out is None:
                    out = values.new_zeros(n)
                out[offset : offset + cap.size] += values
                bar.update(cap.size)
            bar.close()
        if out is None:
            raise ConfigurationError("the training data set is empty")
        return out.cpu()
