"""Released names leave (almost) nothing behind, on every back end.

A free name with nobody waiting has no record (on SQLite and files, once the adapter
that freed it has closed or forgotten it: see tests/test_deferred_reclaim.py); its
fences still only grow, across the removal and with the wall clock stepped back; and
a contended name's record is never removed while someone waits for it.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
import uuid
from typing import Any, List, Optional

import pytest

from brokerlock import Adapter, BrokerLock, LockTimeout
from brokerlock.adapters.base import Request, clock_fence
from brokerlock.adapters.embedded.deferred import KEEP_FREED
from brokerlock.adapters.embedded.store import EmbeddedStore

#: One-off names per back end: enough to show growth, quick on every back end.
NAMES = 10_000
#: Records a store may keep beyond its names in use.
SPARE = 3


def records(adapter: Adapter) -> int:
    """How many per-name records the store holds, by looking at its storage directly
    (not counting the store's one fence floor or counter)."""
    kind = type(adapter).__name__
    if kind == "MemoryAdapter":
        return len(set(adapter._leases) | set(adapter._queues))  # type: ignore[attr-defined]
    if kind == "SQLiteAdapter":
        with sqlite3.connect(adapter.path) as conn:  # type: ignore[attr-defined]
            return int(conn.execute("SELECT count(*) FROM brokerlock_locks").fetchone()[0])
    if kind == "FileAdapter":
        return len([e for e in os.listdir(adapter.directory) if e.endswith(".lock")])  # type: ignore[attr-defined]
    if kind == "RedisAdapter":
        client, prefix = adapter._client, adapter.prefix  # type: ignore[attr-defined]
        names = set()
        for key in client.scan_iter(match=prefix + "*", count=1000):
            kind, _, rest = key.decode()[len(prefix):].partition(":")
            if kind == "signal":
                continue  # a waiter's wake-up list: it expires by itself in seconds
            if rest:  # (not the store's one fence counter, "fences")
                names.add(rest[: -len("|want")] if rest.endswith("|want") else rest)
        return len(names)
    if kind == "PostgresAdapter":
        ident = adapter._ident  # type: ignore[attr-defined]
        return int(
            adapter._run(  # type: ignore[attr-defined]
                "count",
                lambda c: c.execute(
                    f"SELECT count(*) FROM {ident.as_string(c)} WHERE name <> ''"  # not the floor
                ).fetchone()[0],
            )
        )
    raise AssertionError(f"no way to count the records of {kind}")


def skip_where_records_stay(adapter: Adapter) -> None:
    """Windows refuses to delete a file that any handle holds open without
    FILE_SHARE_DELETE, which ``os.open`` never asks for: the file store's unlink under
    the record's lock fails there, and the free record stays (as before reclamation)."""
    if sys.platform == "win32" and type(adapter).__name__ == "FileAdapter":
        pytest.skip("Windows cannot delete a record file held open: the file store keeps free records there")


def test_one_off_names_leave_a_bounded_number_of_records(store: Adapter) -> None:
    skip_where_records_stay(store)
    lock = BrokerLock(store)
    run = uuid.uuid4().hex[:8]
    before = records(store)
    for i in range(NAMES):
        item = lock.item(f"report-{run}-{i}", ttl=60)
        item.acquire()
        item.release()
    # The embedded stores keep the records of the names an adapter freed last (see
    # embedded.deferred), and remove them when it is closed.
    kept = KEEP_FREED if isinstance(store, EmbeddedStore) else 0
    after = records(store)
    assert after <= before + SPARE + kept, f"{NAMES} one-off names left {after - before} records"
    assert store.list() == []
    store.close()
    after = records(store)
    assert after <= before + SPARE, f"{NAMES} one-off names left {after - before} records after close()"


def test_fences_grow_across_removal(store: Adapter) -> None:
    request = Request.make("job", "a", 60.0)
    first = store.try_acquire(request)
    assert first is not None
    assert store.release("job", "a")
    # The lock's record is gone now; a new one must not start again from the clock
    # alone, nor from nothing (memory's counter).
    second = store.try_acquire(Request.make("job", "b", 60.0))
    assert second is not None and second.fence > first.fence
    assert store.release("job", "b")
    other = store.try_acquire(Request.make("other", "c", 60.0))
    assert other is not None


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_fences_grow_with_the_wall_clock_stepped_back(
    kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock steps back an hour between two leases of a name whose record was
    removed in between: the floor, not the clock, keeps the fences apart."""
    from brokerlock import FileAdapter, SQLiteAdapter
    from brokerlock.adapters.file import record
    from brokerlock.adapters.sqlite import adapter as sqlite_adapter

    store: Adapter = (
        SQLiteAdapter(tmp_path / "locks.sqlite3") if kind == "sqlite" else FileAdapter(tmp_path / "locks")
    )
    skip_where_records_stay(store)
    first = store.try_acquire(Request.make("job", "a", 60.0))
    assert first is not None and store.release("job", "a")
    assert records(store) == 1  # kept free for a while (see embedded.deferred)
    store.close()  # which removes it
    assert records(store) == 0
    behind = lambda: clock_fence() - 3_600_000_000  # noqa: E731
    monkeypatch.setattr(sqlite_adapter, "clock_fence", behind)
    monkeypatch.setattr(record, "clock_fence", behind)
    fences: List[int] = [first.fence]
    for token in ("b", "c", "d"):
        lease = store.try_acquire(Request.make("job", token, 60.0))
        assert lease is not None
        fences.append(lease.fence)
        assert store.release("job", token)
        if token == "c":
            store.close()  # removed again between two leases
            assert records(store) == 0
    assert fences == sorted(set(fences)), f"fences repeated or fell back: {fences}"
    store.close()


def test_a_contended_record_stays_while_someone_waits(make_store: Any) -> None:
    holder_lock, waiter_lock, other_lock = (BrokerLock(make_store()) for _ in range(3))
    store = make_store()
    skip_where_records_stay(store)
    holder = holder_lock.item("job", ttl=60)
    holder.acquire()
    held_fence = holder.fence
    assert held_fence is not None
    got: List[Optional[int]] = []
    started = threading.Event()

    def wait() -> None:
        item = waiter_lock.item("job", ttl=60, timeout=30)
        started.set()
        item.acquire()
        got.append(item.fence)
        item.release()

    # A waiter that gives up while the lock is held: the record must stay, held.
    quitter = other_lock.item("job", ttl=60, timeout=0.3)
    gave_up: List[BaseException] = []

    def quit() -> None:  # another thread: this one holds "job" and would wait for itself
        try:
            quitter.acquire()
        except LockTimeout as exc:
            gave_up.append(exc)

    quitting = threading.Thread(target=quit)
    quitting.start()
    quitting.join(10)
    assert gave_up, "the quitter did not time out"
    assert records(store) == 1
    waiting = threading.Thread(target=wait)
    waiting.start()
    assert started.wait(10)
    # Give the waiter time to queue (not needed for correctness: the checks below hold
    # either way, but the case worth testing is a release with someone queued).
    time.sleep(0.5)
    assert records(store) == 1
    try:
        holder.release()  # intact: raises LockLost if the quitter or waiter broke the lease
    finally:
        waiting.join(30)
    assert got and got[0] is not None and got[0] > held_fence
    assert store.list() == []
    # Freed with nobody waiting: kept by the adapter that freed it, until it closes.
    for lock in (holder_lock, waiter_lock, other_lock):
        lock.close()
    assert records(store) == 0
