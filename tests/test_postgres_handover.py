"""PostgreSQL's direct hand-over: a release gives the lock to the head of the queue.

What must hold whatever the timing: a waiter handed the lock as it gives up either
keeps it or passes it on, a waiter handed the lock and then killed does not strand it,
the queue is served in order, fences keep growing. Real server, nothing mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from brokerlock import BrokerLock, PostgresAdapter
from brokerlock.adapters.base import Lease, Request
from brokerlock.adapters.postgres import adapter as postgres
from brokerlock.adapters.postgres.listen import Listener

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


@pytest.fixture
def dsn(postgres_server: Any) -> str:
    return f"{postgres_server.dsn}?table=h_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def adapter(dsn: str) -> Iterator[PostgresAdapter]:
    store = PostgresAdapter(dsn)
    yield store
    store.close()


def _queue(adapter: PostgresAdapter, name: str) -> Tuple[Request, str]:
    """A waiter that has taken its place in the queue and does not wait (yet)."""
    request = Request.make(name, uuid.uuid4().hex, 30.0)
    member = adapter._listeners.mine().member(request.token)
    lease, _left, arrival, _offset = adapter._try(request, None, member)
    assert lease is None and arrival is not None
    return request, member


def test_release_hands_the_lock_to_the_head(adapter: PostgresAdapter) -> None:
    holder = Request.make("job", uuid.uuid4().hex, 30.0)
    first = adapter.try_acquire(holder)
    assert first is not None
    waiter, member = _queue(adapter, "job")
    assert adapter.release("job", holder.token)
    # Nobody can slip in between: the row already names the waiter.
    assert adapter.try_acquire(Request.make("job", uuid.uuid4().hex, 30.0)) is None
    lease = adapter.get("job")
    assert lease is not None and lease.token == waiter.token and lease.fence > first.fence
    payload = adapter._listeners.mine().wait(member, 5.0)
    assert payload is not None and payload.startswith(member + "|")
    granted = adapter._granted(waiter, payload)
    assert granted.fence == lease.fence and granted.expires_at == pytest.approx(lease.expires_at)
    assert adapter.release("job", waiter.token)
    assert adapter.get("job") is None


def test_waiter_timing_out_as_the_lock_is_handed_to_it_keeps_it(adapter: PostgresAdapter) -> None:
    holder = Request.make("job", uuid.uuid4().hex, 30.0)
    assert adapter.try_acquire(holder) is not None
    waiter, member = _queue(adapter, "job")
    assert adapter.release("job", holder.token)  # hands over...
    lease = adapter._leave(waiter, member, keep=True)  # ...as the waiter gives up
    assert lease is not None and lease.token == waiter.token
    assert adapter.release("job", waiter.token), "the waiter held an intact lease"


def test_interrupted_waiter_passes_a_handed_lock_on(adapter: PostgresAdapter) -> None:
    holder = Request.make("job", uuid.uuid4().hex, 30.0)
    assert adapter.try_acquire(holder) is not None
    waiter, member = _queue(adapter, "job")
    behind, behind_member = _queue(adapter, "job")
    assert adapter.release("job", holder.token)
    assert adapter._leave(waiter, member, keep=False) is None
    lease = adapter.get("job")
    assert lease is not None and lease.token == behind.token, "passed on to the next in line"
    assert adapter._leave(behind, behind_member, keep=False) is None
    assert adapter.get("job") is None


def test_waiter_leaving_its_place_is_not_handed_the_lock(adapter: PostgresAdapter) -> None:
    holder = Request.make("job", uuid.uuid4().hex, 30.0)
    assert adapter.try_acquire(holder) is not None
    waiter, member = _queue(adapter, "job")
    assert adapter._leave(waiter, member, keep=True) is None
    assert adapter.release("job", holder.token)
    assert adapter.get("job") is None, "nobody waits: the lock is free"


def test_timeouts_racing_hand_overs_never_strand_the_lock(dsn: str) -> None:
    """Waiters with timeouts as short as a hand-over: whoever is handed the lock as it
    gives up keeps it or passes it on, so the lock never sits with nobody in it."""
    stop = time.monotonic() + 3.0
    errors: List[BaseException] = []

    def worker(timeout: float) -> None:
        item = BrokerLock(PostgresAdapter(dsn)).item("race", ttl="30s", timeout=timeout)
        try:
            while time.monotonic() < stop:
                if item.try_acquire() is not None or _acquired(item):
                    item.release()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0.001, 0.002, 0.003, 0.005)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    # Left to itself, the lock is free within moments: nothing was stranded.
    probe = BrokerLock(PostgresAdapter(dsn)).item("race", ttl="30s", timeout="2s")
    probe.acquire()
    probe.release()


def _acquired(item: Any) -> bool:
    from brokerlock import LockTimeout

    try:
        item.acquire()
    except LockTimeout:
        return False
    return True


WAITER = """
    import sys, time
    from brokerlock import BrokerLock
    url, ready = sys.argv[1:]
    item = BrokerLock.from_url(url).item("job", ttl="60s", timeout="60s")
    open(ready, "w").write("parked")
    item.acquire()
    time.sleep(600)
"""


def test_waiter_killed_after_the_hand_over_does_not_strand_the_lock(dsn: str, tmp_path: Path) -> None:
    lock = BrokerLock(PostgresAdapter(dsn))
    holder = lock.item("job", ttl="60s")
    holder.acquire()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WAITER), dsn, str(ready)], env=ENV)
    try:
        while not ready.exists() or not _queued(lock, "job", 1):
            assert proc.poll() is None
            time.sleep(0.01)
        behind = BrokerLock(PostgresAdapter(dsn)).item("job", ttl="60s", timeout="10s")
        result: List[float] = []

        def wait_behind() -> None:
            behind.acquire()
            result.extend([time.monotonic(), behind.fence or 0])
            behind.release()

        thread = threading.Thread(target=wait_behind)
        thread.start()
        while not _queued(lock, "job", 2):
            time.sleep(0.01)
        # Stopped, it cannot learn of the hand-over; killed, it never will.
        proc.send_signal(signal.SIGSTOP)
        fence = holder.fence
        holder.release()
        lease = lock.adapter.get("job")
        assert lease is not None and lease.pid == proc.pid, "handed to the first waiter"
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        thread.join(10)
        assert result, "the next waiter never got the lock"
        # Nothing notifies of a death: the waiter behind looks again within a second.
        assert result[0] - killed < 2.0
        assert fence is not None and result[1] > lease.fence > fence
    finally:
        proc.kill()
        proc.wait()


def _queued(lock: BrokerLock, name: str, count: int) -> bool:
    adapter = lock.adapter
    assert isinstance(adapter, PostgresAdapter)
    queue = adapter._ident.as_string(None)[:-1] + '_queue"'
    row = adapter._run("count", lambda c: c.execute(
        f"SELECT count(*) FROM {queue} WHERE name = %s", (name,)).fetchone())
    return row is not None and row[0] >= count


def test_queue_table_of_an_older_version_gets_the_new_columns(postgres_server: Any) -> None:
    import psycopg

    table = f"old_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{table}" (name text PRIMARY KEY, token text, fence bigint NOT NULL, '
                     "acquired_at timestamptz, expires_at timestamptz, host text, pid integer, "
                     "thread text, holder bigint)")
        conn.execute(f'CREATE TABLE "{table}_queue" (token text PRIMARY KEY, name text NOT NULL, '
                     "arrival timestamptz NOT NULL, holder bigint NOT NULL, "
                     "deadline timestamptz NOT NULL, UNIQUE (name, arrival, token))")
    lock = BrokerLock(PostgresAdapter(postgres_server.dsn, table=table))
    holder = lock.item("job", ttl="30s")
    holder.acquire()
    waiter = BrokerLock(PostgresAdapter(postgres_server.dsn, table=table)).item("job", timeout="10s")
    got: List[int] = []
    thread = threading.Thread(
        target=lambda: (waiter.acquire(), got.append(waiter.fence or 0), waiter.release())
    )
    thread.start()
    while not _queued(lock, "job", 1):
        time.sleep(0.01)
    holder.release()
    thread.join(10)
    assert got and got[0] > 0


def test_a_name_found_held_queues_at_once_next_time(adapter: PostgresAdapter) -> None:
    holder = Request.make("job", uuid.uuid4().hex, 30.0)
    assert adapter.try_acquire(holder) is not None
    waiter = Request.make("job", uuid.uuid4().hex, 30.0)
    assert adapter.acquire(waiter, 0.05) is None  # tried, then queued, then timed out
    assert "job" in adapter._contended
    assert adapter.release("job", holder.token)
    lease = adapter.acquire(Request.make("job", uuid.uuid4().hex, 30.0), 1.0)
    assert lease is not None, "queued at once, and the lock was free"
    assert "job" not in adapter._contended, "found free: the cheaper attempt comes first again"
    assert adapter.release("job", lease.token)


def _queue_length(adapter: PostgresAdapter, name: str) -> int:
    queue = adapter._ident.as_string(None)[:-1] + '_queue"'
    row = adapter._run("count", lambda c: c.execute(
        f"SELECT count(*) FROM {queue} WHERE name = %s", (name,)).fetchone())
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("case", ["intact", "ran-out", "ran-out-and-taken"])
def test_a_grant_read_after_its_lease_ran_out_is_not_taken(
    adapter: PostgresAdapter, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A waiter stopped between the NOTIFY and its reading of it (here: its monotonic
    clock jumps 100 s, as if it had been stopped that long) must not walk in with a
    lease that already ran out, while somebody else may hold the lock: it goes on as a
    waiter. A grant read in time is still returned as it is, with no round trip."""
    late = {"by": 0.0}
    parked, resume = threading.Event(), threading.Event()
    real, wait = postgres._ticks, Listener.wait

    def ticks() -> float:
        if threading.current_thread().name != "late-reader":
            return real()
        if late["by"]:
            resume.wait(10)  # stopped here, just after reading the grant
        return real() + late["by"]

    def listen(listener: Listener, member: str, timeout: float) -> Optional[str]:
        if threading.current_thread().name == "late-reader":
            parked.set()
        return wait(listener, member, timeout)

    monkeypatch.setattr(postgres, "_ticks", ticks)
    monkeypatch.setattr(Listener, "wait", listen)
    # Only a NOTIFY wakes the waiter: no look of its own finds the lock first.
    monkeypatch.setattr(postgres, "FIRST_LOOK", 60.0)
    monkeypatch.setattr(postgres, "RECHECK", 60.0)
    grants: List[Lease] = []

    def granted(request: Request, payload: str) -> Lease:
        grants.append(PostgresAdapter._granted(request, payload))
        return grants[-1]

    monkeypatch.setattr(adapter, "_granted", granted)
    holder = Request.make("job", uuid.uuid4().hex, 30.0)
    assert adapter.try_acquire(holder) is not None
    adapter._contended.add("job")  # the waiter queues with its first statement
    request = Request.make("job", uuid.uuid4().hex, 30.0)
    got: List[Optional[Lease]] = []
    thread = threading.Thread(
        target=lambda: got.append(adapter.acquire(request, 20.0)), name="late-reader", daemon=True
    )
    thread.start()
    assert parked.wait(10) and _queue_length(adapter, "job") == 1
    late["by"] = 0.0 if case == "intact" else 100.0
    assert adapter.release("job", holder.token)  # grants the waiter a lease for 30 s
    handed = adapter.get("job")
    assert handed is not None and handed.token == request.token
    assert _queue_length(adapter, "job") == 0, "the grant took the waiter's place"
    other = Request.make("job", uuid.uuid4().hex, 30.0)
    if case == "ran-out-and-taken":
        # While the waiter is stopped, its lease ends (forced here) and another takes it.
        assert adapter.force_release("job")
        assert adapter.try_acquire(other) is not None
    resume.set()
    if case == "ran-out-and-taken":
        deadline = time.monotonic() + 10
        while _queue_length(adapter, "job") < 1:  # the waiter queued again
            assert time.monotonic() < deadline and not got, got
            time.sleep(0.01)
        assert adapter.release("job", other.token)  # hands it to the waiter, in time
    thread.join(10)
    assert got and got[0] is not None and got[0].token == request.token
    lease = got[0]
    assert grants and grants[0].fence == handed.fence, "the waiter read the grant"
    if case == "intact":
        assert lease.fence == handed.fence and len(grants) == 1
    else:
        # Not the grant it read late, but a lease taken (or handed over) anew.
        assert lease.fence > handed.fence and lease.expires_at is not None
        assert handed.expires_at is not None and lease.expires_at > handed.expires_at
        assert len(grants) == (2 if case == "ran-out-and-taken" else 1)
    current = adapter.get("job")
    assert current is not None and current.fence == lease.fence
    assert _queue_length(adapter, "job") == 0, "nothing left behind in the queue"
    assert adapter.release("job", request.token), "the waiter held an intact lease"
