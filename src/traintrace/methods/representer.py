"""Representer points (Yeh, Kim, Yen, Ravikumar, "Representer Point Selection for Explaining Deep
Neural Networks", NeurIPS 2018).

Write the network as ``Φ(x) = W̃ f̃(x)``: ``f(x)`` is the input of the last ``nn.Linear`` layer
(the penultimate features), ``f̃ = [f, 1]`` when that layer has a bias (the bias is folded in as
the last column of ``W̃ = [W, b]``), ``f̃ = f`` otherwise. If ``W̃`` is a stationary point of the
L2-regularized last-layer objective on fixed features

    J(W̃) = (1/n) Σ_i L(W̃ f̃_i, y_i) + λ ‖W̃‖²_F

then ``∇J = 0`` gives the representer theorem

    W̃ = Σ_i α_i f̃_iᵀ,   α_i = −1/(2λn) · ∂L(x_i, y_i)/∂Φ(x_i)   (a vector over outputs),

so every prediction decomposes exactly over the training set:
``Φ(x') = Σ_i α_i (f̃_i · f̃')``. The bias is covered by the decomposition *because* it is folded
in and regularized like the weights (its share of the logits is ``Σ_i α_i · 1``): an unregularized
bias would leave ``Φ(x') = Σ_i α_i (f_i · f') + b`` with ``b`` unexplained.

**A gradient estimator.** The last layer's per-example gradients are rank one,
``∇_W̃ L(x_i, y_i) = (∂L/∂Φ_i) f̃_iᵀ`` and ``∇_W̃ Φ_c(x') = e_c f̃'ᵀ``, so a representer score is
a last-layer gradient inner product:

    α_{i,c} (f̃_i · f̃') = 1/(2λn) · ⟨∇_W̃ Φ_c(x'), −∇_W̃ L(x_i, y_i)⟩,

the one formula of :mod:`traintrace.methods.gradient` with ``R`` = the exact engine on the last
layer only, ``P = I``, ``w = 1/(2λn)``, the query measurement the target-class logit ``Φ_c``
(``Classification("logit")``, higher is better), evaluated at the checkpoint with its head
replaced by the refitted, stationary one.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint
from traintrace.data import dataset_length, iterate_batches
from traintrace.exceptions import BatchFormatError, ConfigurationError
from traintrace.features.engine import ExactGradients
from traintrace.features.gradients import eval_mode, forward_at
from traintrace.features.params import module_by_name
from traintrace.methods.base import Data
from traintrace.methods.gradient import GradientEstimator
from traintrace.methods.preconditioners import Identity
from traintrace.methods.streaming import ExactStream, ScoreJournal
from traintrace.retrieval.topk import TopK
from traintrace.task import Classification, Task

__all__ = ["RepresenterPoints"]


def target_logit_task(task: Task) -> Task:
    """``task`` with the query measurement "logit of the target class" (``Classification``
    only; any other task is returned as it is: its scores are refused, see ``decompose``)."""
    if not isinstance(task, Classification):
        return task
    logit = copy.copy(task)
    logit.measurement_kind = "logit"
    logit.measurement_higher_is_better = True
    return logit


class RepresenterPoints(GradientEstimator):
    """Representer point selection: ``score(z_i, x') = α_{i,c} · (f̃_i · f̃')``.

    ``f̃`` are the penultimate features (the input of ``layer``, with a constant 1 appended when
    the layer has a bias), ``α_i = −1/(2λn) ∂L(x_i, y_i)/∂Φ(x_i)`` the representer values (one per
    output) and ``c`` the query's target class: its label when the query batch has one (and the
    task's ``use_labels`` is true), else the class the (refitted) last layer predicts. Summed over
    ``i`` the scores give exactly the query's logit of class ``c`` (when the head is stationary,
    see below), so each score is that training example's share of the logit.

    **Composition** (:class:`~traintrace.methods.gradient.GradientEstimator`; module docs):
    ``score = w · ⟨P ∇f(x'), ∇L(x_i)⟩`` with ``R`` = the exact engine restricted to ``layer``
    (its training captures, ``n × (d̃ + outputs)`` numbers, kept in memory by ``fit``),
    ``P = I``, ``w = 1/(2λn)`` and ``f = −Φ_c`` (the target-class logit, oriented lower is
    better), at the checkpoint whose last layer is the explained head (:attr:`weight_`,
    :attr:`bias_`).

    **Sign:** positive = the training example pushes the query's logit of its target class up,
    i.e. toward that class: it *helps*. For cross-entropy ``α_{i,y_i} = (1 − p_{i,y_i})/(2λn) ≥
    0``, so training examples of class ``c`` with features aligned with the query are proponents
    and those of other classes with aligned features are opponents. A binary classifier with one
    output logit ``s`` (logits ``[0, s]``) uses ``+α_i`` for target class 1, ``−α_i`` for 0.
    **Orientation:** ``score`` returns ``[n_query, n_train]``. The task's ``measurement`` setting
    is not used: representer scores always explain the target-class logit.

    **Stationarity and refitting.** The decomposition is exact only at a stationary point of
    ``J``. With ``refit=True`` (default, as in the paper) the last layer is re-optimized on the
    fixed training features with the L2 penalty ``λ ‖W̃‖²`` (L-BFGS then Newton steps, in
    float64, from the model's own weights, until the relative stationarity residual
    ``‖W̃ − Σ_i α_i f̃_iᵀ‖_F / ‖W̃‖_F`` is below ``tol``); the scores then explain the
    *refitted* head (:attr:`weight_`, :attr:`bias_`), whose predictions usually agree with the
    model's (:attr:`refit_agreement_`). With ``refit=False`` the model's own head is used and
    the decomposition is only approximate: :attr:`stationarity_residual_` reports by how much.
    Scores are computed in the model's precision (the head is rounded to it).

    Args:
        model: the network; evaluated functionally at ``checkpoint`` in eval mode (not modified).
            Its output must be the output of ``layer`` (checked on every batch).
        task: must be a :class:`~traintrace.Classification` task for scores (its loss is
            cross-entropy); the refit calls ``task.loss(logits, (features, labels))``.
        checkpoint: the state to explain.
        layer: name of the last ``nn.Linear`` module (default: the last module with parameters).
        l2: ``λ > 0`` of the penalty ``λ ‖W̃‖²`` (not ``λ/2``; this matches ``α``'s ``1/(2λn)``).
            Smaller ``λ`` lets the refitted head follow the model's head more closely and makes
            ``α`` larger.
        refit: re-optimize the last layer to stationarity (see above).
        tol: target of the relative stationarity residual for the refit.
        max_iter: L-BFGS iterations of the refit.
        newton_steps: Newton steps (conjugate gradient on Hessian-vector products of the head
            objective) that polish the L-BFGS result to ``tol``; a warning states the residual
            reached if ``tol`` is not met.
        batch_size: used when a Dataset (not a DataLoader) is given.
        collate_fn: how examples of a Dataset become a batch.
        query_block: queries scored together.
        progress: show tqdm progress bars.

    Attributes (after :meth:`fit`):
        alpha_: ``[n_train, outputs]`` representer values ``α_i``.
        features_: ``[n_train, d̃]`` training features ``f̃_i`` (float64).
        labels_: ``[n_train]`` training labels.
        weight_, bias_: the explained head (refitted or the model's), ``[outputs, d]`` and
            ``[outputs]`` (``None`` without bias), float64.
        stationarity_residual_: ``‖W̃ − Σ_i α_i f̃_iᵀ‖_F / ‖W̃‖_F`` (0 at a stationary point).
        refit_agreement_: fraction of training examples where the explained head and the model
            predict the same class (1.0 without refit).

    Cost: ``fit`` is one forward pass over the training set, the refit (each L-BFGS step and each
    Newton-CG product costs ``O(n d̃ C)``), and one forward pass plus a backward to the last
    layer's output (the engine's capture, kept); memory ``n × (d̃ + C)`` twice (the float64
    attributes and the capture). ``score`` / ``top_k`` are one forward and last-layer backward
    per query and the engine's factored contraction, ``O(n_query n (d̃ + C))``; no per-example
    parameter gradient is formed and the training set is not run again.
    :meth:`self_influence` is ``O(n (d̃ + C))``, free after fit.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoint: Checkpoint,
        *,
        layer: str | None = None,
        l2: float = 1e-3,
        refit: bool = True,
        tol: float = 1e-10,
        max_iter: int = 500,
        newton_steps: int = 10,
        batch_size: int = 256,
        collate_fn: Any = None,
        query_block: int = 1024,
        progress: bool = True,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigurationError(
                f"task must be a traintrace Task (tt.Classification(), ...), got {task!r}"
            )
        if not isinstance(checkpoint, Checkpoint):
            raise ConfigurationError(
                f"checkpoint must be a traintrace.Checkpoint, got {type(checkpoint).__name__}; "
                "wrap a state dict or path as tt.Checkpoint(state)"
            )
        if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 > 0):
            raise ConfigurationError(
                f"l2 must be a finite number > 0 (the representer values are -1/(2·l2·n) · ∂L/∂Φ), "
                f"got {l2!r}"
            )
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ConfigurationError(f"tol must be > 0, got {tol!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ConfigurationError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        if not isinstance(newton_steps, int) or newton_steps < 0:
            raise ConfigurationError(f"newton_steps must be an integer >= 0, got {newton_steps!r}")
        self.layer, self._module = module_by_name(model, layer)
        if not isinstance(self._module, nn.Linear):
            raise ConfigurationError(
                f"representer points need the last layer to be an nn.Linear; {self.layer!r} is "
                f"a {type(self._module).__name__}. Pass layer= the name of the final Linear "
                "layer (the model's output must be that layer's output)."
            )
        self.checkpoint = checkpoint
        self.l2 = float(l2)
        self.refit = refit
        self.tol = float(tol)
        self.max_iter = max_iter
        self.newton_steps = newton_steps
        self._head_state: dict[str, Tensor] = {}  # the explained head, set by fit
        self._logit_task = target_logit_task(task)  # f = Φ_c, the target-class logit
        super().__init__(
            model,
            task,
            [checkpoint],  # evaluated with its head replaced by the explained one (state())
            # R: exact last-layer gradients; queries measure the target-class logit Φ_c
            featurizer=ExactStream(
                ExactGradients(model, self._logit_task, [self.layer]), keep_captures=True
            ),
            preconditioners=[Identity()],  # P = I
            weights=[math.nan],  # w = 1/(2λn): set by fit, once n is known
            batch_size=batch_size,
            collate_fn=collate_fn,
            query_block=query_block,
            progress=progress,
        )

    # -- the state: the checkpoint with the explained head ---------------------------------------
    def _param(self, kind: str) -> str:
        return f"{self.layer}.{kind}" if self.layer else kind

    def state(self, c: int) -> dict[str, Tensor]:
        """The checkpoint's state with the last layer replaced by the explained head."""
        state = dict(self.checkpoint.state_for(self.model))
        for name, value in self._head_state.items():
            state[name] = value.to(device=state[name].device, dtype=state[name].dtype)
        return state

    # -- features --------------------------------------------------------------------------
    def _collect(
        self, loader: DataLoader, state: dict[str, Tensor], desc: str
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Features ``f`` ``[n, d]``, model outputs ``[n, C]`` and labels (or None) of ``data``."""
        captured: list[tuple[Tensor, Tensor]] = []

        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            captured.append((inputs[0].detach(), output.detach()))

        feats, outs, labels = [], [], []
        has_labels: bool | None = None
        handle = self._module.register_forward_hook(hook)
        try:
            with eval_mode(self.model), torch.no_grad():
                batches = iterate_batches(loader, self.device)
                total = len(loader) if dataset_length(loader) is not None else None
                for offset, batch in tqdm(
                    batches, total=total, desc=desc, unit="batch", disable=not self.progress
                ):
                    captured.clear()
                    out = forward_at(self.model, self.task, state, batch)
                    f, layer_out = self._check_capture(captured, out, offset)
                    feats.append(f)
                    outs.append(layer_out)
                    y = self.task.labels(batch, required=False)
                    if has_labels is None:
                        has_labels = y is not None
                    elif has_labels != (y is not None):
                        raise BatchFormatError(
                            "some batches have labels and others do not; give labels for all "
                            "examples or for none"
                        )
                    if y is not None:
                        labels.append(y.reshape(-1).to(self.device))
        finally:
            handle.remove()
        if not feats:
            raise ConfigurationError("the data set is empty")
        return (
            torch.cat(feats),
            torch.cat(outs),
            torch.cat(labels) if has_labels else None,
        )

    def _check_capture(
        self, captured: list[tuple[Tensor, Tensor]], out: Tensor, offset: int
    ) -> tuple[Tensor, Tensor]:
        if len(captured) != 1:
            raise ConfigurationError(
                f"layer {self.layer!r} ran {len(captured)} times in one forward pass; "
                "representer points need it to run exactly once, as the model's output layer"
            )
        f, layer_out = captured[0]
        if f.ndim != 2 or layer_out.ndim != 2:
            raise ConfigurationError(
                f"layer {self.layer!r} got input of shape {tuple(f.shape)}; representer points "
                "need one feature vector per example ([batch, features]), not sequences"
            )
        flat = out.reshape(out.shape[0], -1)
        if flat.shape != layer_out.shape or not torch.allclose(
            flat, layer_out, rtol=1e-5, atol=1e-6 * max(1.0, float(layer_out.abs().max()))
        ):
            raise ConfigurationError(
                f"the model's output (batch at example {offset}) is not the output of layer "
                f"{self.layer!r}: something runs after it (a scaling, softmax or another layer). "
                "Representer points decompose the output of the final Linear layer; pass that "
                "layer as layer=, or wrap the model so that it returns its logits."
            )
        return f, layer_out

    def _augment(self, f: Tensor) -> Tensor:
        f = f.to(torch.float64)
        if self._module.bias is None:
            return f
        return torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype, device=f.device)], dim=1)

    # -- the head ------------------------------------------------------------------------------
    def _loss_grad(self, w: Tensor, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss over the training set and ``∂L_i/∂Φ_i`` ``[n, C]`` at head ``w``."""
        logits = (features @ w.T).detach().requires_grad_(True)
        losses = self.task.loss(logits, (features, labels))
        if losses.shape != (features.shape[0],):
            raise BatchFormatError(
                f"task.loss returned shape {tuple(losses.shape)}, expected one value per example"
            )
        (g,) = torch.autograd.grad(losses.sum(), logits)
        return losses.mean().detach(), g

    def _alpha(self, w: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        _, g = self._loss_grad(w, features, labels)
        return -g / (2.0 * self.l2 * features.shape[0])

    def _residual(self, w: Tensor, alpha: Tensor, features: Tensor) -> float:
        return float((w - alpha.T @ features).norm() / w.norm().clamp_min(1e-300))

    def _objective(self, features: Tensor, labels: Tensor) -> Any:
        def objective(w: Tensor) -> Tensor:
            losses = self.task.loss(features @ w.T, (features, labels))
            return losses.mean() + self.l2 * (w * w).sum()

        return objective

    def _refit(self, w0: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        """Minimize ``(1/n) Σ L(W̃ f̃_i) + λ‖W̃‖²`` from ``w0`` (float64, full batch).

        L-BFGS with a strong-Wolfe line search does the bulk; near the minimum, loss decreases
        fall below float64 resolution and line searches stall, so Newton steps (conjugate
        gradient on exact Hessian-vector products) polish to the stationarity target, judged by
        the gradient alone.
        """
        objective = self._objective(features, labels)
        target = self.tol
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [w],
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def relative(grad: Tensor, point: Tensor) -> float:
            # ‖∇J‖ / (2λ‖W̃‖) equals ‖W̃ − Σ α_i f̃_iᵀ‖ / ‖W̃‖ (the stationarity residual)
            return float(grad.norm() / (2 * self.l2 * point.norm().clamp_min(1e-300)))

        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective(w)
            loss.backward()
            if relative(w.grad, w.detach()) <= target:
                w.grad.zero_()  # L-BFGS stops when its gradient test sees 0 <= tolerance_grad
            return loss

        opt.step(closure)
        w = w.detach()
        gradient = torch.func.grad(objective)
        for _ in range(self.newton_steps):
            g = gradient(w)
            if relative(g, w) <= target:
                break

            def hvp(v: Tensor, w: Tensor = w) -> Tensor:
                return torch.func.jvp(gradient, (w,), (v,))[1]

            step = _conjugate_gradient(hvp, -g, tol=1e-2, max_iter=min(w.numel(), 500))
            candidate = w + step
            if relative(gradient(candidate), candidate) >= relative(g, w):
                break  # no progress left at float64 resolution
            w = candidate
        return w

    def _before_fit(self, loader: DataLoader, n: int) -> None:
        """Training features, the (re)fitted head, ``α`` and ``w = 1/(2λn)``; ``R``'s capture
        then runs at the checkpoint with that head (:meth:`state`)."""
        state = self.checkpoint.state_for(self.model)
        f, outputs, labels = self._collect(loader, state, "Representer fit")
        if labels is None:
            raise BatchFormatError(
                "representer points need the training labels; the training batches have none"
            )
        features = self._augment(f)
        weight = state[self._param("weight")].to(torch.float64)
        w = (
            weight
            if self._module.bias is None
            else torch.cat([weight, state[self._param("bias")].to(torch.float64)[:, None]], dim=1)
        )
        if self.refit:
            w = self._refit(w, features, labels)
        alpha = self._alpha(w, features, labels)
        residual = self._residual(w, alpha, features)
        if self.refit and residual > self.tol:
            warnings.warn(
                f"RepresenterPoints: the refitted last layer reached a relative stationarity "
                f"residual of {residual:.3g} (target tol={self.tol:g}) after max_iter="
                f"{self.max_iter} L-BFGS iterations and {self.newton_steps} Newton steps; the "
                "decomposition Σ α_i k(x_i, x') is off by about that "
                "fraction of the logits. Raise max_iter, or l2 (better conditioned).",
                RuntimeWarning,
                stacklevel=4,  # the caller of fit
            )
        self.features_ = features
        self.labels_ = labels
        self.alpha_ = alpha
        self.weight_ = w[:, : f.shape[1]].clone()
        self.bias_ = w[:, -1].clone() if self._module.bias is not None else None
        self.stationarity_residual_ = residual
        self.refit_agreement_ = float(
            (_predicted(features @ w.T) == _predicted(outputs.to(torch.float64))).double().mean()
        )
        self._dtype = outputs.dtype
        self._head_state = {self._param("weight"): self.weight_}
        if self.bias_ is not None:
            self._head_state[self._param("bias")] = self.bias_
        self.weights = [1.0 / (2.0 * self.l2 * n)]  # w = 1/(2λn)

    def fit(self, train: Data) -> RepresenterPoints:
        """Compute training features, (re)fit the head and the representer values, and capture
        the last layer's training gradients at the explained head. Returns self.

        Example ``i`` is the ``i``-th example in iteration order (a shuffled loader is refused).
        """
        if train is None:
            raise ConfigurationError("RepresenterPoints.fit() needs the training data")
        return super().fit(train)

    # -- scores --------------------------------------------------------------------------------
    def _check_classification(self) -> None:
        if not isinstance(self.task, Classification):
            raise ConfigurationError(
                f"RepresenterPoints scores need a Classification task (the query's target class "
                f"picks the entry of α); got {type(self.task).__name__}. For other tasks use "
                ".decompose(queries), the representer decomposition of every output."
            )

    def _score_blocks(self, queries: Data, journal: ScoreJournal | None = None) -> Iterator[Tensor]:
        self._check_classification()
        yield from super()._score_blocks(queries, journal)

    def top_k(self, queries: Data, k: int = 10, **options: Any) -> TopK:
        """The ``k`` strongest proponents and opponents of each query, ``[n_query, k]`` each
        (exact, streamed against the kept last-layer captures; ``options`` as in
        :meth:`GradientEstimator.top_k`)."""
        self._check_fitted()
        self._check_classification()
        return super().top_k(queries, k, **options)

    def _head(self) -> Tensor:
        if self.bias_ is None:
            return self.weight_
        return torch.cat([self.weight_, self.bias_[:, None]], dim=1)

    def decompose(self, queries: Data) -> Tensor:
        """The representer decomposition of every output, ``Σ_i α_i (f̃_i · f̃')`` ``[n_query, C]``.

        Equals the explained head's outputs ``W f' + b`` (:attr:`weight_`, :attr:`bias_`) up to
        :attr:`stationarity_residual_` (exactly at a stationary point). Works for any task.
        Cost: one forward pass per query and ``O(n_query n d̃)``.
        """
        self._check_fitted()
        state = self.checkpoint.state_for(self.model)
        f, _, _ = self._collect(self._loader(queries), state, "Representer decompose")
        return (self._augment(f) @ self.features_.T) @ self.alpha_

    def self_influence(self) -> Tensor:
        """``α_{i,y_i} · ‖f̃_i‖²`` per training example, ``[n_train]``: the diagonal of
        ``score(train, train)``, ``w · ⟨∇_W̃ f(x_i), ∇_W̃ L(x_i)⟩`` with the query measurement
        ``f = −Φ_{y_i}`` (not the loss: this is not ``w ‖∇L‖²``).

        For cross-entropy ``α_{i,y_i} = (1 − p_{i,y_i})/(2λn) ≥ 0``: large for examples the head
        fits poorly (mislabeled, atypical) and with large features. The paper ranks training
        examples by ``|α_{i,y_i}|`` instead; that is ``alpha_`` indexed by ``labels_``. Cost:
        ``O(n (d̃ + C))``, free after fit.
        """
        self._check_fitted()
        self._check_classification()
        # both gradients are rank one on the same features: ⟨a f̃ᵀ, b f̃ᵀ⟩ = (a · b) ‖f̃‖², with
        # a = ∂f/∂Φ from the task's own target-class logit and w · b = w · ∂L/∂Φ = −α
        logits = (self.features_ @ self._head().T).requires_grad_(True)
        measured = self._logit_task.oriented_measurement(logits, (self.features_, self.labels_))
        (d_measure,) = torch.autograd.grad(measured.sum(), logits)
        own = -(d_measure * self.alpha_).sum(dim=1)
        return (own * self.features_.square().sum(dim=1)).to(self._dtype)


def _conjugate_gradient(matvec: Any, b: Tensor, *, tol: float, max_iter: int) -> Tensor:
    """``x ≈ A⁻¹ b`` for a symmetric positive definite ``A`` given by ``matvec`` (any shape)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float((r * r).sum())
    stop = (tol * float(b.norm())) ** 2
    for _ in range(max_iter):
        if rs <= stop:
            break
        ap = matvec(p)
        curvature = float((p * ap).sum())
        if curvature <= 0:
            break
        step = rs / curvature
        x = x + step * p
        r = r - step * ap
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def _predicted(outputs: Tensor) -> Tensor:
    outputs = outputs.reshape(outputs.shape[0], -1)
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0).long()
    return outputs.argmax(dim=1)
