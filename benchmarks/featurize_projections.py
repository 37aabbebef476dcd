"""Cost of projected featurizing relative to training: featurize one checkpoint / one epoch.

For three models of about a million parameters or less — an MLP (784-1024-256-10), a small CNN
(two convolutions with BatchNorm, two Linear layers) and a tiny GPT-2 built from a config (4
layers, width 128, vocabulary 1000, sequences of 32 tokens) — this measures, in one run on the
same data and batch size:

* one training epoch: forward + backward + SGD step per batch;
* featurizing the data set at one checkpoint with ``ProjectedGradients.features`` for each
  projection kind: ``kronecker`` (hooks, one forward + one backward per batch, no per-example
  gradient), and ``gaussian`` / ``rademacher`` / ``sjlt`` (exact vmap per-example gradients
  multiplied by ``R`` in seeded blocks).

Both sides run with ``--threads`` intra-op threads (default 1: on a shared machine two threads
wait on each other at every small operation, which inflates whichever side has more of them).
It prints a table of ratios featurize / epoch (medians over ``--repeats`` interleaved timings, so
background load hits both sides alike). The Kronecker target is ≤ 1.5. The dense kinds are
timed at ``--dense-dim`` (smaller than ``--dim``: they cost ``n·P·k`` multiply-adds plus drawing
``P·k`` random numbers, which the block cache amortizes over batches when ``P·k`` fits in
``--cache-mib``); their ratio grows linearly with ``k``.

    .venv/bin/python benchmarks/featurize_projections.py [--n 512] [--batch 64] [--dim 4096]
        [--dense-dim 256] [--repeats 3] [--threads 1] [--models mlp,cnn,gpt2] [--kinds kronecker,gaussian,...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import traintrace as tt
from traintrace.features.projections import ProjectedGradients, Projection

KINDS = ("kronecker", "gaussian", "rademacher", "sjlt")


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=4,
        n_head=4,
        n_embd=128,
        vocab_size=1000,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


def setup(name: str, n: int, batch: int) -> tuple[nn.Module, tt.Task, list[Any]]:
    gen = torch.Generator().manual_seed(0)
    if name == "gpt2":
        model = gpt2()
        ids = torch.randint(0, 1000, (n, 32), generator=gen)
        batches: list[Any] = [
            {"input_ids": ids[i : i + batch], "attention_mask": torch.ones_like(ids[i : i + batch])}
            for i in range(0, n, batch)
        ]
        return model, tt.LanguageModeling(), batches
    model = mlp() if name == "mlp" else cnn()
    shape = (784,) if name == "mlp" else (1, 28, 28)
    x = torch.randn(n, *shape, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    return model, tt.Classification(), batches


def one_epoch(model: nn.Module, task: tt.Task, batches: list[Any]) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    start = time.perf_counter()
    for b in batches:
        opt.zero_grad()
        task.loss(task.forward(model, b), b).mean().backward()
        opt.step()
    return time.perf_counter() - start


def featurize(pg: ProjectedGradients, state: dict, batches: list[Any]) -> float:
    start = time.perf_counter()
    offset = 0
    for b in batches:
        f = pg.features(state, b, offset=offset)
        offset += f.shape[0]
    return time.perf_counter() - start


def median_time(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="examples (sequences for gpt2)")
    parser.add_argument("--batch", type=int, default=64, help="batch size for both sides")
    parser.add_argument("--dim", type=int, default=4096, help="Kronecker projection dim")
    parser.add_argument("--dense-dim", type=int, default=256, help="dim of the dense/sparse kinds")
    parser.add_argument("--repeats", type=int, default=3, help="timings per side (median)")
    parser.add_argument("--dense-repeats", type=int, default=1, help="timings of dense kinds")
    parser.add_argument("--cache-mib", type=float, default=1024.0, help="R block cache (MiB)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: robust on a shared box)"
    )
    parser.add_argument("--models", default="mlp,cnn,gpt2")
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    kinds = args.kinds.split(",")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, n={args.n}, batch "
        f"{args.batch}; kronecker dim {args.dim}, dense/sparse dim {args.dense_dim}"
    )
    rows = []
    for name in models:
        torch.manual_seed(0)
        model, task, batches = setup(name, args.n if name != "gpt2" else args.n // 2, args.batch)
        n_params = sum(p.numel() for p in model.parameters())
        one_epoch(model, task, batches[:2])  # warm-up
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        epochs: list[float] = []
        ratios: dict[str, float] = {}
        widths: dict[str, int] = {}
        for kind in kinds:
            dim = args.dim if kind == "kronecker" else args.dense_dim
            pg = ProjectedGradients(
                model, task, projection=Projection(dim, kind), cache_mib=args.cache_mib
            )
            widths[kind] = pg.width
            pg.features(state, batches[0])  # warm-up (first-batch checks, R cache)
            reps = args.repeats if kind == "kronecker" else args.dense_repeats
            times, kind_epochs = [], []
            for _ in range(reps):  # interleaved with epochs
                kind_epochs.append(one_epoch(model, task, batches))
                times.append(featurize(pg, state, batches))
            epochs.extend(kind_epochs)
            ratios[kind] = statistics.median(times) / statistics.median(kind_epochs)
            print(
                f"  {name:5s} {kind:10s} width {pg.width:5d}: featurize "
                f"{statistics.median(times):7.3f} s, epoch {statistics.median(kind_epochs):.3f} s,"
                f" ratio {ratios[kind]:6.2f}",
                flush=True,
            )
        n_ex = sum(tt.data.batch_size_of(b) for b in batches)
        rows.append((name, n_params, n_ex, statistics.median(epochs), ratios, widths))

    print()
    print("featurize one checkpoint / one training epoch (lower is better; Kronecker target ≤ 1.5)")
    header = f"{'model':6s} {'params':>10s} {'examples':>8s} {'epoch s':>8s} " + " ".join(
        f"{k:>11s}" for k in kinds
    )
    print(header)
    for name, n_params, n_ex, epoch, ratios, widths in rows:
        cells = " ".join(f"{ratios[k]:6.2f} ({widths[k]})".rjust(11) for k in kinds)
        print(f"{name:6s} {n_params:10,d} {n_ex:8d} {epoch:8.3f} {cells}")
    print("(width of the features in parentheses)")


if __name__ == "__main__":
    main()
