"""Direct hand-over in the embedded stores: a release grants the lock to the queue's
head and its bell carries the news, so the woken waiter need not touch the store.

The record (or row) stays the truth: these tests take the news away, time a waiter out
at the very moment it is granted the lock, and kill a waiter that was just granted it;
the lock must never be stranded nor held twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from stores import file_url, needs_flock, needs_witness

from brokerlock import Adapter, BrokerLock, FileAdapter, SQLiteAdapter
from brokerlock._platform import WAKEUP
from brokerlock.adapters.base import Lease, Request
from brokerlock.adapters.embedded.wakeup import libc

pytestmark = pytest.mark.skipif(
    WAKEUP is None or (WAKEUP == "inotify" and libc() is None),
    reason="no bells here (BROKERLOCK_PORTABLE=1): waiters poll",
)

STORES: Dict[str, Callable[[Path], Adapter]] = {
    "file": lambda tmp: FileAdapter(tmp / "locks"),
    "sqlite": lambda tmp: SQLiteAdapter(tmp / "locks.sqlite3"),
}
URLS: Dict[str, Callable[[Path], str]] = {
    "file": lambda tmp: file_url(tmp / "locks"),
    "sqlite": lambda tmp: f"sqlite:///{tmp / 'locks.sqlite3'}",
}


@pytest.fixture(params=[pytest.param("file", marks=needs_flock), "sqlite"])
def kind(request: Any) -> str:
    return str(request.param)


def _waiter(adapter: Adapter, token: str, timeout: float, out: List[Optional[Lease]]) -> threading.Thread:
    request = Request.make("job", token, 30.0)
    thread = threading.Thread(target=lambda: out.append(adapter.acquire(request, timeout)), daemon=True)
    thread.start()
    return thread


def _wait_queued(adapter: Adapter, count: int) -> None:
    """Until ``count`` waiters are queued for "job"; the queue is the store's own."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _queue_length(adapter) >= count:
            return
        time.sleep(0.005)
    raise AssertionError(f"{count} waiters never queued")


def _queue_length(adapter: Adapter) -> int:
    if isinstance(adapter, FileAdapter):
        found: List[int] = []

        def look(record: Any) -> Any:
            found.append(len((record or {}).get("queue") or []))
            return None, None

        adapter._update("job", "read", look)
        return found[0]
    assert isinstance(adapter, SQLiteAdapter)
    return int(
        adapter._run(
            "count", lambda c: c.execute("SELECT count(*) FROM brokerlock_waiters").fetchone()[0]
        )
    )


def test_release_grants_the_head_and_its_news_suffices(kind: str, tmp_path: Path) -> None:
    adapter = STORES[kind](tmp_path)
    holder = Request.make("job", "holder", 30.0)
    assert adapter.try_acquire(holder) is not None
    got: List[Optional[Lease]] = []
    first = _waiter(adapter, "first", 10.0, got)
    _wait_queued(adapter, 1)
    later: List[Optional[Lease]] = []
    second = _waiter(STORES[kind](tmp_path), "second", 10.0, later)
    _wait_queued(adapter, 2)
    assert adapter.release("job", "holder")
    first.join(5)
    assert got and got[0] is not None and got[0].token == "first"
    current = adapter.get("job")
    assert current is not None and current.token == "first" and current.fence == got[0].fence
    assert current.expires_at == got[0].expires_at
    assert second.is_alive(), "the second waiter must wait for the first"
    assert adapter.release("job", "first")
    second.join(5)
    assert later and later[0] is not None and later[0].token == "second"
    assert later[0].fence > got[0].fence


def test_a_lost_ring_leaves_the_grant_in_the_store(kind: str, tmp_path: Path, monkeypatch: Any) -> None:
    """Without the news (a torn or clobbered ring), the waiter finds the grant itself."""
    adapter = STORES[kind](tmp_path)
    monkeypatch.setattr(type(adapter), "_granted", staticmethod(lambda request, news: None))
    holder = Request.make("job", "holder", 30.0)
    assert adapter.try_acquire(holder) is not None
    got: List[Optional[Lease]] = []
    waiter = _waiter(adapter, "waiter", 10.0, got)
    _wait_queued(adapter, 1)
    started = time.monotonic()
    assert adapter.release("job", "holder")
    waiter.join(5)
    assert got and got[0] is not None and got[0].token == "waiter"
    assert time.monotonic() - started < 0.9, "the bell woke it, not the 1 s safety net"
    current = adapter.get("job")
    assert current is not None and current.token == "waiter"


def test_a_waiter_timing_out_as_it_is_granted_passes_the_lock_on(
    kind: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """The grant lands between the waiter's last look and its leaving the queue."""
    adapter = STORES[kind](tmp_path)
    other = STORES[kind](tmp_path)
    holder = Request.make("job", "holder", 30.0)
    assert other.try_acquire(holder) is not None
    leave = type(adapter)._leave
    released: List[bool] = []

    def leave_after_the_grant(self: Any, name: str, *args: Any) -> Any:
        released.append(other.release("job", "holder"))  # grants the lock to "late"
        current = other.get("job")
        assert current is not None and current.token == "late"
        return leave(self, name, *args)

    monkeypatch.setattr(type(adapter), "_leave", leave_after_the_grant)
    got: List[Optional[Lease]] = []
    late = _waiter(adapter, "late", 0.3, got)
    _wait_queued(other, 1)
    later: List[Optional[Lease]] = []
    patient = _waiter(other, "patient", 10.0, later)
    _wait_queued(other, 2)
    late.join(5)
    assert released == [True]
    assert got == [None], "the waiter that gave up must not be told it holds the lock"
    patient.join(5)
    assert later and later[0] is not None and later[0].token == "patient"
    current = other.get("job")
    assert current is not None and current.token == "patient"


_QUEUER = """
import sys, time
from brokerlock import BrokerLock
item = BrokerLock.from_url(sys.argv[1]).item("job", ttl="30s", timeout="30s")
print("waiting", flush=True)
item.acquire()
print("acquired", flush=True)
time.sleep(60)
"""


@needs_witness
@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="Windows cannot stop a process from outside")
def test_a_waiter_killed_after_its_grant_does_not_strand_the_lock(kind: str, tmp_path: Path) -> None:
    url = URLS[kind](tmp_path)
    holder = BrokerLock.from_url(url).item("job", ttl="30s", timeout="1s")
    holder.acquire()
    doomed = subprocess.Popen(
        [sys.executable, "-c", _QUEUER, url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert doomed.stdout is not None and doomed.stdout.readline().strip() == "waiting"
        adapter = STORES[kind](tmp_path)
        _wait_queued(adapter, 1)
        # Stopped, the waiter cannot take the news; the grant is made to it all the same.
        os.kill(doomed.pid, signal.SIGSTOP)
        patient = BrokerLock.from_url(url).item("job", ttl="30s", timeout="10s")
        got: List[bool] = []
        thread = threading.Thread(target=lambda: got.append(bool(patient.acquire())), daemon=True)
        thread.start()
        _wait_queued(adapter, 2)
        holder.release()
        current = adapter.get("job")
        assert current is not None and current.pid == doomed.pid, "the head is granted the lock"
        started = time.monotonic()
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(5)
        thread.join(5)
        assert got == [True]
        assert time.monotonic() - started < 2.0, "its death frees the lock, not the ttl"
        patient.release()
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()


@needs_witness
def test_a_release_to_a_waiter_that_died_queued_passes_the_lock_on(
    kind: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """A release grants the head without testing its liveness first (the file store
    tests it after letting go of the record, SQLite after its one statement); a head
    that was killed while queued then holds a dead lease, and the release itself must
    wake the live waiter behind it: with the safety nets out of the way, nothing else
    would before its timeout."""
    from brokerlock.adapters.embedded import bells as _bells

    monkeypatch.setattr(_bells, "SAFETY_NET", 600.0)
    monkeypatch.setattr(_bells, "DEATH_NET", 600.0)
    url = URLS[kind](tmp_path)
    holder = BrokerLock.from_url(url).item("job", ttl="30s", timeout="1s")
    holder.acquire()
    doomed = subprocess.Popen([sys.executable, "-c", _QUEUER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert doomed.stdout is not None and doomed.stdout.readline().strip() == "waiting"
        adapter = STORES[kind](tmp_path)
        _wait_queued(adapter, 1)
        got: List[Optional[Lease]] = []
        patient = _waiter(adapter, "patient", 20.0, got)
        _wait_queued(adapter, 2)
        # Killed behind the holder's back: where inotify hears the death, the patient
        # wakes and drops the dead head itself; elsewhere the head stays queued, dead.
        doomed.kill()
        doomed.wait(5)
        started = time.monotonic()
        holder.release()
        patient.join(10)
        assert got and got[0] is not None and got[0].token == "patient"
        assert time.monotonic() - started < 2.0, "the release woke the live waiter"
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()


def test_an_sqlite_store_of_an_older_version_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "locks.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute(
        "CREATE TABLE brokerlock_locks (name TEXT PRIMARY KEY, token TEXT, fence INTEGER NOT NULL, "
        "acquired_at REAL, expires_at REAL, host TEXT, pid INTEGER, thread TEXT, witness TEXT)"
    )
    old.execute(
        "CREATE TABLE brokerlock_waiters (ticket INTEGER PRIMARY KEY AUTOINCREMENT, "
        "name TEXT NOT NULL, token TEXT NOT NULL, witness TEXT, until REAL NOT NULL, bell TEXT)"
    )
    old.execute("INSERT INTO brokerlock_locks (name, fence) VALUES ('job', 41)")
    old.close()
    adapter = SQLiteAdapter(path)
    assert adapter.try_acquire(Request.make("job", "holder", 30.0)) is not None
    got: List[Optional[Lease]] = []
    waiter = _waiter(adapter, "waiter", 10.0, got)
    _wait_queued(adapter, 1)
    assert adapter.release("job", "holder")
    waiter.join(5)
    assert got and got[0] is not None and got[0].token == "waiter" and got[0].fence > 41


@needs_flock
def test_a_waiter_leaves_a_damaged_file_queue_cleanly(tmp_path: Path) -> None:
    """Junk put into a record's queue while a waiter waits (a damaged or hand-edited
    file) breaks neither the waiter's timing out nor the release after it."""
    import json

    adapter = FileAdapter(tmp_path / "locks")
    assert adapter.try_acquire(Request.make("job", "holder", 30.0)) is not None
    got: List[Optional[Lease]] = []
    waiter = _waiter(adapter, "waiter", 1.0, got)
    _wait_queued(adapter, 1)
    path = adapter._path("job")
    with open(path, encoding="utf-8") as f:
        record = json.loads(f.read())
    record["queue"] = [5, [], "junk", {"a": 1}] + record["queue"]
    with open(path, "w", encoding="utf-8") as f:  # no ring: the waiter does not look
        f.write(json.dumps(record))
    waiter.join(5)
    assert got == [None]
    assert adapter.release("job", "holder")
    assert adapter.try_acquire(Request.make("job", "next", 30.0)) is not None


def test_a_grant_read_after_its_lease_ran_out_is_not_taken(kind: str, tmp_path: Path) -> None:
    """A waiter stopped between the ring and its reading of the news (here: its clock
    jumps 100 s, as if it had been stopped that long) must not walk in with a lease
    that already ran out, while somebody else may hold the lock: the store decides."""
    late = {"by": 0.0}

    def clock() -> float:
        ahead = late["by"] if threading.current_thread().name == "late-reader" else 0.0
        return time.time() + ahead

    path = tmp_path / ("locks" if kind == "file" else "locks.sqlite3")
    adapter: Adapter = FileAdapter(path, clock=clock) if kind == "file" else SQLiteAdapter(path, clock=clock)
    assert adapter.try_acquire(Request.make("job", "holder", 30.0)) is not None
    got: List[Optional[Lease]] = []
    request = Request.make("job", "late", 30.0)
    thread = threading.Thread(
        target=lambda: got.append(adapter.acquire(request, 10.0)), name="late-reader", daemon=True
    )
    thread.start()
    _wait_queued(adapter, 1)
    late["by"] = 100.0
    adapter.release("job", "holder")  # grants "late" a lease until now + 30 s
    thread.join(5)
    assert got and got[0] is not None and got[0].token == "late"
    # Not the granted lease (expiring in 30 s) but one it took by its own clock.
    assert got[0].expires_at is not None and got[0].expires_at > time.time() + 60


def test_a_release_just_after_a_waiters_look_still_wakes_it(tmp_path: Path, monkeypatch: Any) -> None:
    """The SQLite waiter's step reads the holder to decide whether to sleep. A release
    landing right after that read must find the waiter already queued, and ring it:
    with the safety net out of the way, a lost wake-up here shows as a timeout."""
    from brokerlock.adapters.embedded import bells as _bells
    from brokerlock.adapters.sqlite import sql, waiting

    monkeypatch.setattr(_bells, "SAFETY_NET", 60.0)
    path = tmp_path / "locks.sqlite3"
    waiter_side, holder_side = SQLiteAdapter(path), SQLiteAdapter(path)
    assert holder_side.try_acquire(Request.make("job", "holder", 60.0)) is not None
    released = threading.Event()

    class Looked:
        """The waiter's connection: releases the holder right after the first look."""

        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def execute(self, query: str, *args: Any) -> Any:
            cursor = self._conn.execute(query, *args)
            # (On the FIFO and event paths the read also names the waiter ahead.)
            if query in (sql.HOLDER, waiting._HOLDER_AND_AHEAD) and not released.is_set():
                rows = cursor.fetchall()
                released.set()
                assert holder_side.release("job", "holder")
                return _Rows(rows)
            return cursor

    class _Rows:
        def __init__(self, rows: List[Any]) -> None:
            self._rows = rows

        def fetchone(self) -> Any:
            return self._rows[0] if self._rows else None

    real_run = waiter_side._run

    def run(action: str, fn: Callable[[Any], Any], deadline: Optional[float] = None) -> Any:
        return real_run(action, lambda conn: fn(Looked(conn)), deadline)

    monkeypatch.setattr(waiter_side, "_run", run)
    started = time.monotonic()
    lease = waiter_side.acquire(Request.make("job", "waiter", 60.0), 5.0)
    assert released.is_set()
    assert lease is not None and lease.token == "waiter", "the release's wake-up was lost"
    assert time.monotonic() - started < 5.0


def test_a_thread_whose_last_wait_was_contended_queues_in_its_first_look(
    kind: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """Under contention a waiter skips the newcomer's try (Bells.armed): one update of
    the store to queue instead of two. It must still never overtake a queued waiter,
    never miss its ring, and go back to the cheap try once it finds the lock free."""
    from brokerlock.adapters.embedded import bells as _bells

    monkeypatch.setattr(_bells, "SAFETY_NET", 600.0)  # only a ring wakes a waiter in time
    holder, queued, armed = (STORES[kind](tmp_path) for _ in range(3))
    # The newcomer's try: one update of the record, one statement in SQLite.
    tries: List[str] = []
    method = "try_acquire" if kind == "file" else "_take_if_free"
    real_try = getattr(type(armed), method)

    def counted(self: Adapter, request: Request, *more: Any) -> Optional[Lease]:
        if self is armed:
            tries.append(request.token)
        return real_try(self, request, *more)  # type: ignore[no-any-return]

    monkeypatch.setattr(type(armed), method, counted)
    seen: Dict[str, bool] = {}
    first_done, go = threading.Event(), threading.Event()
    got: List[Optional[Lease]] = []

    def one(token: str) -> None:
        got.append(armed.acquire(Request.make("job", token, 30.0), 10.0))
        armed.release("job", token)
        seen[token] = armed._bells.armed()

    def thread_body() -> None:
        one("t1")  # finds the lock taken: arms this thread's bell
        first_done.set()
        go.wait(10)
        one("t2")  # armed: queues at once, behind the waiter already queued
        one("t3")  # armed, the lock free: taken in the first look, and disarmed
        one("t4")  # a newcomer's try again

    assert holder.try_acquire(Request.make("job", "h1", 30.0)) is not None
    thread = threading.Thread(target=thread_body, daemon=True)
    thread.start()
    _wait_queued(holder, 1)
    assert holder.release("job", "h1")
    assert first_done.wait(10) and seen["t1"], "a wait that found the lock taken arms the bell"
    assert holder.try_acquire(Request.make("job", "h2", 30.0)) is not None
    first: List[Optional[Lease]] = []
    before = _waiter(queued, "q", 10.0, first)
    _wait_queued(holder, 1)
    go.set()
    _wait_queued(holder, 2)
    assert tries == ["t1"], "the armed thread queued without a newcomer's try"
    assert holder.release("job", "h2")
    before.join(5)
    assert first and first[0] is not None and first[0].token == "q", "FIFO: the queued waiter first"
    assert thread.is_alive(), "the armed thread waits its turn"
    assert queued.release("job", "q")
    thread.join(10)
    assert not thread.is_alive()
    assert [lease.token if lease else None for lease in got] == ["t1", "t2", "t3", "t4"]
    fences = [lease.fence for lease in got if lease is not None]
    assert got[1] is not None and first[0].fence < got[1].fence and fences == sorted(set(fences))
    # (A FIFO or an event needs no set-up per wait: such a bell stays armed.)
    stays = WAKEUP != "inotify"
    assert seen == {"t1": True, "t2": True, "t3": stays, "t4": stays}
    assert tries == (["t1"] if stays else ["t1", "t4"]), "t2 and t3 went straight to the first look"
    assert holder.get("job") is None or holder.get("job").token is None  # type: ignore[union-attr]


def test_a_release_interrupted_before_its_ring_still_wakes_the_waiter(
    kind: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """KeyboardInterrupt lands after the release granted the lock in the store, at the
    first line of the ring: the release runs again (lock.py) and must ring the waiter
    then. Before, the waiter slept until its safety net (4-6 s: the fuzz test saw it)."""
    from brokerlock.adapters.embedded import bells as _bells

    monkeypatch.setattr(_bells, "SAFETY_NET", 600.0)  # only a ring wakes the waiter in time
    monkeypatch.setattr(_bells, "DEATH_NET", 600.0)
    adapter: Any = STORES[kind](tmp_path)
    holder = BrokerLock(adapter).item("job", ttl="30s")
    holder.acquire()
    waiter = BrokerLock(STORES[kind](tmp_path)).item("job", ttl="30s", timeout="20s")
    got: List[Any] = []
    done = threading.Event()

    def wait() -> None:
        got.append(waiter.acquire().fence)
        done.wait(10)
        waiter.release()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    _wait_queued(adapter, 1)
    # The ring's first call raises, as an interrupt at its first line would.
    owner, attribute = adapter._bells, "ring"
    real = getattr(owner, attribute)
    calls: List[int] = []

    def interrupted(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(owner, attribute, interrupted)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        holder.release()
    assert not holder.acquired
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got, "the waiter was never rung"
    assert time.monotonic() - started < 3, "woken by a ring, not a net"
    current = adapter.get("job")
    assert current is not None and current.fence == got[0]
    assert len(calls) == 2, "the ring was made again, once"
    done.set()
    thread.join(5)
    assert adapter.get("job") is None
