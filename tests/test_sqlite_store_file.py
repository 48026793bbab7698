"""The SQLite store's file under a long-lived process: deleted or replaced under a
holder, and opened by thousands of threads that come and go.

A holder whose database file was deleted or replaced holds nothing in the file that
everybody else now uses: every call it makes, ``release()`` included, must say
``LockLost`` rather than report a lease that a newcomer may hold at the same time.
And a process whose threads come and go must not pile up descriptors: SQLite cannot
close a connection's file while another connection of the process has it open.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from brokerlock import BrokerLock, LockLost, SQLiteAdapter

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX unlink of an open file")


def _swap(tmp_path: Path, fault: str) -> None:
    """Delete the store's files, or replace the database with another store's."""
    if fault == "deleted":
        for leftover in tmp_path.glob("locks.sqlite3*"):
            if leftover.is_file():
                leftover.unlink()
        return
    SQLiteAdapter(tmp_path / "other.sqlite3").close()
    # Replaced with its WAL gone too: SQLite would replay an old WAL into the new file.
    for leftover in (tmp_path / "locks.sqlite3-wal", tmp_path / "locks.sqlite3-shm"):
        leftover.unlink()
    os.replace(tmp_path / "other.sqlite3", tmp_path / "locks.sqlite3")


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
@pytest.mark.parametrize("queued", [False, True], ids=["alone", "with-waiter"])
def test_release_after_the_database_was_swapped_raises_lock_lost(
    fault: str, queued: bool, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'locks.sqlite3'}"
    holder = BrokerLock.from_url(url).item("job", ttl="30s", timeout="5s")
    holder.acquire()
    waiter_result: list[object] = []
    if queued:
        # A waiter of the old file, queued before the swap: the old holder's release
        # must not hand it a lease in the ghost file either.
        waiting = BrokerLock.from_url(url).item("job", ttl="30s", timeout="3s")
        queued_event = threading.Event()

        def wait() -> None:
            queued_event.set()
            try:
                waiting.acquire()
                waiter_result.append(waiting.fence)
                waiting.release()
            except Exception as exc:  # LockTimeout or LockLost: both are honest
                waiter_result.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        queued_event.wait()
        deadline = 50
        while deadline and not _queued(tmp_path / "locks.sqlite3"):
            threading.Event().wait(0.02)
            deadline -= 1
    _swap(tmp_path, fault)
    newcomer = BrokerLock.from_url(url).item("job", ttl="30s", timeout="0s")
    assert newcomer.try_acquire(), "the lock must be free in the new file"
    with pytest.raises(LockLost):
        holder.release()
    assert not holder.acquired
    # The newcomer's lease is untouched and still the only one.
    lease = SQLiteAdapter(tmp_path / "locks.sqlite3").get("job")
    assert lease is not None and newcomer.lease is not None
    assert lease.token == newcomer.lease.token
    newcomer.release()
    if queued:
        thread.join(10)
        assert not thread.is_alive()
        # The waiter of the old file got the lock only after the newcomer's release, in
        # the new file (a fence above the newcomer's), or gave up; never in the ghost.
        (outcome,) = waiter_result
        assert not isinstance(outcome, int) or outcome > lease.fence, outcome


def _queued(path: Path) -> bool:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return bool(conn.execute("SELECT count(*) FROM brokerlock_waiters").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
def test_extend_after_the_database_was_swapped_raises_lock_lost(fault: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'locks.sqlite3'}"
    holder = BrokerLock.from_url(url).item("job", ttl="30s", timeout="5s")
    holder.acquire()
    _swap(tmp_path, fault)
    newcomer = BrokerLock.from_url(url).item("job", ttl="30s", timeout="0s")
    assert newcomer.try_acquire()
    with pytest.raises(LockLost):
        holder.extend()
    newcomer.release()


_THREADS_SCRIPT = r"""
import gc, json, os, sys, threading, time
from brokerlock import BrokerLock, SQLiteAdapter

def open_fds():
    return len(os.listdir("/proc/self/fd"))

path, total, at_once = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
item = BrokerLock(SQLiteAdapter(path)).item("job", ttl="30s", timeout="60s")
with item.hold():
    pass
gc.collect()
baseline = open_fds()
errors = []

def work():
    try:
        with item.hold():  # one name: the threads also queue, with bells and inotify
            pass
    except BaseException as exc:
        errors.append(repr(exc))

for _ in range(total // at_once):
    threads = [threading.Thread(target=work) for _ in range(at_once)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
# A thread's own descriptors (its bell, its inotify) close as its state is dropped,
# which may come a moment after join(): look until they are gone, for a while.
give_up = time.monotonic() + 10
while True:
    gc.collect()
    after = open_fds()
    if after <= baseline + int(sys.argv[4]) or time.monotonic() > give_up:
        break
    time.sleep(0.05)
print(json.dumps({"baseline": baseline, "after": after, "errors": errors[:3]}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_descriptors_return_to_baseline_after_thousands_of_short_lived_threads(
    tmp_path: Path,
) -> None:
    import json
    import subprocess

    from brokerlock.adapters.sqlite.pool import POOL_SIZE

    # Each pooled connection holds the database and its WAL open; a few more for slack.
    allowed = 2 * POOL_SIZE + 4
    out = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(tmp_path / "locks.sqlite3"), "4000", "40",
         str(allowed)],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    result = json.loads(out)
    assert result["errors"] == []
    assert result["after"] <= result["baseline"] + allowed, result
