"""TracIn's store across processes: two torchrun ranks, and a run killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fit_tracin.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def fit(store: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPT), str(store), *extra], check=True, env=ENV, timeout=300
    )


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_same_store_as_one_process(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    fit(tmp_path / "one")
    subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(SCRIPT),
            str(tmp_path / "two"),
        ],
        check=True,
        env=ENV,
        timeout=300,
        capture_output=True,
    )
    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert set(one) == set(two)
    assert one == two


@pytest.mark.slow
def test_a_fit_killed_with_sigkill_resumes_to_a_byte_identical_store(tmp_path):
    fit(tmp_path / "whole", "--projection", "32")
    store = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(store), "--slow", "0.02", "--projection", "32"], env=ENV
    )
    done_dir = store / "done"
    deadline, recorded = time.time() + 120, False
    while time.time() < deadline and not recorded:  # wait until some, not all, chunks are done
        marks = list(done_dir.glob("rank-*.json")) if done_dir.exists() else []
        recorded = bool(marks) and marks[0].stat().st_size > 20
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert recorded, "no chunk was recorded before the kill"
    assert not (done_dir / "all.json").exists(), "the run finished before it was killed"
    fit(store, "--projection", "32")  # resume
    assert tree_bytes(store) == tree_bytes(tmp_path / "whole")
