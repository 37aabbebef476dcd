"""Exact streaming scores: featurizer (the engine) × preconditioner × checkpoint weights.

Every gradient estimator computes

    score(z, z') = Σ_c w_c · ⟨P_c ∇f(z', θ_c), ∇l(z, θ_c)⟩

(METHODS.md; DESIGN.md, "the one idea"). This module serves that sum *exactly* when the queries
are known: the query gradients are captured and preconditioned once per block of queries, then
one pass over the training set per checkpoint contracts them with every training example's
per-layer factors (:class:`~traintrace.features.engine.ExactGradients`). Nothing of size
``n × P`` is formed or stored; memory is one training batch's activations plus the ``[m, n]``
result (``top_k`` keeps only ``[m, k]``).

Preconditioners (:class:`Preconditioner`): :class:`Identity` (TracIn) and
:class:`InverseCurvature` (influence functions: any solver, K-FAC/EK-FAC, Arnoldi's low-rank
inverse). Normalized variants divide each checkpoint's term by gradient norms from the same
capture: ``normalize="train"`` by ``‖∇l(z, θ_c)‖`` (renormalized influence), ``"cosine"`` also
by ``‖∇f(z', θ_c)‖`` (GAS); ``layerwise=True`` does so per layer and sums over layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from traintrace.data import batch_size_of, iterate_batches
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.engine import Directions, ExactGradients
from traintrace.features.hooks import Capture
from traintrace.retrieval.topk import Ranking, TopK

__all__ = [
    "Identity",
    "InverseCurvature",
    "Normalize",
    "Preconditioner",
    "check_normalize",
    "stream_scores",
    "stream_self_influence",
    "stream_top_k",
    "train_sq_norms",
]

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


class Preconditioner(Protocol):
    """``P`` of the one formula: applied to query gradients once, quadratic form for self-influence."""

    def directions(self, engine: ExactGradients, cap: Capture) -> Directions:
        """``P ∇f(z')`` for a captured block of queries, as engine directions."""
        ...

    def quadratic(self, engine: ExactGradients, cap: Capture) -> Tensor:
        """``∇l(z)ᵀ P ∇l(z)`` for a captured batch of training examples, ``[B]``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able settings."""
        ...


class Identity:
    """``P = I`` (TracIn): the query's captured gradient is contracted as it is (factored)."""

    def directions(self, engine: ExactGradients, cap: Capture) -> Directions:
        return engine.directions(cap)

    def quadratic(self, engine: ExactGradients, cap: Capture) -> Tensor:
        return engine.sq_norms(cap)

    def describe(self) -> dict[str, Any]:
        return {"preconditioner": "identity"}


class InverseCurvature:
    """``P = scale · (C + λI)⁻¹`` through any inverse operator with ``solve(v [m, P])``.

    The query gradients are formed once per block (``m × P``), solved, and contracted densely
    per layer. A low-rank inverse (Arnoldi, ``U diag(1/λ) Uᵀ``) computes self-influence from the
    ``r`` coordinates ``Uᵀ g`` through the engine (cost ``r`` contractions per example, no
    per-example gradient); other inverses form each training gradient batch by batch and solve.
    """

    def __init__(self, inverse: Any, scale: float) -> None:
        self.inverse = inverse
        self.scale = float(scale)
        self._basis: Directions | None = None

    def _low_rank(self) -> bool:
        return hasattr(self.inverse, "eigenvectors") and hasattr(self.inverse, "project")

    def directions(self, engine: ExactGradients, cap: Capture) -> Directions:
        q = engine.flatten(cap)
        solved = self.inverse.solve(q).to(q.dtype) * self.scale
        return engine.directions_from_flat(solved)

    def quadratic(self, engine: ExactGradients, cap: Capture) -> Tensor:
        if self._low_rank():
            if self._basis is None:
                u = self.inverse.eigenvectors
                self._basis = engine.directions_from_flat(u.T.to(cap.values.dtype))
            coords = engine.dot(cap, self._basis)  # [r, B]
            lam = self.inverse.eigenvalues.to(coords)
            return (coords.square() / lam[:, None]).sum(0) * self.scale
        g = engine.flatten(cap)
        return (self.inverse.solve(g).to(g.dtype) * g).sum(1) * self.scale

    def describe(self) -> dict[str, Any]:
        return {"preconditioner": repr(self.inverse), "scale": self.scale}


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
        _check_finite(sq.sum(0), offset, where, "squared gradient norm")
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


def _block_scores(
    engine: ExactGradients,
    states: Callable[[int], State],
    weights: Sequence[float],
    preconditioners: Sequence[Preconditioner],
    names: Sequence[str],
    train: DataLoader,
    queries: list[tuple[int, Any]],
    device: torch.device,
    *,
    n: int,
    normalize: Normalize,
    layerwise: bool,
    train_norms: Sequence[Tensor] | None,
    progress: bool,
    consume: Callable[[int, Tensor], None],
) -> int:
    """Stream one block of queries: ``consume(train offset, scores [m, B])`` per training batch.

    The per-checkpoint sum is accumulated per training batch, so each consumer call sees the
    final scores of those columns. Returns ``m``.
    """
    per_ckpt: list[tuple[list[Capture], list[Directions], list[Tensor] | None]] = []
    for c, precond in enumerate(preconditioners):
        state = states(c)
        caps = _query_caps(engine, state, queries, names[c])
        dirs = [precond.directions(engine, cap) for cap in caps]
        qnorms = None
        if normalize == "cosine":
            qnorms = [engine.sq_norms(cap, per_unit=layerwise).sqrt() for cap in caps]
        per_ckpt.append((caps, dirs, qnorms))
        del state
    m = sum(cap.size for cap in per_ckpt[0][0])
    # one pass over the training data per checkpoint; the consumer sums the checkpoints' terms
    for c, (_caps, dirs, qnorms) in enumerate(per_ckpt):
        state = states(c)
        bar = _bar(n, f"scoring {m} queries ({names[c]})", progress)
        for offset, batch in iterate_batches(train, device):
            cap = engine.capture(state, batch, "loss", offset=offset, where=names[c])
            parts = [engine.dot(cap, d, per_unit=layerwise) for d in dirs]
            block = torch.cat(parts, dim=-2)  # [m, B] or [U, m, B]
            if normalize:
                assert train_norms is not None
                tn = train_norms[c][:, offset : offset + cap.size]  # [U, B]
                tn = tn.sqrt() if layerwise else tn.sum(0).sqrt()
                denom = tn.unsqueeze(-2)  # [U, 1, B] or [1, B]
                if qnorms is not None:
                    qn = torch.cat(qnorms[: len(dirs)], dim=-1)  # [U, m] or [m]
                    denom = denom * qn.unsqueeze(-1)
                block = torch.where(denom > 0, block / denom.clamp_min(1e-300), 0.0)
            if layerwise:
                block = block.sum(0)
            block = block * weights[c]
            _check_finite(block, offset, names[c], "a score")
            consume(c * n + offset, block)
            bar.update(cap.size)
        bar.close()
    return m


def stream_scores(
    engine: ExactGradients,
    states: Callable[[int], State],
    weights: Sequence[float],
    preconditioners: Sequence[Preconditioner],
    names: Sequence[str],
    train: DataLoader,
    queries: DataLoader,
    device: torch.device,
    *,
    n: int,
    query_block: int,
    normalize: Normalize = False,
    layerwise: bool = False,
    train_norms: Sequence[Tensor] | None = None,
    progress: bool = True,
) -> Iterator[Tensor]:
    """Exact score blocks ``[m_block, n]`` (positive = the training example helps)."""
    for block in _query_blocks(queries, device, query_block):
        m = sum(batch_size_of(b) for _, b in block)
        holder: list[Tensor] = []

        def consume(pos: int, scores: Tensor, m: int = m, holder: list[Tensor] = holder) -> None:
            if not holder:
                holder.append(scores.new_zeros(m, n))
            offset = pos % n
            holder[0][:, offset : offset + scores.shape[1]] += scores

        _block_scores(
            engine,
            states,
            weights,
            preconditioners,
            names,
            train,
            block,
            device,
            n=n,
            normalize=normalize,
            layerwise=layerwise,
            train_norms=train_norms,
            progress=progress,
            consume=consume,
        )
        yield holder[0].cpu()


def stream_top_k(
    engine: ExactGradients,
    states: Callable[[int], State],
    weights: Sequence[float],
    preconditioners: Sequence[Preconditioner],
    names: Sequence[str],
    train: DataLoader,
    queries: DataLoader,
    device: torch.device,
    k: int,
    *,
    n: int,
    query_block: int,
    normalize: Normalize = False,
    layerwise: bool = False,
    train_norms: Sequence[Tensor] | None = None,
    progress: bool = True,
) -> TopK:
    """Exact top-``k`` proponents/opponents, merged on the fly: memory ``[m, k]`` plus one batch.

    With one checkpoint the running top-k is merged per training batch; with several, the
    per-checkpoint terms of a column must be summed first, so the checkpoints' partial sums are
    kept for one block of columns at a time (``[m, n]`` only within a query block when ``C > 1``).
    """
    parts: list[TopK] = []
    for block in _query_blocks(queries, device, query_block):
        m = sum(batch_size_of(b) for _, b in block)
        runner = _RunningTopK(k)
        partial: list[Tensor] = []

        def consume(
            pos: int,
            scores: Tensor,
            m: int = m,
            runner: _RunningTopK = runner,
            partial: list[Tensor] = partial,
        ) -> None:
            c, offset = divmod(pos, n)
            if len(preconditioners) == 1:
                runner.update(offset, scores)
                return
            if not partial:
                partial.append(scores.new_zeros(m, n))
            cols = slice(offset, offset + scores.shape[1])
            partial[0][:, cols] += scores
            if c == len(preconditioners) - 1:
                runner.update(offset, partial[0][:, cols])

        _block_scores(
            engine,
            states,
            weights,
            preconditioners,
            names,
            train,
            block,
            device,
            n=n,
            normalize=normalize,
            layerwise=layerwise,
            train_norms=train_norms,
            progress=progress,
            consume=consume,
        )
        parts.append(runner.result())
    if not parts:
        raise ConfigurationError("no queries: the query data set is empty")
    return TopK(
        proponents=Ranking(
            torch.cat([p.proponents.indices for p in parts]),
            torch.cat([p.proponents.scores for p in parts]),
        ),
        opponents=Ranking(
            torch.cat([p.opponents.indices for p in parts]),
            torch.cat([p.opponents.scores for p in parts]),
        ),
    )


class _RunningTopK:
    """The ``k`` largest and smallest columns seen so far, per row, merged block by block."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.hi: tuple[Tensor, Tensor] | None = None
        self.lo: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _merge(
        prev: tuple[Tensor, Tensor] | None, values: Tensor, index: Tensor, k: int, largest: bool
    ) -> tuple[Tensor, Tensor]:
        if prev is not None:
            values = torch.cat([prev[0], values], dim=1)
            index = torch.cat([prev[1], index], dim=1)
        kk = min(k, values.shape[1])
        top, pos = torch.topk(values, kk, dim=1, largest=largest, sorted=True)
        return top, torch.gather(index, 1, pos)

    def update(self, start: int, block: Tensor) -> None:
        block = block.cpu()
        index = torch.arange(start, start + block.shape[1]).expand(block.shape[0], -1)
        self.hi = self._merge(self.hi, block, index, self.k, True)
        self.lo = self._merge(self.lo, block, index, self.k, False)

    def result(self) -> TopK:
        assert self.hi is not None and self.lo is not None
        return TopK(
            proponents=Ranking(self.hi[1], self.hi[0]), opponents=Ranking(self.lo[1], self.lo[0])
        )


def stream_self_influence(
    engine: ExactGradients,
    states: Callable[[int], State],
    weights: Sequence[float],
    preconditioners: Sequence[Preconditioner],
    names: Sequence[str],
    train: DataLoader,
    device: torch.device,
    *,
    n: int,
    progress: bool = True,
) -> Tensor:
    """``Σ_c w_c ∇l(z, θ_c)ᵀ P_c ∇l(z, θ_c)`` for every training example, ``[n]``."""
    out: Tensor | None = None
    for c, precond in enumerate(preconditioners):
        state = states(c)
        bar = _bar(n, f"self-influence ({names[c]})", progress)
        for offset, batch in iterate_batches(train, device):
            cap = engine.capture(state, batch, "loss", offset=offset, where=names[c])
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
