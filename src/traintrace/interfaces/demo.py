"""``traintrace demo``: the whole story on scikit-learn's digits, ending in an HTML report.

1. Train a LeNet-style CNN on ``load_digits`` with 10% of the training labels flipped (fixed
   seed), saving checkpoints (model + optimizer state) and the learning rate in force during
   the epoch that ended at each (``scheduler.get_last_lr()`` before ``scheduler.step()``).
2. TracIn over the checkpoints: proponents and opponents of a few test images, beside the
   nearest neighbours in the penultimate-layer embedding. Each score explains one label's logit
   margin: the true label's for every test image and, for a misclassified one, also the
   predicted label's (what the model did), side by side.
3. Self-influence ranks the training set; the flipped labels should come first. Compared with
   the loss of the final model as a baseline (recall at 5/10/20% inspected, AUROC).
4. Everything goes into ``<output>/report.html`` (self-contained) and a one-screen summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import traintrace as tt
from traintrace.interfaces.config import check_output_dir, check_seed
from traintrace.interfaces.report import Card, HTMLReport, image_png, img, scored

__all__ = ["DemoConfig", "DemoResult", "LeNet", "run_demo"]


class LeNet(nn.Module):
    """A LeNet-style CNN for 8x8 digits: two conv+pool blocks and two fully connected layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@dataclass
class DemoConfig:
    """Settings of the demo (the defaults are what ``make demo`` runs)."""

    output: Path = Path("demo-output")
    seed: int = 0
    epochs: int = 60
    checkpoints: int = 5
    lr: float = 0.1
    flip_fraction: float = 0.1
    queries: int = 8
    k: int = 5
    top_self_influence: int = 30
    progress: bool = True

    def __post_init__(self) -> None:
        check_demo(self)


def check_demo(cfg: Any) -> None:
    """The checks every demo configuration shares: output folder, seed, schedule, flips."""
    cfg.output = check_output_dir(cfg.output)
    check_seed(cfg.seed)
    if cfg.epochs < cfg.checkpoints or cfg.checkpoints < 1:
        raise tt.ConfigurationError(
            f"need epochs >= checkpoints >= 1, got epochs={cfg.epochs}, "
            f"checkpoints={cfg.checkpoints}"
        )
    if not 0 < cfg.flip_fraction < 1:
        raise tt.ConfigurationError(f"flip_fraction must be in (0, 1), got {cfg.flip_fraction}")


@dataclass
class DemoResult:
    """What the demo measured (also shown in the report)."""

    report: Path
    test_accuracy: float
    n_train: int
    n_flipped: int
    detection: dict[str, tt.MislabelDetection]
    timings: dict[str, float] = field(default_factory=dict)
    #: how the summary names the demo, its model and its examples
    title: str = "traintrace demo"
    model: str = "LeNet on digits"
    examples: str = "training images"

    def summary(self) -> str:
        lines = [
            f"{self.title} — report written to {self.report}",
            f"  {self.model}: {self.n_train} {self.examples}, {self.n_flipped} labels flipped, "
            f"test accuracy {self.test_accuracy:.1%}",
            "  Finding the flipped labels by inspecting the top of each ranking:",
            f"    {'ranking':<28}{'5%':>7}{'10%':>7}{'20%':>7}{'AUROC':>8}",
        ]
        for name, det in self.detection.items():
            r = det.recall
            lines.append(
                f"    {name:<28}{r[0.05]:>7.1%}{r[0.1]:>7.1%}{r[0.2]:>7.1%}{det.auroc:>8.3f}"
            )
        lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _load_digits(seed: int, flip_fraction: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    x_train, y_train = x[idx_train], y[idx_train]
    x_test, y_test = x[idx_test], y[idx_test]
    rng = np.random.default_rng(seed)
    n_flip = round(flip_fraction * len(y_train))
    flip_idx = torch.from_numpy(rng.choice(len(y_train), n_flip, replace=False))
    shift = torch.from_numpy(rng.integers(1, 10, n_flip))
    y_noisy = y_train.clone()
    y_noisy[flip_idx] = (y_train[flip_idx] + shift) % 10
    flipped = torch.zeros(len(y_train), dtype=torch.bool)
    flipped[flip_idx] = True
    return x_train, y_noisy, y_train, flipped, x_test, y_test


def _train(
    cfg: DemoConfig, x: torch.Tensor, y: torch.Tensor, ckpt_dir: Path
) -> tuple[LeNet, list[tt.Checkpoint]]:
    """Plain SGD with a step-decayed learning rate; saves model + optimizer state.

    Each checkpoint carries the learning rate in force during the epoch that ended there, read
    before ``sched.step()``: an optimizer state saved with a scheduler attached cannot tell it
    apart from the next epoch's rate (traintrace warns about that), so it is passed explicitly.
    """
    torch.manual_seed(cfg.seed)
    model = LeNet()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.5)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    save_at = set(
        np.linspace(cfg.epochs / cfg.checkpoints, cfg.epochs, cfg.checkpoints).round().astype(int)
    )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = []
    for epoch in tqdm(
        range(1, cfg.epochs + 1), desc="train LeNet", unit="epoch", disable=not cfg.progress
    ):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        if epoch in save_at:
            # the learning rate in force during the epoch that ended here: TracIn's η_c
            path = ckpt_dir / f"epoch_{epoch:03d}.pt"
            torch.save(
                {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()},
                path,
            )
            checkpoints.append(tt.Checkpoint(path, lr=sched.get_last_lr()[0]))
        sched.step()
    return model, checkpoints


def _pick_queries(pred: torch.Tensor, y_test: torch.Tensor, count: int) -> list[int]:
    """Half misclassified test images (when there are any), half correct ones, deterministic."""
    wrong = (pred != y_test).nonzero().flatten().tolist()
    right = (pred == y_test).nonzero().flatten().tolist()
    n_wrong = min(len(wrong), count // 2)
    return sorted(wrong[:n_wrong] + right[: count - n_wrong])


def run_demo(cfg: DemoConfig | None = None) -> DemoResult:
    """Run the demo and write the report. Returns the measured figures."""
    cfg = cfg or DemoConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x_train, y_noisy, y_clean, flipped, x_test, y_test = _load_digits(cfg.seed, cfg.flip_fraction)
    train = TensorDataset(x_train, y_noisy)
    model, checkpoints = _train(cfg, x_train, y_noisy, cfg.output / "checkpoints")
    timings["train"] = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        test_pred = model(x_test).argmax(1)
        train_logits = model(x_train)
    test_acc = float((test_pred == y_test).float().mean())
    train_pred = train_logits.argmax(1)
    train_loss = F.cross_entropy(train_logits, y_noisy, reduction="none")

    # TracIn over the saved checkpoints, each with the learning rate in force when it was saved.
    # The query side is one label's logit margin, the label given with the query: the true
    # label for every test image, and the predicted one for misclassified images.
    t1 = time.perf_counter()
    tracin = tt.TracIn(
        model, tt.Classification("margin"), checkpoints, batch_size=128, progress=cfg.progress
    )
    tracin.fit(train)
    self_inf = tracin.self_influence()
    q_idx = _pick_queries(test_pred, y_test, cfg.queries)
    queries = TensorDataset(x_test[q_idx], y_test[q_idx])
    top = tracin.top_k(queries, k=cfg.k)
    wrong = [row for row, qi in enumerate(q_idx) if test_pred[qi] != y_test[qi]]
    top_pred = None
    if wrong:
        w_idx = [q_idx[row] for row in wrong]
        top_pred = (wrong, tracin.top_k(TensorDataset(x_test[w_idx], test_pred[w_idx]), k=cfg.k))
    timings["TracIn"] = time.perf_counter() - t1

    knn = tt.EmbeddingKNN(model, tt.Classification(), checkpoints[-1]).fit(train)
    neighbours = knn.top_k(queries, k=cfg.k).proponents

    detection = {
        "TracIn self-influence": tt.mislabel_detection(self_inf, flipped),
        "final-model training loss": tt.mislabel_detection(train_loss, flipped),
    }
    digits = _Digits(x_train, y_noisy, y_clean, flipped, train_pred, x_test, y_test, test_pred)
    report_path = _write_report(
        cfg, digits, checkpoints, tracin, top, top_pred, neighbours, q_idx, self_inf, detection,
        test_acc,
    )  # fmt: skip
    timings["total"] = time.perf_counter() - t0
    return DemoResult(report_path, test_acc, len(train), int(flipped.sum()), detection, timings)


@dataclass
class _Digits:
    """The demo's data, labels (given, true, flipped) and the final model's predictions."""

    x_train: torch.Tensor
    y_noisy: torch.Tensor
    y_clean: torch.Tensor
    flipped: torch.Tensor
    train_pred: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_pred: torch.Tensor


def _write_report(
    cfg: DemoConfig,
    d: _Digits,
    checkpoints: list[tt.Checkpoint],
    tracin: tt.TracIn,
    top: tt.TopK,
    top_pred: tuple[list[int], tt.TopK] | None,
    neighbours: tt.Ranking,
    q_idx: list[int],
    self_inf: torch.Tensor,
    detection: dict[str, tt.MislabelDetection],
    test_acc: float,
) -> Path:
    from matplotlib.figure import Figure

    rep = HTMLReport("traintrace demo — which training digits made the model do this?")
    lrs = ", ".join(f"{c.name}: η={c.learning_rate:g}" for c in checkpoints)
    rep.paragraph(
        f"A LeNet-style CNN ({sum(p.numel() for p in tracin.model.parameters()):,} parameters) "
        f"trained on scikit-learn's digits: {len(d.y_noisy)} training images of which "
        f"{int(d.flipped.sum())} ({cfg.flip_fraction:.0%}) had their label flipped on purpose, "
        f"{len(d.y_test)} test images, test accuracy {test_acc:.1%}. TracIn sums "
        f"η_c · ⟨∇loss(train), −∇m_y(test)⟩ over {len(checkpoints)} checkpoints ({lrs}), the "
        "first-order change of the test image's margin m_y when training steps on the image."
    )
    rep.paragraph(
        "Which label each score explains: TracIn here explains one label's logit margin "
        "m_y = z_y − log Σ_{j≠y} exp z_j of a test image. For every test image that label is "
        "its TRUE label; for a misclassified test image, two more rows explain the PREDICTED "
        "label (what the model actually did). Sign convention: a positive score means a "
        "gradient step on the training image raises that label's margin (it helps the model "
        "towards that label); opponents have the most negative scores and push away from it. "
        "Training images whose label was flipped are shaded red.",
        note=True,
    )

    def train_card(i: int, score_html: str) -> Card:
        cap = [f"#{i} label {int(d.y_noisy[i])}", score_html]
        if d.flipped[i]:
            cap.insert(1, f"(true {int(d.y_clean[i])})")
        return Card(img(image_png(d.x_train[i, 0].numpy()), f"train {i}"), cap, bool(d.flipped[i]))

    # -- mislabel detection ------------------------------------------------------------------
    rep.heading("Finding mislabeled training images", anchor="mislabels")
    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.add_subplot()
    for name, det in detection.items():
        ax.plot(det.inspected, det.found, label=f"{name} (AUROC {det.auroc:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="random order")
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    rep.figure(fig, "mislabel detection curve")
    rep.table(
        ["ranking", "found @5%", "found @10%", "found @20%", "AUROC"],
        [
            [name, *(f"{d.recall[f]:.1%}" for f in (0.05, 0.1, 0.2)), f"{d.auroc:.3f}"]
            for name, d in detection.items()
        ],
    )

    # -- queries -------------------------------------------------------------------------------
    rep.heading(
        f"Test images with their top-{cfg.k} proponents, opponents and embedding neighbours",
        anchor="queries",
    )
    rep.paragraph(
        "Embedding neighbours are the most similar training images in the penultimate layer "
        "(cosine similarity at the last checkpoint): look-alikes, not necessarily the images "
        "that moved the prediction.",
        note=True,
    )
    for row, qi in enumerate(q_idx):
        truth, pred = int(d.y_test[qi]), int(d.test_pred[qi])
        verdict = "correct" if truth == pred else "WRONG"
        query = Card(
            img(image_png(d.x_test[qi, 0].numpy()), f"test {qi}"),
            [f"test #{qi}", f"true {truth}, predicted {pred}", verdict],
            flag=truth != pred,
            big=True,
        )
        rows = [
            ("query", [query]),
            *_attribution_rows(top, row, f"true label {truth}", train_card),
        ]
        if top_pred is not None and row in top_pred[0]:
            rows += _attribution_rows(
                top_pred[1], top_pred[0].index(row), f"predicted label {pred}", train_card
            )
        rows += [
            (
                "embedding kNN",
                [
                    train_card(int(i), f"cos {float(s):.3f}")
                    for i, s in zip(neighbours.indices[row], neighbours.scores[row], strict=True)
                ],
            ),
        ]
        rep.gallery(rows)

    # -- self-influence ------------------------------------------------------------------------
    rep.heading(
        f"The {cfg.top_self_influence} training images with the highest self-influence",
        anchor="self-influence",
    )
    order = torch.argsort(self_inf, descending=True)[: cfg.top_self_influence]
    hits = int(d.flipped[order].sum())
    rep.paragraph(
        f"{hits} of these {len(order)} have a flipped label. Each card shows the given label, the "
        "label the final model predicts, and the self-influence Σ_c η_c ‖∇loss‖²."
    )
    cards = [
        Card(
            img(image_png(d.x_train[int(i), 0].numpy()), f"train {int(i)}"),
            [
                f"#{int(i)} given {int(d.y_noisy[i])}",
                f"predicted {int(d.train_pred[i])}",
                f"FLIPPED (true {int(d.y_clean[i])})" if d.flipped[i] else "clean",
                f"{float(self_inf[i]):.3g}",
            ],
            bool(d.flipped[i]),
        )
        for i in order
    ]
    for start in range(0, len(cards), 10):
        rep.gallery(
            [
                (
                    f"rank {start + 1}-{start + len(cards[start : start + 10])}",
                    cards[start : start + 10],
                )
            ]
        )
    return rep.save(cfg.output / "report.html")


def _attribution_rows(
    top: tt.TopK, row: int, which: str, card: Callable[[int, str], Card]
) -> list[tuple[str, list[Card]]]:
    """Proponent and opponent rows of one query, labelled with the label they explain."""
    return [
        (
            f"{which}: {name}",
            [
                card(int(i), scored(float(s)))
                for i, s in zip(ranking.indices[row], ranking.scores[row], strict=True)
            ],
        )
        for name, ranking in (
            ("proponents (raise its margin)", top.proponents),
            ("opponents (lower it)", top.opponents),
        )
    ]
