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
