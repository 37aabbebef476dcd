"""FeatureStore: round trip, guarded reopening, crash-safe resume, several writing processes.

Expected values: the rows themselves (written from a seeded generator), and the bytes of a store
written by one uninterrupted process, against which killed-and-resumed and two-process stores
are compared file by file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import runpy
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from traintrace.exceptions import (
    ConfigurationError,
    NonFiniteGradientError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreRewrittenError,
    TraintraceError,
)
from traintrace.features import store as store_module
from traintrace.features.store import (
    FeatureStore,
    TemporaryStoreDir,
    free_disk_bytes,
    temporary_store_dir,
)

SETTINGS = {
    "model": "sha256:aaaa",
    "checkpoints": [{"fingerprint": "c0", "lr": 0.5}, {"fingerprint": "c1", "lr": 0.25}],
    "projection": {"kind": "dense", "seed": 0, "dim": 6},
    "dataset": {"length": 40, "fingerprint": "d0"},
}
LAYOUT = {"n": 40, "width": 6, "checkpoints": 2, "chunk_size": 4}

# A writer that other processes run: deterministic rows per chunk, written in two halves,
# progress printed per step. With stall_at=j it stalls after writing half of its j-th chunk,
# so a kill lands on a half-written chunk.
WRITER = textwrap.dedent(
    """
    import sys, time
    import torch
    from traintrace.features.store import FeatureStore

    SETTINGS = {settings!r}
    LAYOUT = {layout!r}

    def rows(c, start, stop):
        g = torch.Generator().manual_seed(1000 * c + start)
        return torch.randn(stop - start, LAYOUT["width"], generator=g) * (1 + start)

    def run(path, rank=0, world_size=1, stall_at=-1, dtype="float32", log=None):
        store = FeatureStore.open(
            path, SETTINGS, rank=rank, world_size=world_size, dtype=dtype, **LAYOUT
        )
        for c in range(LAYOUT["checkpoints"]):
            for i in store.pending(c):
                start, stop = store.chunks()[i]
                x = rows(c, start, stop)
                half = (stop - start) // 2
                store.write(c, start, x[:half])
                print(f"half {{c}} {{i}}", flush=True)
                if stall_at == 0:
                    time.sleep(60)
                stall_at -= 1
                store.write(c, start + half, x[half:])
                store.mark_done(c, i)
                print(f"done {{c}} {{i}}", flush=True)
                if log is not None:
                    log.append((c, i))
        return store

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    """
).format(settings=SETTINGS, layout=LAYOUT)


@pytest.fixture
def writer(tmp_path: Path) -> tuple[Path, dict]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return script, runpy.run_path(str(script))


def spawn(script: Path, *args: object) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def tree_bytes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def new_store(path: Path, **overrides) -> FeatureStore:
    return FeatureStore.open(path, SETTINGS, **{**LAYOUT, **overrides})


def fill(store: FeatureStore, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(store.n, store.width, generator=g) for _ in range(store.checkpoints)]
    for c in range(store.checkpoints):
        for i in store.pending(c):
            start, stop = store.chunks()[i]
            store.write_chunk(c, i, data[c][start:stop])
    return data


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    store = new_store(tmp_path / "s")
    assert store.chunks()[:2] == [(0, 4), (4, 8)] and len(store.chunks()) == 10
    assert not store.is_complete()
    data = fill(store)
    assert store.is_complete() and store.missing() == {}
    for c in range(2):
        assert torch.equal(store.read(c), data[c])
        assert torch.equal(store.read(c, 5, 13), data[c][5:13])
        torch.testing.assert_close(store.norms(c), data[c].norm(dim=1))
        blocks = list(store.iter_chunks(c, rows=7))
        assert [s for s, _ in blocks] == list(range(0, 40, 7))
        assert torch.equal(torch.cat([b for _, b in blocks]), data[c])
        assert np.array_equal(store.memmap(c), data[c].numpy())
        buffer = torch.empty(10, 6)
        assert store.read(c, 30, 40, out=buffer) is buffer and torch.equal(buffer, data[c][30:])
    with pytest.raises(ConfigurationError, match="out must be"):
        store.read(0, 0, 5, out=buffer)
    store.close()

    again = new_store(tmp_path / "s")  # same settings: reopened, nothing pending
    assert again.settings == SETTINGS and again.layout["width"] == 6
    assert all(again.pending(c) == [] for c in range(2))
    assert torch.equal(again.read(1), data[1])
    copy = pickle.loads(pickle.dumps(again))  # e.g. sent to a spawned worker
    assert torch.equal(copy.read(0, 3, 9), data[0][3:9])


def test_concurrent_creation_is_race_free(tmp_path: Path) -> None:
    """Eight creators at once, staggered by 2 ms so that some find a store being made."""
    barrier = threading.Barrier(8)
    stores: list[FeatureStore] = []
    errors: list[BaseException] = []

    def create(rank: int) -> None:
        barrier.wait()
        time.sleep(0.002 * rank)
        try:
            stores.append(new_store(tmp_path / "s", rank=rank, world_size=8))
        except BaseException as err:  # collected and re-raised below
            errors.append(err)

    threads = [threading.Thread(target=create, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # losers removed their copies
    stores[3].write_chunk(0, 3, torch.ones(4, 6))
    assert stores[5].done(0) == [3]


def test_settings_mismatch_lists_both_values(tmp_path: Path) -> None:
    new_store(tmp_path / "s")
    changed = {**SETTINGS, "model": "sha256:bbbb", "dataset": {"length": 40, "fingerprint": "d1"}}
    with pytest.raises(StoreMismatchError) as info:
        FeatureStore.open(tmp_path / "s", changed, **{**LAYOUT, "width": 8})
    message = str(info.value)
    assert isinstance(info.value, TraintraceError)
    for expected in (
        'settings.model: stored "sha256:aaaa", requested "sha256:bbbb"',
        'settings.dataset.fingerprint: stored "d0", requested "d1"',
        "layout.width: stored 6, requested 8",
        "overwrite_store=True",
        "new path",
    ):
        assert expected in message
    assert "length" not in message  # equal keys are not listed
    extra = {**SETTINGS, "seed": 3}
    with pytest.raises(StoreMismatchError, match=r"settings.seed: stored <missing>, requested 3"):
        FeatureStore.open(tmp_path / "s", extra, **LAYOUT)
    with pytest.raises(StoreMismatchError, match=r"layout\.dtype"):
        FeatureStore.open(tmp_path / "s", SETTINGS, **LAYOUT, dtype="float16")


def test_overwrite_starts_again(tmp_path: Path) -> None:
    fill(new_store(tmp_path / "s"))
    changed = {**SETTINGS, "model": "sha256:bbbb"}
    store = FeatureStore.open(tmp_path / "s", changed, **LAYOUT, overwrite=True)
    assert store.settings["model"] == "sha256:bbbb"
    assert store.pending(0) == list(range(10)) and not store.is_complete()
    assert torch.count_nonzero(store.read(0)) == 0
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigurationError, match="not a feature store"):
            FeatureStore.open(other, SETTINGS, **LAYOUT, overwrite=overwrite)
    assert (other / "precious.txt").read_text() == "keep me"
    with pytest.raises(ConfigurationError, match="rank 0 only"):
        FeatureStore.open(tmp_path / "s", SETTINGS, **LAYOUT, overwrite=True, rank=1, world_size=2)


def test_float16(tmp_path: Path) -> None:
    store = new_store(tmp_path / "h", dtype="float16")
    data = fill(store)
    half = data[0].half().float()
    assert store.read(0).dtype == torch.float32
    assert torch.equal(store.read(0), half)
    assert torch.equal(store.read(0, 8, 12, out=torch.empty(4, 6)), half[8:12])
    torch.testing.assert_close(store.norms(0), half.norm(dim=1))  # norms of the stored values
    header = store.memmap(0).offset
    assert (tmp_path / "h" / "features-000.npy").stat().st_size == header + 40 * 6 * 2
    with pytest.raises(ConfigurationError, match="float16's range"):
        store.write(0, 0, torch.full((1, 6), 1e5))


def test_write_checks(tmp_path: Path) -> None:
    store = new_store(tmp_path / "s")
    with pytest.raises(ConfigurationError, match=r"\[b, 6\]"):
        store.write(0, 0, torch.zeros(4, 5))
    with pytest.raises(ConfigurationError, match="outside"):
        store.write(0, 38, torch.zeros(4, 6))
    with pytest.raises(NonFiniteGradientError):
        store.write(0, 0, torch.tensor([[float("nan")] * 6]))
    store.write(0, 0, torch.ones(3, 6))
    with pytest.raises(ConfigurationError, match="only 3 of its 4 rows"):
        store.mark_done(0, 0)
    store.write(0, 2, torch.ones(2, 6))  # overlapping writes count once
    store.mark_done(0, 0)
    assert store.done(0) == [0]
    with pytest.raises(ConfigurationError, match="JSON"):
        FeatureStore.open(tmp_path / "t", {"model": object()}, **LAYOUT)
    with pytest.raises(StoreIncompleteError, match="checkpoint 0: 9 of 10 chunks"):
        store.require_complete()


def test_pending_is_round_robin_and_shared(tmp_path: Path) -> None:
    rank0 = new_store(tmp_path / "s", rank=0, world_size=3)
    rank1 = new_store(tmp_path / "s", rank=1, world_size=3)
    assert rank0.pending(0) == [0, 3, 6, 9] and rank1.pending(0) == [1, 4, 7]
    rank1.write_chunk(0, 4, torch.ones(4, 6))
    assert rank0.pending(0, rank=1) == [1, 7]  # another process's completion is seen
    assert (tmp_path / "s" / "done" / "rank-00001.json").exists()
    assert not rank0.finalize()  # incomplete: left untouched
    assert (tmp_path / "s" / "done" / "rank-00001.json").exists()


def test_damaged_store_is_refused(tmp_path: Path) -> None:
    new_store(tmp_path / "s")
    with open(tmp_path / "s" / "features-001.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreCorruptError, match=r"features-001\.npy"):
        new_store(tmp_path / "s")


def test_resume_after_sigkill_is_byte_identical(tmp_path: Path, writer) -> None:
    script, module = writer
    proc = spawn(script, tmp_path / "killed", 0, 1, 3)  # stalls half-way through chunk 3
    done: list[tuple[int, int]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        kind, c, i = line.split()
        if kind == "done":
            done.append((int(c), int(i)))
        elif len(done) == 3:  # chunk 3 is half written and the writer stalls: kill it now
            half_chunk = (int(c), int(i))
            break
    else:
        pytest.fail(f"writer ended early: {proc.stderr.read() if proc.stderr else ''}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()

    store = FeatureStore.open(tmp_path / "killed", SETTINGS, **LAYOUT)
    assert {(0, i) for i in store.done(0)} == set(done)
    assert half_chunk[1] in store.pending(half_chunk[0])
    start, stop = store.chunks()[half_chunk[1]]
    partial = store.read(half_chunk[0], start, stop)
    assert partial[:2].abs().sum() > 0 and partial[2:].abs().sum() == 0  # really half-written
    store.close()  # releases the writer lock pending() took (the lock file goes with it)

    redone: list[tuple[int, int]] = []
    resumed = module["run"](tmp_path / "killed", log=redone)
    assert len(redone) == 20 - len(done) and not set(redone) & set(done)
    whole = module["run"](tmp_path / "whole")
    assert resumed.finalize() and whole.finalize()
    assert tree_bytes(tmp_path / "killed") == tree_bytes(tmp_path / "whole")


def test_two_processes_equal_one(tmp_path: Path, writer) -> None:
    script, module = writer
    procs = [spawn(script, tmp_path / "two", rank, 2, -1) for rank in (0, 1)]  # race to create
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        mine = [tuple(map(int, line.split()[1:])) for line in out.splitlines() if "done" in line]
        assert mine == [(c, i) for c in range(2) for i in range(rank, 10, 2)]
    two = FeatureStore.open(tmp_path / "two", SETTINGS, **LAYOUT)
    assert sorted(p.name for p in (tmp_path / "two" / "done").iterdir()) == [
        "rank-00000.json",
        "rank-00001.json",
    ]
    assert two.finalize()
    one = module["run"](tmp_path / "one")
    assert one.finalize()
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the losing creator removed its temporary directory


def test_float64_store_reads_back_exactly(tmp_path):
    rows = torch.randn(10, 3, dtype=torch.float64)
    store = FeatureStore.open(
        tmp_path / "s", {"x": 1}, n=10, width=3, checkpoints=1, dtype="float64", chunk_size=4
    )
    assert store.read_dtype == torch.float64
    for chunk, (start, stop) in enumerate(store.chunks()):
        store.write_chunk(0, chunk, rows[start:stop])
    assert torch.equal(store.read(0), rows)
    torch.testing.assert_close(store.norms(0), rows.norm(dim=1), rtol=1e-15, atol=0)


def test_data_hashes_are_recorded_with_the_chunks(tmp_path: Path) -> None:
    store = new_store(tmp_path / "s")
    rows = torch.randn(4, 6)
    store.write_chunk(1, 2, rows, data_hash="sha256:feed")
    store.write_chunk(1, 3, rows)
    assert store.chunk_data_hash(1, 2) == "sha256:feed"
    assert store.chunk_data_hash(1, 3) is None  # recorded without one
    assert store.chunk_data_hash(0, 2) is None  # not done
    other = new_store(tmp_path / "s")  # another opener sees them
    assert other.chunk_data_hash(1, 2) == "sha256:feed"
    fill(store)
    assert store.finalize()
    assert new_store(tmp_path / "s").chunk_data_hash(1, 2) == "sha256:feed"  # kept in all.json
    with pytest.raises(ConfigurationError, match="chunk must be"):
        store.chunk_data_hash(0, 10)
    with pytest.raises(ConfigurationError, match="data_hash must be a str"):
        store.write_chunk(0, 0, rows, data_hash=123)


def test_reads_are_verified_once_while_the_file_is_unchanged(tmp_path: Path, monkeypatch) -> None:
    store = new_store(tmp_path / "s", chunk_size=8)
    data = fill(store)
    calls = []
    real = store._hash
    store._hash = lambda b: calls.append(len(b)) or real(b)
    assert torch.equal(store.read(0, 3, 5), data[0][3:5])  # inside one piece: all 8 rows hashed
    assert calls == [8 * 6 * 4]
    store.read(0, 3, 5)
    assert len(calls) == 2  # the file changed within RACY_SECONDS: not remembered, hashed again
    monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)
    store.read(0)
    assert len(calls) == 2 + 5
    store.read(0)
    store.norms(0)
    assert len(calls) == 2 + 5 + 5  # features remembered; norms hashed once per chunk
    store.norms(0)
    assert len(calls) == 2 + 5 + 5
    with open(tmp_path / "s" / "features-000.npy", "r+b") as f:  # any change: checked again
        f.seek(-4, os.SEEK_END)
        f.write(np.float32(data[0][-1, -1]).tobytes())  # the same value: still intact
    assert torch.equal(store.read(0), data[0]) and len(calls) == 2 + 5 + 5 + 5
    store.verify_reads = False
    store.read(0)
    assert len(calls) == 2 + 5 + 5 + 5


def test_overwrite_bumps_the_generation_and_pickles_check_it(tmp_path: Path) -> None:
    old = new_store(tmp_path / "s")
    fill(old)
    copy = pickle.loads(pickle.dumps(old))
    assert old.generation == 0 and copy.read(0).shape == (40, 6)
    copy = pickle.loads(pickle.dumps(old))
    new = FeatureStore.open(tmp_path / "s", SETTINGS, **LAYOUT, overwrite=True)
    assert new.generation == 1 and json_of(tmp_path / "s" / "meta.json")["generation"] == 1
    for stale in (old, copy):
        with pytest.raises(StoreRewrittenError, match=r"generation 0 → 1\).*Refit"):
            stale.read(0)
        with pytest.raises(StoreRewrittenError):
            stale.norms(0, 0, 3)
        with pytest.raises(StoreRewrittenError):
            stale.pending(0)
    assert isinstance(StoreRewrittenError("x"), StoreMismatchError)  # caught like a mismatch
    assert FeatureStore.open(tmp_path / "s", SETTINGS, **LAYOUT, overwrite=True).generation == 2
    fresh = FeatureStore.open(tmp_path / "t", SETTINGS, **LAYOUT, overwrite=True)  # nothing to bump
    assert fresh.generation == 0


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def dead_pid() -> int:
    """The pid of a process that has exited (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_store_dirs_are_removed_on_collection_exit_and_next_start(tmp_path) -> None:
    host = store_module._HOST
    stale = tmp_path / f"traintrace-store-{dead_pid()}-{host}-abc"
    live = tmp_path / f"traintrace-store-{os.getpid()}-{host}-def"
    elsewhere = tmp_path / f"traintrace-store-{dead_pid()}-00000000-ghi"  # another machine's
    legacy = tmp_path / f"traintrace-store-{dead_pid()}"  # could be tempfile's random name
    for d in (stale, live, elsewhere, legacy):
        (d / "store").mkdir(parents=True)
    tmp = TemporaryStoreDir(dir=tmp_path)
    assert not stale.exists() and live.exists() and elsewhere.exists() and legacy.exists()
    assert tmp.path.name.startswith(f"traintrace-store-{os.getpid()}-{host}-")
    fill(FeatureStore.open(os.path.join(tmp.name, "store"), SETTINGS, **LAYOUT))
    path = tmp.path
    del tmp  # garbage-collected: removed
    assert not path.exists()
    with TemporaryStoreDir(dir=tmp_path) as p:
        assert p.is_dir()
    assert not p.exists()
    default = temporary_store_dir()
    assert default.path.parent == Path(tempfile.gettempdir())
    default.cleanup()
    assert not default.path.exists()
    # at normal interpreter exit too (a killed process's dir goes at the next start, above)
    kept = TemporaryStoreDir(dir=tmp_path)
    assert kept._finalizer.atexit and kept._finalizer.alive
    kept.cleanup()


def test_store_under_missing_folders_and_free_space(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c" / "store"
    assert free_disk_bytes(deep) == free_disk_bytes(tmp_path) > 0
    store = FeatureStore.open(deep, SETTINGS, **LAYOUT)
    assert deep.is_dir() and store.pending(0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="a parent is a file"):
        FeatureStore.open(tmp_path / "file" / "store", SETTINGS, **LAYOUT)


def test_content_fingerprint_follows_the_rows(tmp_path: Path) -> None:
    a, b = new_store(tmp_path / "a"), new_store(tmp_path / "b")
    fill(a, seed=0)
    fill(b, seed=0)
    a.finalize()
    assert a.content_fingerprint() == b.content_fingerprint()  # finalized or not
    c = new_store(tmp_path / "c")
    fill(c, seed=1)
    assert c.content_fingerprint() != a.content_fingerprint()
