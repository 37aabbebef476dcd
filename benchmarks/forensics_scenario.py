"""The forensics scenario's figures: target rank, AUROC, attack-set recall, mitigation, time.

Plants a backdoor and a targeted label flip on digits (two seeds by default), then prints per
(attack, estimator) the rank of the true target among the candidates per seed, the AUROC of the
anomaly score over targeted and untargeted runs, precision/recall of the attack set at the
robust cut, recall at zero clean false positives per seed, and the mitigation result. Run:

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/forensics_scenario.py \
        [--seeds 0 1] [--candidates 100] [--quick] [--output forensics-output]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from traintrace.interfaces.forensics import ForensicsConfig, run_forensics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--output", default="forensics-output")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        cfg = ForensicsConfig.quick_config(output=Path(args.output), seeds=tuple(args.seeds))
    else:
        cfg = ForensicsConfig(
            output=Path(args.output), seeds=tuple(args.seeds), n_candidates=args.candidates
        )
    print(run_forensics(cfg).table())


if __name__ == "__main__":
    main()
