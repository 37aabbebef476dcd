"""``traintrace demo --text``: TracIn on text, after the TracIn paper's Google Assistant example.

1. Generate a templated intent data set ("set an alarm for 7", "disable my timer", "will it rain
   in paris tomorrow", ...; six intents), and flip 10% of the training labels (fixed seed).
2. Train a small embedding-bag classifier (token embeddings averaged, then an MLP; sizes from
   :class:`TextDemoConfig`) with SGD, saving checkpoints with their optimizer state.
3. TracIn over the checkpoints: for a few test sentences, the training sentences that raise
   (proponents) and lower (opponents) the margin of the sentence's true intent — "disable my
   alarm" is opposed by "disable my timer"; self-influence ranks the training set, and the
   flipped labels come first.
4. ``<output>/report.html`` through :func:`traintrace.report`, with the sentences as text.

Runs on 2 CPU cores in a few seconds; nothing is downloaded.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import traintrace as tt
from traintrace.interfaces.demo import DemoResult, check_demo

__all__ = [
    "INTENTS",
    "IntentClassifier",
    "TextDemoConfig",
    "Vocabulary",
    "intent_dataset",
    "run_text_demo",
]

#: Intent name -> sentence templates; ``{slot}`` is filled from :data:`_SLOTS`.
INTENTS: dict[str, tuple[str, ...]] = {
    "set_alarm": (
        "set an alarm for {time}",
        "wake me up at {time}",
        "set my alarm to {time}",
        "i need an alarm at {time}",
    ),
    "disable_alarm": (
        "disable my alarm",
        "turn off my alarm",
        "cancel the alarm for {time}",
        "stop my {time} alarm",
    ),
    "set_timer": (
        "set a timer for {n} minutes",
        "start a {n} minute timer",
        "time {n} minutes for me",
        "count down {n} minutes",
    ),
    "disable_timer": (
        "disable my timer",
        "turn off the timer",
        "cancel my {n} minute timer",
        "stop the timer",
    ),
    "weather": (
        "what is the weather in {city}",
        "will it rain in {city} {day}",
        "how hot is it in {city}",
        "weather forecast for {day}",
    ),
    "play_music": (
        "play {artist}",
        "play some {genre} music",
        "put on {artist}",
        "i want to hear {genre}",
    ),
}
_SLOTS = {
    "time": ("7", "7 am", "6 30", "noon", "8 pm", "5", "half past six"),
    "n": ("5", "10", "15", "20", "30", "45"),
    "city": ("paris", "london", "tokyo", "berlin", "lima"),
    "day": ("today", "tomorrow", "on sunday", "this weekend"),
    "artist": ("the beatles", "miles davis", "adele", "bach"),
    "genre": ("jazz", "rock", "classical", "pop"),
}
_PREFIXES = ("", "", "", "please ", "hey ", "could you ")
_SUFFIXES = ("", "", "", " please", " now", " thanks")


def intent_dataset(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` templated sentences and their intent indices (into :data:`INTENTS`), seeded."""
    rng = np.random.default_rng(seed)
    names = list(INTENTS)
    sentences, labels = [], []
    for _ in range(n):
        label = int(rng.integers(len(names)))
        template = INTENTS[names[label]][int(rng.integers(len(INTENTS[names[label]])))]
        slots = {k: v[int(rng.integers(len(v)))] for k, v in _SLOTS.items()}
        text = template.format(**slots)
        text = _PREFIXES[int(rng.integers(len(_PREFIXES)))] + text
        text += _SUFFIXES[int(rng.integers(len(_SUFFIXES)))]
        sentences.append(text)
        labels.append(label)
    return sentences, labels


class Vocabulary:
    """Whitespace tokens of the training sentences; id 0 pads, id 1 is an unknown word."""

    def __init__(self, sentences: list[str]) -> None:
        words = sorted({w for s in sentences for w in self.split(s)})
        self.words = ["<pad>", "<unk>", *words]
        self.ids = {w: i for i, w in enumerate(self.words)}

    @staticmethod
    def split(sentence: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", sentence.lower())

    def encode(self, sentences: list[str], length: int) -> torch.Tensor:
        """``[n, length]`` token ids, padded with 0 (longer sentences are cut)."""
        out = torch.zeros(len(sentences), length, dtype=torch.long)
        for row, s in enumerate(sentences):
            ids = [self.ids.get(w, 1) for w in self.split(s)][:length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> str:
        """The words of one row of token ids, padding dropped."""
        return " ".join(self.words[int(i)] for i in ids if int(i) != 0)


class IntentClassifier(nn.Module):
    """An embedding bag: the mean of the token embeddings (padding excluded), then an MLP."""

    def __init__(self, vocab_size: int, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        bag = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.out(torch.relu(self.hidden(bag)))


@dataclass
class TextDemoConfig:
    """Settings of the text demo (the defaults are what ``traintrace demo --text`` runs)."""

    output: Path = Path("demo-text-output")
    seed: int = 0
    n_train: int = 600
    n_test: int = 150
    flip_fraction: float = 0.1
    length: int = 12
    dim: int = 32
    hidden: int = 32
    epochs: int = 30
    checkpoints: int = 5
    lr: float = 0.2
    queries: int = 6
    k: int = 5
    top_self_influence: int = 24
    progress: bool = True

    def __post_init__(self) -> None:
        check_demo(self)
        for name in ("n_train", "n_test", "length", "dim", "hidden", "queries", "k"):
            if getattr(self, name) < 1:
                raise tt.ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")


def _train(cfg: TextDemoConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[Path]:
    """SGD with momentum; saves model + optimizer state (so TracIn reads η) at checkpoints."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    save_at = set(
        np.linspace(cfg.epochs / cfg.checkpoints, cfg.epochs, cfg.checkpoints).round().astype(int)
    )
    folder = cfg.output / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch in tqdm(
        range(1, cfg.epochs + 1), desc="train intents", unit="epoch", disable=not cfg.progress
    ):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        if epoch in save_at:
            path = folder / f"epoch_{epoch:03d}.pt"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            paths.append(path)
    return paths


def _pick_queries(
    sentences: list[str], pred: torch.Tensor, truth: torch.Tensor, count: int
) -> list[int]:
    """ "disable my alarm" when present, then misclassified and correct sentences, in order."""
    first = [i for i, s in enumerate(sentences) if s == "disable my alarm"][:1]
    wrong = [i for i in (pred != truth).nonzero().flatten().tolist() if i not in first]
    right = [i for i in (pred == truth).nonzero().flatten().tolist() if i not in first]
    n_wrong = min(len(wrong), (count - len(first)) // 2)
    return first + sorted(wrong[:n_wrong] + right[: count - len(first) - n_wrong])


def run_text_demo(cfg: TextDemoConfig | None = None) -> DemoResult:
    """Run the text demo and write the report. Returns the measured figures."""
    cfg = cfg or TextDemoConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    names = list(INTENTS)
    train_text, y_clean = intent_dataset(cfg.n_train, cfg.seed)
    test_text, y_test_list = intent_dataset(cfg.n_test, cfg.seed + 1)
    test_text[0], y_test_list[0] = "disable my alarm", names.index("disable_alarm")
    rng = np.random.default_rng(cfg.seed)
    flip_idx = rng.choice(cfg.n_train, round(cfg.flip_fraction * cfg.n_train), replace=False)
    y_noisy = torch.tensor(y_clean)
    y_noisy[flip_idx] = (
        y_noisy[flip_idx] + torch.from_numpy(rng.integers(1, 6, len(flip_idx)))
    ) % 6
    flipped = torch.zeros(cfg.n_train, dtype=torch.bool)
    flipped[flip_idx] = True

    vocab = Vocabulary(train_text)
    x_train = vocab.encode(train_text, cfg.length)
    x_test = vocab.encode(test_text, cfg.length)
    y_test = torch.tensor(y_test_list)
    torch.manual_seed(cfg.seed)
    model = IntentClassifier(len(vocab.words), cfg.dim, cfg.hidden, len(names))
    paths = _train(cfg, model, x_train, y_noisy)
    timings["train"] = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        test_pred = model(x_test).argmax(1)
        train_loss = F.cross_entropy(model(x_train), y_noisy, reduction="none")
    test_acc = float((test_pred == y_test).float().mean())

    t1 = time.perf_counter()
    train = TensorDataset(x_train, y_noisy)
    tracin = tt.TracIn(
        model,
        tt.Classification("margin"),
        [tt.Checkpoint(p) for p in paths],
        batch_size=128,
        progress=cfg.progress,
    ).fit(train)
    self_inf = tracin.self_influence()
    q_idx = _pick_queries(test_text, test_pred, y_test, cfg.queries)
    queries = TensorDataset(x_test[q_idx], y_test[q_idx])
    top = tracin.top_k(queries, k=cfg.k)
    timings["TracIn"] = time.perf_counter() - t1

    detection = {
        "TracIn self-influence": tt.mislabel_detection(self_inf, flipped),
        "final-model training loss": tt.mislabel_detection(train_loss, flipped),
    }
    captions = [
        [
            f"predicted {names[int(test_pred[i])]}",
            "correct" if test_pred[i] == y_test[i] else "WRONG",
        ]
        for i in q_idx
    ]
    path = tt.report(
        cfg.output / "report.html",
        train=train,
        queries=queries,
        top=top,
        self_influence=self_inf,
        flipped=flipped,
        baselines={"final-model training loss": train_loss},
        text=lambda example: vocab.decode(example[0]),
        label_names=names,
        query_captions=captions,
        top_self_influence=cfg.top_self_influence,
        title="traintrace text demo — which training sentences made the model do this?",
        method=(
            f"An embedding-bag intent classifier ({sum(p.numel() for p in model.parameters()):,} "
            f"parameters) on {cfg.n_train} templated sentences, {int(flipped.sum())} of them "
            f"with a flipped intent; test accuracy {test_acc:.1%}. TracIn over {len(paths)} "
            "checkpoints (learning rates read from the saved optimizer state)"
        ),
        explains=(
            "each test sentence's logit margin of its TRUE intent (shown as its label): a "
            "proponent raises it, an opponent pushes the model towards another intent (the "
            "TracIn paper found 'disable my alarm' opposed by 'disable my timer'). Mislabeled "
            "sentences have large gradients, so they often top both lists"
        ),
    )
    timings["total"] = time.perf_counter() - t0
    return DemoResult(
        path,
        test_acc,
        cfg.n_train,
        int(flipped.sum()),
        detection,
        timings,
        title="traintrace text demo",
        model="intent classifier",
        examples="training sentences",
    )
