"""Deferred reclamation on the embedded stores (see brokerlock/adapters/embedded/deferred.py).

A release keeps a free record; the adapter removes it when the name is pushed out of
its small set of freed names, when it is closed or dropped, and at the interpreter's
exit. Checked here: the store stays bounded (at most the set's size per adapter, none
after close, garbage collection or a normal exit; a killed process's records until
their names are next freed), and under processes and threads that cycle shared and
one-off names while records are kept, pushed out and removed, nobody shares a lock
and no fence repeats or goes back (fences come from the floor alone in those runs).
"""

from __future__ import annotations

import gc
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, List

import pytest

from brokerlock import BrokerLock, FileAdapter, SQLiteAdapter
from brokerlock.adapters.base import Request
from brokerlock.adapters.embedded import deferred
from brokerlock.adapters.embedded.deferred import Deferred

WORKER = os.path.join(os.path.dirname(__file__), "reclaim_worker.py")
KINDS = ["file", "sqlite"]

pytestmark = pytest.mark.skipif(
    sys.platform == "win32",
    reason="Windows cannot delete a record file held open: the file store keeps free records there",
)


def _store_path(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "locks") if kind == "file" else str(tmp_path / "locks.sqlite3")


def _open(kind: str, path: str) -> Any:
    return FileAdapter(path) if kind == "file" else SQLiteAdapter(path)


def _records(kind: str, path: str) -> int:
    if kind == "file":
        return len([e for e in os.listdir(path) if e.endswith(".lock")])
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM brokerlock_locks").fetchone()[0])


def _cycle(adapter: Any, names: List[str]) -> None:
    for name in names:
        request = Request.make(name, uuid.uuid4().hex, 60.0)
        assert adapter.try_acquire(request) is not None
        assert adapter.release(name, request.token)


def test_the_set_forgets_its_oldest_name_first() -> None:
    reclaimed: List[List[str]] = []
    kept = Deferred(reclaimed.append, size=3, batch=1)
    assert [kept.freed(n) for n in ("a", "b", "c")] == [[], [], []]
    assert kept.freed("a") == []  # freed again: now the newest
    assert kept.freed("d") == ["b"]
    assert kept.freed("e") == ["c"]
    assert len(kept) == 3 and "a" in kept and "b" not in kept
    kept.flush()
    assert reclaimed == [["a", "d", "e"]] and len(kept) == 0
    kept.flush()  # nothing left: nothing to do
    assert reclaimed == [["a", "d", "e"]]
    # In batches: the oldest few go at once, and the set never holds more than its size.
    batched = Deferred(reclaimed.append, size=4, batch=3)
    assert [batched.freed(n) for n in "abcd"] == [[], [], [], []]
    assert batched.freed("e") == ["a", "b", "c"]
    assert [batched.freed(n) for n in "fg"] == [[], []]
    assert len(batched) == 4
    assert batched.freed("h") == ["d", "e", "f"]
    assert len(batched) == 2


def test_the_set_under_threads_that_free_evict_and_flush_at_once() -> None:
    """No operation fails for what another thread did in between (a release must never
    raise for it), the set never grows past its size for long, and no name is lost:
    each is still kept, or was handed back for removal."""
    import threading

    reclaimed: List[str] = []
    kept = Deferred(reclaimed.extend, size=8, batch=3)
    evicted: List[str] = []
    errors: List[BaseException] = []
    start = threading.Barrier(5)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (switch threads as often as possible)

    def free(me: int) -> None:
        try:
            start.wait()
            for i in range(20000):
                evicted.extend(kept.freed(f"{me}-{i % 40}"))  # (names come back: re-freed)
        except BaseException as exc:
            errors.append(exc)

    done = threading.Event()

    def flush() -> None:
        try:
            start.wait()
            while True:  # (as often as it can, until the others are done)
                kept.flush()
                if done.is_set():
                    break
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=free, args=(me,)) for me in range(4)]
    threads.append(threading.Thread(target=flush))
    try:
        for t in threads:
            t.start()
        for t in threads[:-1]:
            t.join(60)
        done.set()
        threads[-1].join(60)
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    assert len(kept) <= 8 + 4  # (each freeing thread may have added one before evicting)
    every = {f"{me}-{i}" for me in range(4) for i in range(40)}
    assert every <= set(kept._names) | set(evicted) | set(reclaimed)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cycled_name_keeps_its_record_and_fences_grow(kind: str, tmp_path: Path) -> None:
    path = _store_path(kind, tmp_path)
    adapter = _open(kind, path)
    fences = []
    for _ in range(5):
        request = Request.make("job", uuid.uuid4().hex, 60.0)
        lease = adapter.try_acquire(request)
        assert lease is not None
        fences.append(lease.fence)
        assert adapter.release("job", request.token)
        assert _records(kind, path) == 1
    assert fences == sorted(set(fences))
    adapter.close()
    assert _records(kind, path) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_one_off_names_keep_at_most_the_set_and_none_after_close(kind: str, tmp_path: Path) -> None:
    path = _store_path(kind, tmp_path)
    adapter = _open(kind, path)
    other = _open(kind, path)  # another adapter: its own set, the same store
    _cycle(adapter, [f"a-{i}" for i in range(5 * deferred.KEEP_FREED)])
    kept = len(adapter._deferred)
    assert deferred.KEEP_FREED - deferred.EVICT_BATCH < kept <= deferred.KEEP_FREED
    assert _records(kind, path) == kept
    _cycle(other, [f"b-{i}" for i in range(3 * deferred.KEEP_FREED + 5)])
    assert _records(kind, path) == kept + len(other._deferred)
    adapter.close()
    assert _records(kind, path) == len(other._deferred) > deferred.KEEP_FREED - deferred.EVICT_BATCH
    other.close()
    assert _records(kind, path) == 0
    # A name held when its adapter closes is not removed, and is kept free again.
    request = Request.make("held", "t", 60.0)
    assert adapter.try_acquire(request) is not None
    adapter.close()
    assert _records(kind, path) == 1
    assert adapter.get("held") is not None
    assert adapter.release("held", "t")
    adapter.close()
    assert _records(kind, path) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_dropped_adapter_removes_what_it_kept(kind: str, tmp_path: Path) -> None:
    path = _store_path(kind, tmp_path)
    adapter = _open(kind, path)
    _cycle(adapter, [f"a-{i}" for i in range(10)])
    assert _records(kind, path) == 10
    del adapter
    gc.collect()
    assert _records(kind, path) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_record_pushed_out_while_taken_elsewhere_stays(kind: str, tmp_path: Path) -> None:
    """The adapter that freed a name forgets it while another holds it, or waits for
    it: the record stays, and the holder keeps it free when it releases."""
    path = _store_path(kind, tmp_path)
    mine, theirs = _open(kind, path), _open(kind, path)
    _cycle(mine, ["job"])
    taken = theirs.try_acquire(Request.make("job", "theirs", 60.0))
    assert taken is not None
    mine.close()  # "job" is pushed out: it is held, so it stays
    assert _records(kind, path) == 1
    assert mine.try_acquire(Request.make("job", "mine", 60.0)) is None
    assert theirs.release("job", "theirs")
    again = mine.try_acquire(Request.make("job", "mine", 60.0))
    assert again is not None and again.fence > taken.fence
    assert mine.release("job", "mine")
    assert _records(kind, path) == 1
    theirs.close()  # any adapter that remembers the name removes its free record
    assert _records(kind, path) == 0
    mine.close()  # (already gone: nothing to do)
    third = mine.try_acquire(Request.make("job", "third", 60.0))
    assert third is not None and third.fence > again.fence


def _run(*args: str, timeout: float = 120) -> None:
    done = subprocess.run([sys.executable, WORKER, *args], capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]


@pytest.mark.parametrize("kind", KINDS)
def test_processes_and_threads_cycling_while_records_come_and_go(kind: str, tmp_path: Path) -> None:
    """Four processes of three threads cycle six shared names and one-off names, each
    adapter keeping only two freed names (so records are pushed out and removed all
    the time) and a thread of each closing its adapter every few ms. Fences come from
    the floor alone: one removed before its fence reached the floor, or under a
    holder or a newcomer, repeats a fence or lets two holders in."""
    path = _store_path(kind, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    _open(kind, path).close()  # (the store made once, not by four processes at once)
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "cycle", kind, path, str(out), "2", "6", "150", "3"],
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    assert not (out / "violations").exists(), (out / "violations").read_text()
    logs = list(out.glob("fences-*"))
    assert any(p.name.startswith("fences-shared-") for p in logs)
    assert sum(len(p.read_text().split()) for p in logs) == 4 * 3 * 150
    for log in logs:
        fences = [int(line) for line in log.read_text().split()]
        assert all(a < b for a, b in zip(fences, fences[1:])), f"{log.name}: {fences}"
    # Every process exited normally without close(): nothing is left.
    assert _records(kind, path) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_exit_leaves_nothing_and_a_killed_process_leaves_its_set(kind: str, tmp_path: Path) -> None:
    path = _store_path(kind, tmp_path)
    _open(kind, path).close()
    _run("oneoff", kind, path, str(tmp_path), "16", "done", "100")
    assert _records(kind, path) == 0
    proc = subprocess.Popen(
        [sys.executable, WORKER, "oneoff", kind, path, str(tmp_path), "16", "killed", "100", "hang"]
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    # Its kept records stay (free), until somebody next frees their names.
    assert 16 - deferred.EVICT_BATCH < _records(kind, path) <= 16
    lock = BrokerLock(_open(kind, path))
    assert lock.adapter.list() == []
    for i in range(100):
        item = lock.item(f"killed-{i}", ttl="60s", timeout=0)
        item.acquire()
        item.release()
    lock.close()
    assert _records(kind, path) == 0


def test_a_file_removal_gives_up_on_a_busy_record_or_floor(tmp_path: Path) -> None:
    """A removal may run inside the garbage collector in a thread that holds the
    record's or the floor's flock up the stack: it must give up, not wait for itself,
    and never unlink a record whose fence the floor does not cover."""
    from brokerlock.adapters.embedded.locking import lock_file, unlock_file
    from brokerlock.adapters.file.adapter import file_name

    path = _store_path("file", tmp_path)
    adapter = _open("file", path)
    for busy in (os.path.join(path, file_name("job")), os.path.join(path, "fence")):
        _cycle(adapter, ["job"])
        fd = os.open(busy, os.O_RDWR)
        try:
            lock_file(fd, shared=busy.endswith("fence"))  # (a reader of the floor)
            started = time.monotonic()
            adapter.close()
            assert time.monotonic() - started < 5
            assert _records("file", path) == 1, busy
        finally:
            unlock_file(fd)
            os.close(fd)
    _cycle(adapter, ["job"])
    adapter.close()
    assert _records("file", path) == 0


def test_a_sqlite_removal_gives_up_on_a_busy_store(tmp_path: Path) -> None:
    path = _store_path("sqlite", tmp_path)
    adapter = _open("sqlite", path)
    _cycle(adapter, ["job"])
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # (as a transaction of ours up the stack would)
        started = time.monotonic()
        adapter.close()
        assert time.monotonic() - started < 10
        assert writer.execute("SELECT count(*) FROM brokerlock_locks").fetchone()[0] == 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    _cycle(adapter, ["job"])
    adapter.close()
    assert _records("sqlite", path) == 0
