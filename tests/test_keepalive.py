"""Leases that stay honest: keepalive, loss detection, remaining(), the decorator, logs."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, List, Optional

import pytest

from brokerlock import Adapter, BrokerLock, BrokerLockError, BrokerLockItem, Lease, LockLost, LockTimeout
from brokerlock.adapters.base import Request, Waiter


class Proxy(Adapter):
    """Wraps a real store so a test can make ``extend`` fail or block on cue."""

    def __init__(self, inner: Adapter) -> None:
        self.inner = inner
        self.url = inner.url
        self.failures = 0
        self.extends = 0
        self.gate: Optional[threading.Event] = None
        self.blocked = threading.Event()

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        self.extends += 1
        if self.gate is not None:
            self.blocked.set()
            self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise BrokerLockError(f"{self.url}: injected store failure")
        return self.inner.extend(name, token, ttl)

    def try_acquire(self, request: Request) -> Optional[Lease]:
        return self.inner.try_acquire(request)

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        return self.inner.acquire(request, timeout)

    def release(self, name: str, token: str) -> bool:
        return self.inner.release(name, token)

    def get(self, name: str) -> Optional[Lease]:
        return self.inner.get(name)

    def list(self) -> List[Lease]:
        return self.inner.list()

    def force_release(self, name: str) -> bool:
        return self.inner.force_release(name)

    def waiter(self, name: str) -> Waiter:
        return self.inner.waiter(name)

    def now(self) -> float:
        return self.inner.now()


def renewer_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "brokerlock-renewer")


def wait_until(condition: Callable[[], Any], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_keepalive_holds_for_three_ttls_while_contender_times_out(make_store) -> None:  # type: ignore[no-untyped-def]
    item = BrokerLock(make_store()).item("long-job", ttl="300ms", keepalive=True)
    contender = BrokerLock(make_store()).item("long-job", timeout="1s")
    with item.hold():
        started = time.monotonic()
        outcome: list = []  # type: ignore[type-arg]

        def contend() -> None:  # another thread: this one would wait for itself
            try:
                contender.acquire()  # 1 s = 3.3 ttls, the lease must outlive it
            except LockTimeout as exc:
                outcome.append(exc)

        thread = threading.Thread(target=contend)
        thread.start()
        thread.join()
        assert outcome and isinstance(outcome[0], LockTimeout)
        assert time.monotonic() - started >= 0.9
        assert item.acquired and not item.lost
        assert item.remaining() is not None and 0 < item.remaining() <= 0.3  # type: ignore[operator]
    assert not item.is_reserved()


def test_hold_overrides_item_keepalive(make_store) -> None:  # type: ignore[no-untyped-def]
    item = BrokerLock(make_store()).item("override", ttl="200ms", keepalive=False)
    with item.hold(keepalive=True):
        time.sleep(0.5)
    with pytest.raises(LockLost):
        with item.hold():
            time.sleep(0.4)


def test_renewal_survives_two_store_errors(tmp_path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    from brokerlock import SQLiteAdapter

    proxy = Proxy(SQLiteAdapter(tmp_path / "l.db"))
    proxy.failures = 2
    item = BrokerLock(proxy).item("flaky", ttl="1.2s", keepalive=True)
    other = BrokerLock(SQLiteAdapter(tmp_path / "l.db")).item("flaky", timeout=0)
    with caplog.at_level(logging.DEBUG, logger="brokerlock"):
        with item.hold():
            wait_until(lambda: proxy.extends >= 4)  # two failures, then renewals that work
            assert not item.lost
            assert other.try_acquire() is None
    failures = [r.levelno for r in caplog.records if "failed, retrying" in r.getMessage()]
    assert failures == [logging.WARNING, logging.DEBUG], "one warning per run of failures"
    recovered = [r for r in caplog.records if "after 2 failed attempts" in r.getMessage()]
    assert len(recovered) == 1 and recovered[0].levelno == logging.INFO
    assert any(r.getMessage().startswith("renewed 'flaky'") for r in caplog.records)


def test_forced_break_is_noticed_by_the_renewer(make_store) -> None:  # type: ignore[no-untyped-def]
    lost: List[BrokerLockItem] = []
    item = BrokerLock(make_store()).item("broken", ttl="300ms", keepalive=True, on_lost=lost.append)
    admin = BrokerLock(make_store())
    with pytest.raises(LockLost):
        with item.hold():
            assert admin.adapter.force_release("broken")
            wait_until(lambda: lost)  # the renewer learns at its next renewal
            assert item.lost and not item.acquired
            assert item.remaining() == 0.0
    assert lost == [item], "on_lost is called exactly once per lost hold"
    assert item.lost, "lost stays true until the thread acquires again"
    with item.hold():
        assert not item.lost


def test_paused_renewer_means_lost_at_end_of_with(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from brokerlock import SQLiteAdapter

    proxy = Proxy(SQLiteAdapter(tmp_path / "l.db"))
    proxy.gate = threading.Event()
    lost: List[BrokerLockItem] = []
    item = BrokerLock(proxy).item("paused", ttl="300ms", keepalive=True, on_lost=lost.append)
    thief = BrokerLock(SQLiteAdapter(tmp_path / "l.db")).item("paused", ttl="10s", timeout="5s")
    with pytest.raises(LockLost):
        with item.hold():
            assert proxy.blocked.wait(5)  # the renewer is stuck inside extend()
            thief.acquire()  # the lease runs out meanwhile and the next waiter takes it
            proxy.gate.set()
            wait_until(lambda: lost)
    assert thief.acquired and thief.fence > 1  # type: ignore[operator]
    assert lost == [item]
    thief.release()


def test_on_lost_that_raises_cannot_kill_the_renewer(tmp_path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    from brokerlock import SQLiteAdapter

    lock = BrokerLock(SQLiteAdapter(tmp_path / "l.db"))

    def explode(item: BrokerLockItem) -> None:
        raise RuntimeError("callback bug")

    doomed = lock.item("doomed", ttl="200ms", keepalive=True, on_lost=explode)
    doomed.acquire()
    lock.adapter.force_release("doomed")
    wait_until(lambda: any("callback of lock 'doomed'" in r.getMessage() for r in caplog.records))
    survivor = lock.item("survivor", ttl="200ms", keepalive=True)
    with survivor.hold():
        time.sleep(0.6)  # three ttls: only a live renewer keeps it
        assert BrokerLock(SQLiteAdapter(tmp_path / "l.db")).item("survivor").try_acquire() is None
    with pytest.raises(LockLost):
        doomed.release()


def test_many_holds_share_one_renewer_thread(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from brokerlock import SQLiteAdapter

    lock = BrokerLock(SQLiteAdapter(tmp_path / "l.db"))
    # (3 s: one renewer commits 200 renewals per round, and SQLite commits under Wine
    # take milliseconds each; 1.5 s left no margin there)
    items = [lock.item(f"n{i}", ttl="3s", keepalive=True) for i in range(200)]
    ready = threading.Barrier(21)
    done = threading.Event()
    errors: List[BaseException] = []

    def hold_ten(chunk: List[BrokerLockItem]) -> None:
        try:
            for item in chunk:
                item.acquire()
            ready.wait()
            done.wait()
            for item in chunk:
                item.release()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=hold_ten, args=(items[i::20],)) for i in range(20)]
    for thread in threads:
        thread.start()
    ready.wait()
    first = {lease.name: lease.expires_at for lease in lock.adapter.list()}
    assert len(first) == 200
    time.sleep(2.0)  # two renewal rounds at ttl/3
    renewed = {lease.name: lease.expires_at for lease in lock.adapter.list()}
    assert renewer_threads() == 1
    done.set()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(renewed) == 200
    assert all(renewed[n] > first[n] for n in first), "every lease was pushed forward"


def test_decorator_runs_each_call_under_the_lock() -> None:
    from brokerlock import MemoryAdapter

    lock = BrokerLock(MemoryAdapter())
    item = lock.item("deco")
    seen: List[Optional[int]] = []

    @item
    def work(x: int) -> int:
        """Doubles."""
        seen.append(item.fence)
        assert item.is_reserved()
        return x * 2

    assert work(2) == 4 and work(3) == 6
    assert seen == [1, 2]
    assert work.__name__ == "work" and work.__doc__ == "Doubles."
    assert not item.is_reserved()


def test_remaining() -> None:
    from brokerlock import MemoryAdapter

    lock = BrokerLock(MemoryAdapter())
    item = lock.item("r", ttl="10s")
    assert item.remaining() is None
    with item.hold():
        left = item.remaining()
        assert left is not None and 9 < left <= 10
    assert item.remaining() is None
    with lock.item("r2", ttl=None).hold() as forever:
        assert forever.remaining() is None


def test_log_records(caplog: pytest.LogCaptureFixture) -> None:
    from brokerlock import MemoryAdapter

    item = BrokerLock(MemoryAdapter()).item("logged", ttl="150ms", keepalive=True)
    with caplog.at_level(logging.DEBUG, logger="brokerlock"):
        with item.hold():
            time.sleep(0.12)
            fence = item.fence
        with pytest.raises(LockLost):
            with item.hold(keepalive=False):
                time.sleep(0.3)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "brokerlock"]
    assert (logging.DEBUG, f"released 'logged' fence {fence}") in messages
    acquired = f"acquired 'logged' fence {fence} after"
    assert any(level == logging.DEBUG and m.startswith(acquired) for level, m in messages)
    assert any(level == logging.DEBUG and m.startswith("renewed 'logged'") for level, m in messages)
    assert any(level == logging.WARNING and m.startswith("lost lock 'logged'") for level, m in messages)


def test_extend_failure_ends_the_hold(make_store) -> None:  # type: ignore[no-untyped-def]
    lost: List[BrokerLockItem] = []
    item = BrokerLock(make_store()).item("ext", ttl="100ms", on_lost=lost.append)
    item.acquire()
    time.sleep(0.25)
    with pytest.raises(LockLost):
        item.extend()
    assert not item.acquired and item.lost and lost == [item]
    item.release()  # the hold is over: nothing left to release
    assert lost == [item]
