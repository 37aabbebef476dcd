"""The FeatureStore's fault table: damage, kill or race a store, then assert the named error or
the exact answer.

Every case starts from the same small store (2 checkpoints × 24 rows × 5 features, chunks of
4 rows) and ends either in a named error whose message names the file / chunk / rows and what to
do, or in a store whose files are bit-identical to one written by a single uninterrupted
process (``WHOLE``: the expected bytes). Other processes are forked (no interpreter start-up),
killed with SIGKILL where the case says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from traintrace.exceptions import (
    ConfigurationError,
    DiskFullError,
    NonFiniteGradientError,
    StoreBusyError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreRewrittenError,
)
from traintrace.features import store as store_module
from traintrace.features.store import FeatureStore
from traintrace.retrieval.exact import exact_top_k

SETTINGS = {"model": "m0", "data": {"n": 24, "fingerprint": "d0"}}
LAYOUT = {"n": 24, "width": 5, "checkpoints": 2, "chunk_size": 4}
RECOMPUTE = "Delete the store or pass overwrite_store=True to recompute"
FORK = multiprocessing.get_context("fork")


def rows_of(c: int, start: int, stop: int, width: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * c + start)
    return torch.randn(stop - start, width, generator=g) * (1 + start)


def write_all(path: Path, pause: float = 0.0, **layout) -> FeatureStore:
    """Write every pending chunk (in two halves, as a featurizer might), with data hashes."""
    store = FeatureStore.open(path, SETTINGS, **{**LAYOUT, **layout})
    for c in range(store.checkpoints):
        for i in store.pending(c):
            start, stop = store.chunks()[i]
            x = rows_of(c, start, stop, store.width)
            half = (stop - start) // 2
            store.write(c, start, x[:half])
            time.sleep(pause)
            store.write(c, start + half, x[half:])
            store.mark_done(c, i, data_hash=f"data-{c}-{i}")
            time.sleep(pause)
    return store


def tree_bytes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict[str, str]:
    """The bytes of a store written by one uninterrupted process, finalized."""
    path = tmp_path_factory.mktemp("whole") / "s"
    store = write_all(path)
    assert store.finalize()
    store.close()
    return tree_bytes(path)


@pytest.fixture
def complete(tmp_path: Path) -> Path:
    store = write_all(tmp_path / "s")
    assert store.finalize()
    store.close()
    return tmp_path / "s"


def expected_rows(c: int) -> torch.Tensor:
    return torch.cat([rows_of(c, a, min(a + 4, 24)) for a in range(0, 24, 4)])


def resume_and_compare(path: Path, whole: dict[str, str]) -> None:
    """Reopen, finish the pending chunks, finalize: the files must equal the uninterrupted ones."""
    store = write_all(path)
    assert store.finalize()
    store.close()
    assert tree_bytes(path) == whole
    siblings = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    assert siblings == []


# ------------------------------------------------------------------ damaged rows and norms
def _poke(path: Path, kind: str, c: int, row: int, data: bytes, col: int = 0) -> None:
    file = path / f"{kind}-{c:03d}.npy"
    header = np.load(file, mmap_mode="r").offset
    itemsize = 4
    per_row = 5 * itemsize if kind == "features" else itemsize
    with open(file, "r+b") as f:
        f.seek(header + row * per_row + col * itemsize)
        f.write(data)


def flip_64_bytes(path: Path) -> None:  # rows 9-12 of checkpoint 1 (chunks 2 and 3)
    file = path / "features-001.npy"
    header = np.load(file, mmap_mode="r").offset
    with open(file, "r+b") as f:
        f.seek(header + 9 * 20)
        old = f.read(64)
        f.seek(header + 9 * 20)
        f.write(bytes(b ^ 0x5A for b in old))


DAMAGE: dict[str, tuple[Callable[[Path], None], str, int, str]] = {
    # name: (damage, damaged file, checkpoint, message pattern (chunk / rows / cause))
    "flip 64 bytes": (flip_64_bytes, "features-001", 1, r"chunk 2, rows \[8, 12\)"),
    "zero a chunk": (
        lambda p: _poke(p, "features", 1, 8, bytes(4 * 20)),
        "features-001",
        1,
        r"chunk 2, rows \[8, 12\)",
    ),
    "NaN into a row": (
        lambda p: _poke(p, "features", 1, 10, np.float32("nan").tobytes(), col=3),
        "features-001",
        1,
        r"chunk 2, rows \[8, 12\); row 10 holds NaN or infinity",
    ),
    "inf into a row": (
        lambda p: _poke(p, "features", 1, 9, np.float32("inf").tobytes(), col=0),
        "features-001",
        1,
        r"chunk 2, rows \[8, 12\); row 9 holds NaN or infinity",
    ),
    "swap two rows": (
        lambda p: (
            _poke(p, "features", 1, 8, expected_rows(1)[9].numpy().tobytes()),
            _poke(p, "features", 1, 9, expected_rows(1)[8].numpy().tobytes()),
        ),
        "features-001",
        1,
        r"chunk 2, rows \[8, 12\)",
    ),
    "overwrite a norm": (
        lambda p: _poke(p, "norms", 1, 10, np.float32(123.0).tobytes()),
        "norms-001",
        1,
        r"chunk 2, rows \[8, 12\)",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_rows_are_refused_and_intact_rows_still_exact(complete: Path, case) -> None:
    damage, file, c, pattern = DAMAGE[case]
    damage(complete)
    store = FeatureStore.open(complete, SETTINGS, **LAYOUT)
    message = rf"{file}\.npy: checkpoint {c}, {pattern}.*{re.escape(RECOMPUTE)}"
    kind_read = store.norms if file.startswith("norms") else store.read
    for action in (
        lambda: kind_read(c),  # everything
        lambda: kind_read(c, 10, 11),  # one row inside the damaged chunk: the piece is checked
        lambda: [kind_read(c, a, min(a + 5, 24)) for a in range(0, 24, 5)],  # unaligned blocks
        lambda: exact_top_k(
            store, [torch.ones(1, 5)] * 2, [1.0, 1.0], 3, normalize=file.startswith("norms")
        ),
    ):
        with pytest.raises(StoreCorruptError, match=message):
            action()
    # the undamaged chunks read back exactly (verified), and so does the other checkpoint
    assert torch.equal(store.read(c, 0, 8), expected_rows(c)[:8])
    assert torch.equal(store.read(c, 16, 24), expected_rows(c)[16:])
    assert torch.equal(store.read(1 - c), expected_rows(1 - c))
    torch.testing.assert_close(store.norms(1 - c), expected_rows(1 - c).norm(dim=1))


def test_non_finite_rows_are_refused_on_write(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path / "s", SETTINGS, **LAYOUT)
    rows = torch.ones(8, 5)
    rows[6, 1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"rows \[4, 12\) of checkpoint 1.*row 10"):
        store.write(1, 4, rows)
    rows[6, 1] = float("-inf")
    with pytest.raises(NonFiniteGradientError, match=r"1 rows, the first is row 10 \(chunk 2\)"):
        store.write(1, 4, rows)
    assert torch.count_nonzero(store.read(1, 8, 12)) == 0  # nothing of the bad write landed
    with pytest.raises(NonFiniteGradientError, match="norm overflows"):
        store.write(0, 0, torch.full((1, 5), 3e38))  # finite, but its norm is not in float32
    with pytest.raises(ConfigurationError, match="beyond float32's range"):
        store.write(0, 0, torch.full((1, 5), 1e300, dtype=torch.float64))


# ------------------------------------------------------------------ damaged metadata and records
def _edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    payload = json.loads(file.read_text())
    edit(payload)
    file.write_text(json.dumps(payload))


def _edit_lines(file: Path, edit: Callable[[list[dict]], None]) -> None:
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    edit(lines)
    file.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _set_checksum(lines: list[dict]) -> None:
    lines[3]["features"][0] = "0" * len(lines[3]["features"][0])


META_CASES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "meta.json garbage": (
        lambda p: (p / "meta.json").write_text("{not json"),
        StoreCorruptError,
        rf"cannot read .*meta\.json.*{re.escape(RECOMPUTE)}",
    ),
    "meta.json truncated": (
        lambda p: (p / "meta.json").write_bytes((p / "meta.json").read_bytes()[:40]),
        StoreCorruptError,
        r"cannot read .*meta\.json",
    ),
    "meta.json negative n": (
        lambda p: _edit_json(p / "meta.json", lambda m: m["layout"].update(n=-1)),
        StoreCorruptError,
        rf"meta\.json is damaged \(ValueError: layout\.n is -1\).*{re.escape(RECOMPUTE)}",
    ),
    "meta.json unknown checksum": (
        lambda p: _edit_json(p / "meta.json", lambda m: m["integrity"].update(checksum="md4")),
        StoreCorruptError,
        r"unknown checksum 'md4'",
    ),
    "meta.json settings edited": (
        lambda p: _edit_json(p / "meta.json", lambda m: m["settings"].update(model="m1")),
        StoreMismatchError,
        r'(?s)settings\.model: stored "m1", requested "m0".*overwrite_store=True',
    ),
    "store of an older format": (
        lambda p: _edit_json(
            p / "meta.json", lambda m: (m.update(format_version=1), m.pop("integrity"))
        ),
        StoreMismatchError,
        r"(?s)format_version: stored 1, requested 2.*overwrite_store=True",
    ),
    "meta.json deleted": (
        lambda p: (p / "meta.json").unlink(),
        ConfigurationError,
        r"holds no meta\.json: it is not a feature store",
    ),
    "features file truncated": (
        lambda p: os.truncate(p / "features-001.npy", 300),
        StoreCorruptError,
        rf"features-001\.npy has 300 bytes, expected \d+.*{re.escape(RECOMPUTE)}",
    ),
    "norms file deleted": (
        lambda p: (p / "norms-000.npy").unlink(),
        StoreCorruptError,
        r"cannot read .*norms-000\.npy",
    ),
    "all.json garbage": (
        lambda p: (p / "done" / "all.json").write_text("{oops\n"),
        StoreCorruptError,
        r"unreadable completion record .*all\.json.*deleting it recomputes the chunks",
    ),
    "all.json cut mid-line": (
        lambda p: (p / "done" / "all.json").write_bytes(
            (p / "done" / "all.json").read_bytes()[:-9]
        ),
        StoreCorruptError,
        r"all\.json: it ends in an unterminated line.*deleting it recomputes",
    ),
    "all.json chunk out of range": (
        lambda p: _edit_lines(p / "done" / "all.json", lambda lines: lines[0].update(i=99)),
        StoreCorruptError,
        r"all\.json: line 1: checkpoint 0 / chunk 99 is outside",
    ),
    "all.json checksum edited": (
        lambda p: _edit_lines(p / "done" / "all.json", _set_checksum),
        StoreCorruptError,
        r"features-000\.npy: checkpoint 0, chunk 3, rows \[12, 16\)",
    ),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_damaged_metadata_and_records_are_named(complete: Path, case) -> None:
    damage, error, pattern = META_CASES[case]
    damage(complete)
    with pytest.raises(error, match=pattern):
        store = FeatureStore.open(complete, SETTINGS, **LAYOUT)
        store.pending(0)
        store.read(0)


def _tear_last_record(path: Path) -> None:
    """As a writer killed while appending its 6th record leaves its rank file."""
    done = path / "done"
    lines = (done / "all.json").read_text().splitlines(keepends=True)
    (done / "rank-00000.json").write_text("".join(lines[:5]) + lines[5][:30])
    (done / "all.json").unlink()


RESUMABLE: dict[str, Callable[[Path], None]] = {
    # states a killed or half-finished run leaves; resuming must give the exact bytes
    "all.json deleted": lambda p: (p / "done" / "all.json").unlink(),
    "all.json empty": lambda p: (p / "done" / "all.json").write_text(""),
    "finalize killed after merging": lambda p: shutil.copy(
        p / "done" / "all.json", p / "done" / "rank-00000.json"
    ),
    "finalize killed while writing all.json": lambda p: (
        p / "done" / f".all.json.{dead_pid()}-0123abcd.tmp"
    ).write_text('{"c": 0'),
    "record torn by a kill": lambda p: _tear_last_record(p),
    "creator killed (stale .creating sibling)": lambda p: (
        p.parent / f".{p.name}.creating-{dead_pid()}-{store_module._HOST}-ab" / "done"
    ).mkdir(parents=True),
    "overwrite killed (stale .deleting sibling)": lambda p: (
        p.parent / f".{p.name}.deleting-{dead_pid()}-{store_module._HOST}-cd"
    ).mkdir(),
}


@pytest.mark.parametrize("case", list(RESUMABLE))
def test_interrupted_states_resume_to_the_exact_bytes(complete: Path, whole, case) -> None:
    RESUMABLE[case](complete)
    if "deleted" in case or "torn" in case or "empty" in case:
        with pytest.raises(StoreIncompleteError, match="resume"):
            FeatureStore.open(complete, SETTINGS, **LAYOUT).require_complete()
    resume_and_compare(complete, whole)


def test_stale_siblings_of_live_or_foreign_processes_are_kept(tmp_path: Path) -> None:
    live = tmp_path / f".s.creating-{os.getpid()}-{store_module._HOST}-ab"
    foreign = tmp_path / f".s.deleting-{dead_pid()}-00000000-cd"  # another machine's
    dead = tmp_path / f".s.creating-{dead_pid()}-ef"  # older name without a host: this host
    for d in (live, foreign, dead):
        d.mkdir()
    FeatureStore.open(tmp_path / "s", SETTINGS, **LAYOUT)
    assert live.exists() and foreign.exists() and not dead.exists()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ other processes
def _child_write(path: str, pause: float) -> None:
    write_all(Path(path), pause=pause)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kill_9_at_random_points_resumes_bit_identically(tmp_path: Path, whole, seed) -> None:
    rng = random.Random(seed)
    target = rng.randrange(0, 12)  # records written before the kill
    path = tmp_path / "s"
    child = FORK.Process(target=_child_write, args=(str(path), 0.003))
    child.start()
    deadline = time.monotonic() + 30
    record = path / "done" / "rank-00000.json"
    while time.monotonic() < deadline and child.is_alive():
        if target == 0 and path.exists():
            break
        with contextlib.suppress(OSError):
            if record.read_text().count("\n") >= target:
                break
        time.sleep(0.0005)
    time.sleep(rng.uniform(0, 0.006))  # somewhere inside the next write, record or sleep
    if child.is_alive():
        os.kill(child.pid, signal.SIGKILL)
    child.join()
    resume_and_compare(path, whole)


def _child_hold_lock(path: str, ready, release) -> None:
    store = FeatureStore.open(path, SETTINGS, **LAYOUT)
    store.pending(0)  # work left: takes the writer lock
    ready.set()
    release.wait(30)


def test_a_second_writer_is_refused_at_once(tmp_path: Path, whole) -> None:
    path = tmp_path / "s"
    ready, release = FORK.Event(), FORK.Event()
    child = FORK.Process(target=_child_hold_lock, args=(str(path), ready, release))
    child.start()
    assert ready.wait(30)
    second = FeatureStore.open(path, SETTINGS, **LAYOUT)
    with pytest.raises(
        StoreBusyError, match=rf"another process is writing this store \(pid {child.pid}"
    ):
        second.pending(0)
    with pytest.raises(StoreBusyError, match="Wait for it to finish"):
        second.write(0, 0, torch.ones(1, 5))
    assert second.is_complete() is False  # reading its state is fine
    # another rank of the same job holds another lock: allowed (torchrun)
    rank1 = FeatureStore.open(path, SETTINGS, **LAYOUT, rank=1, world_size=2)
    assert rank1.pending(0) == [1, 3, 5]
    rank1.close()
    os.kill(child.pid, signal.SIGKILL)  # the lock dies with its holder
    child.join()
    resume_and_compare(path, whole)


def _child_forks_then_dies(path: str, conn, linger: float) -> None:
    """Take the lock, fork a worker that keeps it (as DataLoader workers do), then be killed."""
    store = FeatureStore.open(path, SETTINGS, **LAYOUT)
    store.pending(0)
    worker = os.fork()
    if worker == 0:  # the worker: shares the lock's open file until it exits
        time.sleep(linger)
        os._exit(0)
    conn.send(worker)
    time.sleep(60)


@pytest.mark.parametrize("linger", [0.3, 30.0])
def test_a_lock_kept_by_a_dead_writers_worker(tmp_path: Path, whole, monkeypatch, linger) -> None:
    monkeypatch.setattr(store_module, "ORPHAN_WAIT_SECONDS", 1.5)
    path = tmp_path / "s"
    parent, child_end = FORK.Pipe()
    child = FORK.Process(target=_child_forks_then_dies, args=(str(path), child_end, linger))
    child.start()
    assert parent.poll(30)
    worker = parent.recv()
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    store = FeatureStore.open(path, SETTINGS, **LAYOUT)
    if linger < 1.5:  # the worker exits while we wait: the rerun just proceeds
        assert store.pending(0) == list(range(6))
        store.close()
    else:
        with pytest.raises(StoreBusyError, match=rf"pid {child.pid}, rank 0\) is gone, but"):
            store.pending(0)
        os.kill(worker, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(worker, 0)
    resume_and_compare(path, whole)


def _child_overwrite(path: str) -> None:
    FeatureStore.open(path, SETTINGS, **{**LAYOUT, "width": 7}, overwrite=True)


def test_a_reader_refuses_a_store_rewritten_under_it(complete: Path) -> None:
    reader = FeatureStore.open(complete, SETTINGS, **LAYOUT)
    assert torch.equal(reader.read(0, 0, 4), expected_rows(0)[:4])
    child = FORK.Process(target=_child_overwrite, args=(str(complete),))
    child.start()
    child.join()
    assert child.exitcode == 0
    for action in (
        lambda: reader.read(0, 0, 4),
        lambda: reader.norms(1),
        lambda: reader.require_complete(),
        lambda: exact_top_k(reader, [torch.ones(1, 5)] * 2, [1.0, 1.0], 2),
    ):
        with pytest.raises(
            StoreRewrittenError, match=r"rewritten by another process.*0 → 1.*Refit"
        ):
            action()


def _child_slow_writer(path: str, conn) -> None:
    try:
        write_all(Path(path), pause=0.05)
    except Exception as err:
        conn.send(f"{type(err).__name__}: {err}")
    else:
        conn.send("finished")


def test_an_overwrite_stops_the_old_writer_before_it_touches_the_new_store(tmp_path) -> None:
    path = tmp_path / "s"
    parent, child_end = FORK.Pipe()
    child = FORK.Process(target=_child_slow_writer, args=(str(path), child_end))
    child.start()
    record = path / "done" / "rank-00000.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if record.read_text().count("\n") >= 2:
                break
        time.sleep(0.002)
    new = FeatureStore.open(path, SETTINGS, **{**LAYOUT, "width": 7}, overwrite=True)
    assert parent.poll(30)
    outcome = parent.recv()
    child.join()
    assert outcome.startswith("StoreRewrittenError") and "Refit" in outcome
    assert new.generation == 1 and new.missing() == {c: list(range(6)) for c in range(2)}
    assert list((path / "done").glob("rank-*")) == []  # the old writer recorded nothing here
    for c in range(2):  # the new files have the new layout and were not written to
        features = np.load(path / f"features-{c:03d}.npy")
        assert features.shape == (24, 7) and not features.any()
        assert not np.load(path / f"norms-{c:03d}.npy").any()


# ------------------------------------------------------------------ disk full
@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("disk-full case needs root to mount a small tmpfs (not root here)")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"disk-full case: cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_named_and_the_rerun_resumes(small_disk: Path, tmp_path: Path) -> None:
    wide = {"width": 1000, "chunk_size": 4}  # 16 KB per chunk: 96 KB holds a few
    reference = write_all(tmp_path / "whole", **wide)
    assert reference.finalize()
    path = small_disk / "nested" / "s"
    with pytest.raises(DiskFullError, match=r"nested/s while .*Finished chunks are kept; free"):
        write_all(path, **wide)
    done = FeatureStore.open(path, SETTINGS, **{**LAYOUT, **wide}).missing()
    assert 0 < sum(len(v) for v in done.values()) < 12  # some chunks were finished
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    store = write_all(path, **wide)
    assert store.finalize()
    assert tree_bytes(path) == tree_bytes(tmp_path / "whole")
