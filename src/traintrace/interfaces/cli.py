"""The ``traintrace`` command line.

Commands on the user's own model and data (flags generated from
:class:`~traintrace.interfaces.config.RunConfig`, or ``--config run.toml`` with the same keys)::

    traintrace fit            --model pkg.mod:make --train pkg.mod:train --checkpoints 'ckpt/*.pt'
    traintrace score          ... --queries pkg.mod:test      # scores.npy, scores.csv
    traintrace top-k          ... --queries pkg.mod:test --k 5 # top_k.csv
    traintrace self-influence ...                              # self_influence.csv, .npy
    traintrace report         ... --queries pkg.mod:test       # report.html

``traintrace evaluate --config my.toml`` ranks every estimator on the same model by the LDS
against retrains by the user's ``retrain = "pkg.mod:train_fn"`` (flags and keys generated from
:class:`~traintrace.interfaces.config.EvaluateUserConfig`); without a config or model flags it
runs the built-in digits evaluation. Also the built-in ``demo`` (``--text``: the text demo).

A user error (a named :class:`~traintrace.TraintraceError`) prints its message and exits with
status 2, without a traceback.

Adding a command is one entry in :data:`SUBCOMMANDS`: a name, a help line, a config dataclass
(its fields become the flags and the TOML keys) and a function of the config object::

    SUBCOMMANDS.append(Subcommand("forensics", "find ...", ForensicsConfig, run_forensics))
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from traintrace.exceptions import ConfigurationError
from traintrace.interfaces.config import (
    EvaluateUserConfig,
    RunConfig,
    add_config_arguments,
    check_output_dir,
    check_seed,
    config_from_args,
    load_config,
)

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "main"]


@dataclass(frozen=True)
class Subcommand:
    """A ``traintrace NAME`` command configured by a dataclass.

    Attributes:
        name: the command's name on the command line.
        help: one line shown by ``traintrace --help``.
        config: a dataclass; each field becomes a flag (``batch_size`` → ``--batch-size``) and a
            key of the ``--config`` TOML file; ``__post_init__`` validates it.
        run: called with the config object; returns the exit status (``None`` means 0).
    """

    name: str
    help: str
    config: type
    run: Callable[[Any], int | None]


def _log(message: str) -> None:
    print(f"traintrace: {message}", file=sys.stderr)


def _run_step(step: str) -> Callable[[RunConfig], int]:
    def run(cfg: RunConfig) -> int:
        from traintrace.interfaces.run import Run
        from traintrace.retrieval.topk import import_pandas

        if step != "fit":
            import_pandas()  # before any work: the CSV files need pandas
        r = Run(cfg, log=_log)
        if step == "fit":
            est = r.fit()
            where = cfg.output / "store" if r.uses_store else "nothing stored (streaming)"
            print(f"fitted {type(est).__name__} on {est.n_train_} examples: {where}")
        elif step == "score":
            r.score()
            print(cfg.output / "scores.csv")
        elif step == "top-k":
            r.top_k()
            print(cfg.output / "top_k.csv")
        elif step == "self-influence":
            r.self_influence()
            print(cfg.output / "self_influence.csv")
        else:
            print(r.report())
        return 0

    return run


#: The commands built from a config dataclass. Append to add one (see the module docstring).
SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "fit", "featurize the training set at every checkpoint into the run folder's store",
        RunConfig, _run_step("fit"),
    ),
    Subcommand(
        "score", "score every query against every training example: scores.npy, scores.csv",
        RunConfig, _run_step("score"),
    ),
    Subcommand(
        "top-k", "the k strongest proponents and opponents of each query: top_k.csv",
        RunConfig, _run_step("top-k"),
    ),
    Subcommand(
        "self-influence",
        "rank the training set by self-influence (mislabeled first): self_influence.csv",
        RunConfig, _run_step("self-influence"),
    ),
    Subcommand(
        "report",
        "an HTML page: queries with proponents and opponents, self-influence ranking",
        RunConfig, _run_step("report"),
    ),
]  # fmt: skip


# -- the built-in demo and evaluation ------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    output = check_output_dir(args.output or ("demo-text-output" if args.text else "demo-output"))
    if args.text:
        from traintrace.interfaces.text_demo import TextDemoConfig, run_text_demo

        kw = {} if args.epochs is None else {"epochs": args.epochs}
        if args.checkpoints is not None:
            kw["checkpoints"] = args.checkpoints
        result = run_text_demo(
            TextDemoConfig(
                output=output,
                seed=args.seed,
                progress=not args.quiet,
                **kw,
            )
        )
        print(result.summary())
        return 0
    from traintrace.interfaces.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        output=output,
        seed=args.seed,
        epochs=60 if args.epochs is None else args.epochs,
        checkpoints=5 if args.checkpoints is None else args.checkpoints,
        progress=not args.quiet,
    )
    result = run_demo(cfg)
    print(result.summary())
    return 0


#: ``evaluate`` settings shared by both runs; any other flag (or ``--config``) means "my model".
_SHARED_EVALUATE_FIELDS = ("output", "seed", "workers", "progress")


def _evaluate(args: argparse.Namespace) -> int:
    from traintrace.interfaces.evaluate import EvaluateConfig, run_evaluation

    given = config_from_args(args, EvaluateUserConfig)
    own = args.config is not None or any(k not in _SHARED_EVALUATE_FIELDS for k in given)
    if own:
        if args.quick:
            raise ConfigurationError(
                "--quick sizes the built-in digits evaluation; for your model set subsets and "
                "seeds_per_subset (--subsets 8 --seeds-per-subset 1) instead"
            )
        cfg: Any = load_config(EvaluateUserConfig, args.config, given)
    else:
        check_seed(given.get("seed", 0))
        check_output_dir(given.get("output", "evaluate-output"))
        make = EvaluateConfig.quick if args.quick else EvaluateConfig
        cfg = make(**given)
    result = run_evaluation(cfg)
    print(result.table())
    print(f"results: {cfg.output / 'results.json'}; report: {result.report}")
    return 0


def _configured(command: Subcommand) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        cfg = load_config(command.config, args.config, config_from_args(args, command.config))
        status = command.run(cfg)
        return 0 if status is None else int(status)

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``traintrace`` command."""
    from traintrace import __version__

    parser = argparse.ArgumentParser(
        prog="traintrace",
        description="Trace a model's predictions back to the training examples responsible. "
        "Scores: positive = the training example helps the query.",
    )
    parser.add_argument("--version", action="version", version=f"traintrace {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        add_config_arguments(p, command.config)
        if "progress" in command.config.__dataclass_fields__:
            p.add_argument(
                "-q", "--quiet", dest="progress", action="store_false", default=argparse.SUPPRESS,
                help="no progress bars (same as --no-progress)",
            )  # fmt: skip
        p.set_defaults(func=_configured(command))
    demo = sub.add_parser(
        "demo",
        help="train a CNN on digits (or, with --text, a text classifier on intents) with "
        "flipped labels, run TracIn, write an HTML report",
    )
    demo.add_argument(
        "--output",
        default=None,
        help="folder for the report and checkpoints (default: demo-output, demo-text-output)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed for the split, label flips and training"
    )
    demo.add_argument("--text", action="store_true", help="the text demo (intent classifier)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs")
    demo.add_argument("--checkpoints", type=int, default=None, help="checkpoints saved for TracIn")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    ev = sub.add_parser(
        "evaluate",
        help="rank every estimator by LDS (and LOO, mislabel AUROC) and time: on a built-in "
        "digits MLP, or on your model with --config my.toml / --retrain pkg.mod:train_fn",
        description="Without --config or model flags: every estimator on a digits MLP with "
        "flipped labels, ranked by LDS, LOO correlation, mislabel AUROC and time. With them: "
        "every estimator at its defaults on your model, checkpoints and data, ranked by the LDS "
        "against models retrained by your train_fn(indices, seed) -> nn.Module on random "
        "subsets (cached under --output; a rerun resumes). Flags override the --config file.",
    )
    add_config_arguments(ev, EvaluateUserConfig)
    ev.add_argument(
        "--quick", action="store_true", help="built-in run only: a small configuration (smoke test)"
    )
    ev.add_argument(
        "-q", "--quiet", dest="progress", action="store_false", default=argparse.SUPPRESS,
        help="no progress output (same as --no-progress)",
    )  # fmt: skip
    ev.set_defaults(func=_evaluate)
    from traintrace.interfaces import forensics

    forensics.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``traintrace`` with ``argv``; returns the exit status.

    0: done; 2: a usage error or a named :class:`~traintrace.TraintraceError` (its message is
    printed, no traceback); 130: interrupted (finished store chunks are kept: rerun to resume).
    Other exceptions (a bug in the user's code or in traintrace) propagate with a traceback.
    """
    from traintrace.exceptions import TraintraceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TraintraceError as exc:
        print(f"traintrace: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "traintrace: interrupted; the work done so far is kept (the store's finished "
            "chunks, the streamed scores' journal in <output>/resume-*): rerun the same command "
            "to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
