"""Exact TracIn / EK-FAC / Arnoldi cost in epochs of training, beside Captum and Kronfluence.

Workload (issue 8): MLP 784-1024-1024-10 (1,863,690 parameters), ``n`` Gaussian inputs with random
labels, 100 queries, two checkpoints saved after one SGD epoch each (lr 0.01, batch 256, after a
warm-up epoch). Every method runs in its own process; each process times three training epochs
on a scratch copy of the model *in the same process* (at least a second of work) and prints the
method's time per checkpoint divided by the median epoch, in wall and CPU time, the peak RssAnon
and the bytes written to disk. Score matrices are compared with traintrace's (Spearman).

    python benchmarks/engine_speed.py                       # traintrace methods, n = 2048
    python benchmarks/engine_speed.py --n 8192 --peer-python /path/to/venv/bin/python
    python benchmarks/engine_speed.py --workload cnn --n 4096    # small CNN, 1×28×28 inputs
    python benchmarks/engine_speed.py --workload gpt2 --n 2048   # GPT-2-style LM, 32 tokens
    python benchmarks/engine_speed.py --width 2048 --methods traintrace-arnoldi-r64-coordinates
    python benchmarks/engine_speed.py --workload cnn --n 4096 --repeat 3 --peer-python ...  # minima

``--peer-python`` names an interpreter with ``captum`` and ``kronfluence`` installed (their own
environment: ``python -m venv peers && peers/bin/pip install torch==2.13.0 captum kronfluence``);
without it only traintrace's rows are printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

LR = 0.01
N_QUERY = 100


WORKLOAD = os.environ.get("BENCH_WORKLOAD", "mlp")
WIDTH = int(os.environ.get("BENCH_WIDTH", "1024"))  # the MLP's hidden width (--width)
SEQ, VOCAB = 32, 512


def make_model() -> nn.Module:
    torch.manual_seed(0)
    if WORKLOAD == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    if WORKLOAD == "gpt2":
        import transformers

        cfg = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=SEQ,
            n_embd=128,
            n_layer=2,
            n_head=4,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        )
        return transformers.GPT2LMHeadModel(cfg)
    return nn.Sequential(
        nn.Linear(784, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)
    )


def make_task():
    import traintrace as tt

    return tt.LanguageModeling() if WORKLOAD == "gpt2" else tt.Classification()


class TokenData(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _inputs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if WORKLOAD == "cnn":
        return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    if WORKLOAD == "gpt2":
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        return ids, ids
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def _loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if WORKLOAD == "gpt2":
        return m(input_ids=x, labels=x).loss
    return F.cross_entropy(m(x), y)


class Workload:
    def __init__(self, n: int, folder: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.n = n
        self.X, self.Y = _inputs(n, g)
        self.Xq, self.Yq = _inputs(N_QUERY, torch.Generator().manual_seed(1))
        if WORKLOAD == "gpt2":
            self.train, self.queries = TokenData(self.X), TokenData(self.Xq)
        else:
            self.train = TensorDataset(self.X, self.Y)
            self.queries = TensorDataset(self.Xq, self.Yq)
        m = make_model()
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        self.epoch(m, opt)
        self.paths = []
        for c in range(2):
            self.epoch(m, opt)
            path = os.path.join(folder, f"c{c}.pt")
            torch.save({k: v.detach().clone() for k, v in m.state_dict().items()}, path)
            self.paths.append(path)
        self.timer = (copy.deepcopy(m), None)

    def epoch(self, m: nn.Module, opt: torch.optim.Optimizer) -> None:
        for i in range(0, self.n, 256):
            opt.zero_grad()
            _loss(m, self.X[i : i + 256], self.Y[i : i + 256]).backward()
            opt.step()

    def time_epochs(self, reps: int = 3) -> tuple[float, float]:
        m = copy.deepcopy(self.timer[0])
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        walls, cpus = [], []
        while len(walls) < reps or sum(walls) < 1.0:
            w, c = time.perf_counter(), time.process_time()
            self.epoch(m, opt)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        return statistics.median(walls), statistics.median(cpus)


class PeakAnon:
    """Peak RssAnon (MiB) of this process, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self._stop.wait(0.02)

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# -- methods: each returns (scores [m, n], checkpoints it covers) ----------------------------------
def tt_tracin(wl: Workload, scratch: str) -> tuple[torch.Tensor, int]:
    import traintrace as tt

    cks = [tt.Checkpoint(p, lr=LR) for p in wl.paths]
    est = tt.TracIn(make_model(), make_task(), cks, batch_size=256, progress=False)
    return est.fit(wl.train).score(wl.queries), 2


def tt_ekfac(wl: Workload, scratch: str) -> tuple[torch.Tensor, int]:
    import traintrace as tt

    est = tt.InfluenceFunction(
        make_model(),
        make_task(),
        tt.Checkpoint(wl.paths[1]),
        hessian=tt.EKFAC(sampled_labels=False),
        damping=1e-3,
        batch_size=256,
        progress=False,
    )
    return est.fit(wl.train).score(wl.queries), 1


def _random_directions(wl: Workload) -> tuple[object, object, object]:
    """Untimed set-up of the Arnoldi row: 64 orthonormal directions in layer shape (what the
    Lanczos fit hands over; that fit is a separate cost that does not depend on n)."""
    import traintrace as tt
    from traintrace.features.engine import ExactGradients

    model = make_model()
    engine = ExactGradients(model, make_task())
    state = tt.Checkpoint(wl.paths[1]).state_for(model)
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(engine.layout.numel, 64, generator=g))[0]
    return engine, state, engine.directions_from_flat(u.T.contiguous())


def tt_arnoldi_coordinates(wl: Workload, scratch: str) -> tuple[torch.Tensor, int]:
    """Arnoldi's training coordinates ``Uᵀ g_i`` for r = 64 orthonormal directions (a random
    basis contracts at the same cost as the eigenbasis): one capture per batch and r dense
    contractions, ``r·P`` multiply-adds per example."""
    engine, state, dirs = SETUP["traintrace-arnoldi-r64-coordinates"]
    out = []
    for i in range(0, wl.n, 256):
        batch = (
            {"input_ids": wl.X[i : i + 256], "labels": wl.X[i : i + 256]}
            if WORKLOAD == "gpt2"
            else (wl.X[i : i + 256], wl.Y[i : i + 256])
        )
        cap = engine.capture(state, batch)
        out.append(engine.dot(cap, dirs))
    return torch.cat(out, dim=1), 1


#: per method, untimed set-up run before the clock starts (its result is kept here)
SETUP: dict[str, object] = {}
PREPARE = {"traintrace-arnoldi-r64-coordinates": _random_directions}


def captum_tracin(wl: Workload, scratch: str) -> tuple[torch.Tensor, int]:
    from captum.influence import TracInCP

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path))
        return LR

    est = TracInCP(
        make_model(),
        wl.train,
        checkpoints=wl.paths,
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=256,
        sample_wise_grads_per_batch=True,
    )
    return est.influence((wl.Xq, wl.Yq), k=None, show_progress=False), 2


def kronfluence_ekfac(wl: Workload, scratch: str) -> tuple[torch.Tensor, int]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class ClsTask(Task):
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    model = make_model()
    model.load_state_dict(torch.load(wl.paths[1]))
    task = ClsTask()
    model = prepare_model(model, task)
    an = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=True,
        output_dir=scratch,
        disable_tqdm=True,
        log_level=logging.WARNING,
    )
    an.fit_all_factors(
        factors_name="ekfac",
        dataset=wl.train,
        per_device_batch_size=256,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
        overwrite_output_dir=True,
    )
    an.compute_pairwise_scores(
        scores_name="s",
        factors_name="ekfac",
        query_dataset=wl.queries,
        train_dataset=wl.train,
        per_device_query_batch_size=N_QUERY,
        per_device_train_batch_size=256,
        score_args=ScoreArguments(damping_factor=1e-3),
        overwrite_output_dir=True,
    )
    return an.load_pairwise_scores("s")["all_modules"], 1


METHODS = {
    "traintrace-tracin": tt_tracin,
    "traintrace-ekfac": tt_ekfac,
    "traintrace-arnoldi-r64-coordinates": tt_arnoldi_coordinates,
    "captum-tracincp": captum_tracin,
    "kronfluence-ekfac": kronfluence_ekfac,
}
PEERS = {"captum-tracincp": "traintrace-tracin", "kronfluence-ekfac": "traintrace-ekfac"}
#: imported before the clock starts: import time is not the method's cost
IMPORTS = {
    "traintrace": ["traintrace", "traintrace.features.engine"],
    "captum": ["captum.influence"],
    "kronfluence": ["kronfluence.analyzer", "kronfluence.arguments", "kronfluence.task"],
}


def run_one(method: str, n: int, save: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    import importlib

    for module in IMPORTS[method.split("-")[0]]:
        importlib.import_module(module)
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as scratch:
        wl = Workload(n, scratch)
        epoch_wall, epoch_cpu = wl.time_epochs()
        out = os.path.join(scratch, "out")
        os.makedirs(out)
        if method in PREPARE:
            SETUP[method] = PREPARE[method](wl)
        before = du(scratch)
        with PeakAnon() as mem:
            w, c = time.perf_counter(), time.process_time()
            scores, per = METHODS[method](wl, out)
            wall, cpu = time.perf_counter() - w, time.process_time() - c
        written = du(scratch) - before
        e2_wall, e2_cpu = wl.time_epochs()
        epoch_wall, epoch_cpu = min(epoch_wall, e2_wall), min(epoch_cpu, e2_cpu)
        torch.save(torch.as_tensor(scores).float(), save)
        print(
            "RESULT "
            + json.dumps(
                {
                    "method": method,
                    "n": n,
                    "wall_per_ckpt_epochs": round(wall / per / epoch_wall, 2),
                    "cpu_per_ckpt_epochs": round(cpu / per / epoch_cpu, 2),
                    "seconds": round(wall, 2),
                    "epoch_seconds": round(epoch_wall, 3),
                    "peak_rss_anon_mib": round(mem.peak),
                    "bytes_written": written,
                }
            ),
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--workload", choices=["mlp", "cnn", "gpt2"], default="mlp")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument(
        "--width", type=int, default=1024, help="the MLP's hidden width (P grows as width²)"
    )
    p.add_argument("--peer-python", default=None)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every method this many times (fresh processes) and keep each figure's\n"
        "minimum: the least noisy estimate of a cost on a shared machine",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        run_one(a.one, a.n, a.save)
        return
    methods = a.methods or [m for m in METHODS if m.startswith("traintrace")]
    if a.peer_python and not a.methods and a.workload == "mlp":
        methods += list(PEERS)
    rows, scores = {}, {}
    with tempfile.TemporaryDirectory(prefix="engine-bench-scores-") as keep:
        for method in methods:
            python = a.peer_python if method in PEERS else sys.executable
            save = os.path.join(keep, f"{method}.pt")
            env = dict(
                os.environ,
                PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"),
                BENCH_WORKLOAD=a.workload,
                BENCH_WIDTH=str(a.width),
            )
            runs = []
            for _ in range(a.repeat):
                res = subprocess.run(
                    [python, __file__, "--one", method, "--n", str(a.n), "--save", save],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
                if res.returncode or not line:
                    print(f"{method}: failed\n{res.stderr[-2000:]}")
                    break
                runs.append(json.loads(line[-1][7:]))
            if len(runs) < a.repeat:
                continue
            # every figure's minimum over the runs (they are costs: noise only adds)
            rows[method] = {k: min(r[k] for r in runs) for k in runs[0] if k != "method"}
            if a.repeat > 1:
                print(f"{method}: per run wall epochs {[r['wall_per_ckpt_epochs'] for r in runs]}")
            scores[method] = torch.load(save)
    from scipy.stats import spearmanr

    mlp_p = 785 * a.width + (a.width + 1) * a.width + (a.width + 1) * 10
    what = {"mlp": f"MLP 784-{a.width}-{a.width}-10 (P = {mlp_p:,})", "cnn": "small CNN"}
    what["gpt2"] = f"GPT-2 style, {SEQ} tokens"
    print(f"\nn = {a.n}, {N_QUERY} queries, {what[a.workload]}; cost per checkpoint / one epoch")
    print(
        f"{'method':36s} {'wall':>7s} {'cpu':>7s} {'seconds':>8s} {'RssAnon MiB':>12s} "
        f"{'disk MB':>8s} {'Spearman vs traintrace':>22s}"
    )
    for method, r in rows.items():
        ref = PEERS.get(method)
        rho = ""
        if ref in scores and method in scores:
            rho = f"{spearmanr(scores[method].flatten(), scores[ref].flatten())[0]:.4f}"
        print(
            f"{method:36s} {r['wall_per_ckpt_epochs']:7.2f} {r['cpu_per_ckpt_epochs']:7.2f} "
            f"{r['seconds']:8.1f} {r['peak_rss_anon_mib']:12d} {r['bytes_written'] / 1e6:8.1f} "
            f"{rho:>22s}"
        )
    for peer, ours in PEERS.items():
        if peer in rows and ours in rows:
            print(
                f"speed-up of {ours} over {peer}: "
                f"{rows[peer]['seconds'] / rows[ours]['seconds']:.1f}x (wall), "
                f"{rows[peer]['cpu_per_ckpt_epochs'] / rows[ours]['cpu_per_ckpt_epochs']:.1f}x (cpu)"
            )


if __name__ == "__main__":
    main()
