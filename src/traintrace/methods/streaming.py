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

import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from traintrace.data import DataHasher, batch_size_of, iterate_batches, to_plain
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError, StoreMismatchError
from traintrace.features.engine import ExactGradients
from traintrace.features.hooks import Capture
from traintrace.features.store import write_atomic
from traintrace.methods.preconditioners import Identity
from traintrace.retrieval.exact import RunningTopK
from traintrace.retrieval.topk import TopK

if TYPE_CHECKING:
    from traintrace.methods.gradient import GradientEstimator

__all__ = ["ExactStream", "Normalize", "ScoreJournal", "check_normalize"]

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
# resuming after a kill
# ----------------------------------------------------------------------------------------------
def _digest(batches: Iterable[Any]) -> str:
    """Content hash of some batches (a training batch, or a block of queries)."""
    hasher = DataHasher()
    for batch in batches:
        hasher.update(batch)
    return hasher.hexdigest()


class ScoreJournal:
    """A directory that makes a streamed ``score`` / ``top_k`` resumable after a kill (even -9).

    ``manifest.json`` records what is computed (the kind of result, ``k``, the estimator's
    settings, the model and every checkpoint's fingerprint, the training-set size and its
    fingerprint when ``fit`` took one, the batch sizes); a directory written for anything else is
    refused with :class:`~traintrace.StoreMismatchError`. Per block of queries:
    ``block-<b>.pt`` holds its finished result, ``block-<b>.partial.pt`` the running result (the
    ``[m, n]`` partial sums or the running top-k), the position reached in the training stream
    (checkpoint × example) and the content hash of every training batch streamed so far. A
    resumed run checks the block's queries against their hash, re-reads (without capturing) the
    training batches already streamed and checks each against its hash, then continues. Every
    file is written atomically (temporary name, fsync, rename), so a kill leaves the previous
    state. The partial state is saved every ``interval`` seconds and at the end of every
    checkpoint's pass: at most that much work is lost.
    """

    def __init__(self, path: str | os.PathLike[str], key: dict[str, Any], interval: float) -> None:
        self.path = Path(path)
        self.interval = float(interval)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "manifest.json"
        text = json.dumps(key, sort_keys=True, indent=1)
        if manifest.exists():
            old = json.loads(manifest.read_text(encoding="utf-8"))
            if old != json.loads(text):
                diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                raise StoreMismatchError(
                    f"the resume directory {str(self.path)!r} holds results of another "
                    f"computation (different {', '.join(diff)}); pass another directory, or "
                    "delete this one to start over"
                )
        else:
            write_atomic(manifest, text, durable=True)

    def _file(self, block: int, partial: bool) -> Path:
        return self.path / f"block-{block:06d}{'.partial' if partial else ''}.pt"

    def _load(self, path: Path, query_hash: str) -> dict[str, Any] | None:
        if not path.exists():
            return None
        state = torch.load(path, weights_only=True)
        if state["query_hash"] != query_hash:
            raise StoreMismatchError(
                f"{path.name} in the resume directory {str(self.path)!r} was computed for other "
                "queries (their content differs); pass the same queries in the same order, "
                "another directory, or delete it to start over"
            )
        return state

    def finished(self, block: int, query_hash: str) -> dict[str, Any] | None:
        """The finished result of a block, or None."""
        return self._load(self._file(block, False), query_hash)

    def partial(self, block: int, query_hash: str) -> dict[str, Any] | None:
        """The saved partial state of a block, or None."""
        return self._load(self._file(block, True), query_hash)

    def save(self, block: int, state: dict[str, Any], *, done: bool) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self._file(block, not done), buffer.getvalue(), durable=True)
        if done:
            with contextlib.suppress(FileNotFoundError):
                self._file(block, True).unlink()


def _describe_preconditioner(p: Any) -> dict[str, Any]:
    """Stable across processes (no object addresses): the type, the inverse's type, the scale."""
    inverse = getattr(p, "inverse", None)
    out: dict[str, Any] = {"type": type(p).__name__}
    if inverse is not None:
        out["inverse"] = type(inverse).__name__
        out["scale"] = getattr(p, "scale", None)
    return out


def _topk_from_state(state: dict[str, Any]) -> TopK:
    runner = RunningTopK(1)
    runner.top, runner.bottom = state["top"], state["bottom"]
    return runner.result()


def journal_for(
    est: GradientEstimator, path: str | os.PathLike[str], kind: str, k: int | None, interval: float
) -> ScoreJournal:
    """The :class:`ScoreJournal` of ``est``'s current settings (``kind``: ``"score"`` or
    ``"top_k"``)."""
    from traintrace.checkpoints import model_fingerprint

    key = {
        "format": "traintrace.score-journal/1",
        "kind": kind,
        "k": k,
        "estimator": type(est).__name__,
        "featurizer": est.featurizer.describe(),
        "preconditioners": [_describe_preconditioner(p) for p in est.preconditioners],
        "solver": repr(getattr(est, "hessian", None)),
        "damping": getattr(est, "damping_", getattr(est, "damping", None)),
        "curvature": getattr(est, "curvature", None),
        "weights": list(est.weights),
        "normalize": est.normalize,
        "layerwise": est.layerwise,
        "model": model_fingerprint(est.model),
        "checkpoints": [c.fingerprint(est.model) for c in est.checkpoints],
        "n_train": est.n_train_,
        "train_fingerprint": getattr(est, "data_fingerprint_", None),
        "batch_size": est.batch_size,
        "query_block": est.query_block,
    }
    return ScoreJournal(path, json.loads(json.dumps(key, default=str)), interval)


# ----------------------------------------------------------------------------------------------
# passes
# ----------------------------------------------------------------------------------------------
State = dict[str, Tensor]


def _bar(total: int | None, desc: str, progress: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="ex", disable=not progress, leave=False)


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

    ``fit`` reads the training data once for a full-content fingerprint (no forward pass; the
    first batch is captured once to fail early on a batch or checkpoint the model cannot take).
    The per-layer squared training-gradient norms (``[U, n]`` per checkpoint: self-influence for
    ``P = I`` and the normalized variants) come from the first complete streamed pass over each
    checkpoint, whose captures hold them, so ``self_influence`` after a ``score`` costs nothing
    and on its own one pass per checkpoint. A bad training example (non-finite gradient, invalid
    label) is reported, by its data-set index, by the first pass that captures it.
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
            # the squared training-gradient norms (self-influence with P = I, the normalized
            # variants) come from the first streamed pass over each checkpoint, whose captures
            # hold them: fit only reads the data once for its fingerprint (no forward pass)
            for c in range(len(est.checkpoints)):  # fail now on a checkpoint that cannot load
                est.state(c)
            hasher = DataHasher()
            seen = 0
            bar = _bar(n, "fingerprinting the training set", est.progress)
            for offset, batch in iterate_batches(loader, torch.device("cpu")):
                if offset == 0:  # fail now on a batch the model or the hooks cannot take
                    first = to_plain(batch, est.device)
                    where = f"{est.checkpoint_names[0]} (checking the first batch)"
                    self.engine.capture(est.state(0), first, "loss", offset=0, where=where)
                hasher.update(batch)
                seen += batch_size_of(batch)
                bar.update(batch_size_of(batch))
            bar.close()
            if seen != n:
                raise ConfigurationError(
                    f"the training data yielded {seen} examples but has length {n}"
                )
            #: per checkpoint ``[U, n]`` squared norms, filled by the first full streamed pass
            est.train_sq_norms_ = [None] * len(est.checkpoints)
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
        self,
        est: GradientEstimator,
        c: int,
        state: State,
        *,
        skip_before: int = 0,
        digests: list[str] | None = None,
        form: frozenset[str] = frozenset(),
    ) -> Iterator[tuple[int, Capture]]:
        """``(offset, capture)`` of every training batch at checkpoint ``c``: the kept ones, or
        a fresh capture pass. Batches before ``skip_before`` (a resumed run) are read but not
        captured; with ``digests`` (a resumable run) each batch's content hash is checked
        against the list (the batches already streamed) or appended to it."""
        if self._kept is not None:
            for offset, cap in self._kept[c]:
                if offset >= skip_before:
                    yield offset, cap
            return
        where = est.checkpoint_names[c]
        for index, (offset, batch) in enumerate(iterate_batches(self._train, est.device)):
            if digests is not None:
                digest = _digest([batch])
                if index < len(digests):
                    if digests[index] != digest:
                        raise StoreMismatchError(
                            f"the training batch at example {offset} differs from the one "
                            "streamed before the interruption (its content hash changed): "
                            "resume with the same training data, batch size and order, or "
                            "delete the resume directory to start over"
                        )
                else:
                    digests.append(digest)
            if offset < skip_before:
                continue
            yield (
                offset,
                self.engine.capture(state, batch, "loss", offset=offset, where=where, form=form),
            )

    # -- the passes --------------------------------------------------------------------------------
    def _block_scores(
        self,
        est: GradientEstimator,
        queries: list[tuple[int, Any]],
        consume: Callable[[int, Tensor], None],
        *,
        start: int = 0,
        digests: list[str] | None = None,
        progress_made: Callable[[int, bool], None] | None = None,
    ) -> int:
        """Stream one block of queries: ``consume(c·n + train offset, scores [m, B])`` per
        checkpoint ``c`` and training batch. Returns ``m``.

        A resumed block starts at position ``start`` (``c·n + offset``, a batch boundary):
        earlier checkpoints are not visited, earlier batches of checkpoint ``c`` are read (and
        checked against ``digests``) but not captured. ``progress_made(position, end_of_pass)``
        is called after every batch."""
        engine, states, weights = self.engine, est.state, est.weights
        preconditioners, names = est.preconditioners, est.checkpoint_names
        n, progress = est.n_train_, est.progress
        normalize, layerwise, train_norms = est.normalize, est.layerwise, est.train_sq_norms_
        m = sum(batch_size_of(batch) for _, batch in queries)
        # per checkpoint: load its state once, precondition the queries, then one pass over the
        # training data; the consumer sums the checkpoints' terms
        for c, precond in enumerate(preconditioners):
            if (c + 1) * n <= start:
                continue  # this checkpoint's pass was complete before the interruption
            state = states(c)
            caps = _query_caps(engine, state, queries, names[c])
            dirs = [precond.directions(engine, cap) for cap in caps]
            qn = None  # the query norms of the cosine: [U, m, 1] or [m, 1]
            if normalize == "cosine":
                norms = [engine.sq_norms(cap, per_unit=layerwise).sqrt() for cap in caps]
                qn = torch.cat(norms, dim=-1).unsqueeze(-1)
            del caps
            for d in dirs:
                d.flush_()  # subnormal products would slow the contractions (not the sums)
            bar = _bar(n, f"scoring {m} queries ({names[c]})", progress)
            skip = max(0, start - c * n)
            bar.update(skip)
            # the training norms: recorded by an earlier pass, else taken from this one's captures
            known = None if train_norms is None else train_norms[c]
            record = train_norms is not None and known is None
            fresh: Tensor | None = None
            train = self._train_captures(
                est,
                c,
                state,
                skip_before=skip,
                digests=digests if c == 0 else None,
                form=engine.forming(dirs),
            )
            for offset, cap in train:
                parts = [engine.dot(cap, d, per_unit=layerwise) for d in dirs]
                block = torch.cat(parts, dim=-2)  # [m, B] or [U, m, B]
                tn = None
                if known is not None:
                    tn = known[:, offset : offset + cap.size]  # [U, B]
                elif record:  # (normalized variants always record: fit sets their slots)
                    tn = engine.sq_norms(cap, per_unit=True)
                    _check_finite(tn.sum(0), offset, names[c], "a squared gradient norm")
                    if fresh is None:
                        fresh = tn.new_zeros(tn.shape[0], n)
                    fresh[:, offset : offset + cap.size] = tn
                if normalize:
                    assert tn is not None
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
                if progress_made is not None:
                    progress_made(c * n + offset + cap.size, offset + cap.size == n)
            bar.close()
            if record and skip == 0 and fresh is not None:
                est.train_sq_norms_[c] = fresh  # a complete pass: self-influence is now free
            del state, dirs
        return m

    def _journaled(
        self,
        est: GradientEstimator,
        block: list[tuple[int, Any]],
        index: int,
        journal: ScoreJournal | None,
        consume: Callable[[int, Tensor], None],
        snapshot: Callable[[bool], dict[str, Any]],
        restore: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any] | None:
        """Stream one query block through the journal: returns its finished state when the
        journal has it (nothing is streamed), else streams it (from a saved partial state when
        there is one), saving ``snapshot(final)`` of the caller's running result as it goes,
        and returns None."""
        if journal is None:
            self._block_scores(est, block, consume)
            return None
        qh = _digest(batch for _, batch in block)
        done = journal.finished(index, qh)
        if done is not None:
            return done
        saved = journal.partial(index, qh)
        start, digests = 0, []
        if saved is not None:
            restore(saved)
            start, digests = int(saved["position"]), list(saved["digests"])
        last = [time.monotonic()]

        def save(position: int, end_of_pass: bool) -> None:
            now = time.monotonic()
            if end_of_pass or now - last[0] >= journal.interval:
                state = {**snapshot(False), "query_hash": qh}
                journal.save(index, {**state, "position": position, "digests": digests}, done=False)
                last[0] = now

        self._block_scores(est, block, consume, start=start, digests=digests, progress_made=save)
        journal.save(index, {**snapshot(True), "query_hash": qh}, done=True)
        return None

    def score_blocks(
        self, est: GradientEstimator, queries: DataLoader, journal: ScoreJournal | None = None
    ) -> Iterator[Tensor]:
        """Exact score blocks ``[m_block, n]`` (positive = the training example helps); with a
        :class:`ScoreJournal`, finished blocks are read back and a partial one is resumed."""
        n = est.n_train_
        for index, block in enumerate(_query_blocks(queries, est.device, est.query_block)):
            m = sum(batch_size_of(b) for _, b in block)
            holder: list[Tensor] = []

            def consume(pos: int, scores: Tensor, m: int = m, holder: list = holder) -> None:
                if not holder:
                    holder.append(scores.new_zeros(m, n).cpu())
                offset = pos % n
                holder[0][:, offset : offset + scores.shape[1]] += scores.cpu()

            def snapshot(final: bool, holder: list = holder) -> dict[str, Any]:
                return {"scores": holder[0] if holder else None}

            def restore(saved: dict[str, Any], holder: list = holder) -> None:
                holder[:] = [] if saved["scores"] is None else [saved["scores"]]

            done = self._journaled(est, block, index, journal, consume, snapshot, restore)
            yield done["scores"] if done is not None else holder[0]

    def top_k(
        self,
        est: GradientEstimator,
        queries: DataLoader,
        k: int,
        method: str,
        journal: ScoreJournal | None = None,
    ) -> TopK:
        """Exact top-``k`` proponents/opponents, merged on the fly: memory ``[m, k]`` plus one
        batch (one checkpoint), or one block's ``[m, n]`` partial sums (several checkpoints,
        whose terms of a column must be summed before ranking). With a :class:`ScoreJournal`
        the running top-k (and partial sums) are saved and resumed."""
        if method not in ("exact", "auto"):
            raise ConfigurationError(
                f"top_k(method={method!r}): the exact streaming path has no index; an "
                "approximate FAISS search needs stored features (projection= or store=)"
            )
        n, count = est.n_train_, len(est.preconditioners)
        parts: list[TopK] = []
        for index, block in enumerate(_query_blocks(queries, est.device, est.query_block)):
            m = sum(batch_size_of(b) for _, b in block)
            runner = RunningTopK(k)
            partial: list[Tensor] = []

            def consume(
                pos: int,
                scores: Tensor,
                m: int = m,
                runner: RunningTopK = runner,
                partial: list = partial,
            ) -> None:
                c, offset = divmod(pos, n)
                if count == 1:
                    runner.update(offset, scores)
                    return
                if not partial:
                    partial.append(scores.new_zeros(m, n).cpu())
                cols = slice(offset, offset + scores.shape[1])
                partial[0][:, cols] += scores.cpu()
                if c == count - 1:
                    runner.update(offset, partial[0][:, cols])

            def snapshot(
                final: bool, runner: RunningTopK = runner, partial: list = partial
            ) -> dict[str, Any]:
                kept = None if final or not partial else partial[0]  # a finished block: top-k only
                return {"top": runner.top, "bottom": runner.bottom, "partial": kept}

            def restore(
                saved: dict[str, Any], runner: RunningTopK = runner, partial: list = partial
            ) -> None:
                runner.top, runner.bottom = saved["top"], saved["bottom"]
                partial[:] = [] if saved["partial"] is None else [saved["partial"]]

            done = self._journaled(est, block, index, journal, consume, snapshot, restore)
            parts.append(_topk_from_state(done) if done is not None else runner.result())
        return TopK.concat(parts)

    def self_influence(self, est: GradientEstimator) -> Tensor:
        """``Σ_c w_c ∇l(z, θ_c)ᵀ P_c ∇l(z, θ_c)`` for every training example, ``[n]``: from the
        norms an earlier streamed pass recorded when every ``P_c = I``, else one pass per
        checkpoint."""
        norms = est.train_sq_norms_
        complete = norms is not None and all(x is not None for x in norms)
        if complete and all(isinstance(p, Identity) for p in est.preconditioners):
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
