"""The ``traintrace`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from traintrace.interfaces.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        output=Path(args.output),
        seed=args.seed,
        epochs=args.epochs,
        checkpoints=args.checkpoints,
        progress=not args.quiet,
    )
    result = run_demo(cfg)
    print(result.summary())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from traintrace.interfaces.evaluate import EvaluateConfig, run_evaluation

    make = EvaluateConfig.quick if args.quick else EvaluateConfig
    cfg = make(
        output=Path(args.output), seed=args.seed, workers=args.workers, progress=not args.quiet
    )
    result = run_evaluation(cfg)
    print(result.table())
    print(f"results: {cfg.output / 'results.json'}; report: {result.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from traintrace import __version__

    parser = argparse.ArgumentParser(
        prog="traintrace",
        description="Trace a model's predictions back to the training examples responsible.",
    )
    parser.add_argument("--version", action="version", version=f"traintrace {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a CNN on digits with flipped labels, run TracIn, write an HTML report",
    )
    demo.add_argument(
        "--output", default="demo-output", help="folder for the report and checkpoints"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed for the split, label flips and training"
    )
    demo.add_argument("--epochs", type=int, default=60, help="training epochs")
    demo.add_argument("--checkpoints", type=int, default=5, help="checkpoints saved for TracIn")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    ev = sub.add_parser(
        "evaluate",
        help="run every estimator on a digits MLP and rank them by LDS, LOO correlation, "
        "mislabel AUROC and time",
    )
    ev.add_argument("--output", default="evaluate-output", help="folder for results and cache")
    ev.add_argument("--seed", type=int, default=0, help="seed for data, flips and training")
    ev.add_argument("--workers", type=int, default=2, help="retraining processes (1: in-process)")
    ev.add_argument("--quick", action="store_true", help="a small configuration (smoke test)")
    ev.add_argument("--quiet", action="store_true", help="no progress output")
    ev.set_defaults(func=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        from traintrace.exceptions import TraintraceError

        if isinstance(exc, TraintraceError):
            print(f"traintrace: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
