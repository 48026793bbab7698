"""Never a lease without an owner: each window of acquire and release, forced open.

An interrupt (a ``BaseException`` raised by a hook) is injected at each place where
the store has done its part and the thread has not yet done its own, on every back
end: right after the grant, at the hand-over to the thread, at the start and the end
of the store's release, and in the waiter's queue steps (also after the lock was handed
to the waiter in the store). Afterwards the lease is either the thread's (and its
``release()`` frees it) or free in the store, with no queue place of ours left: a third
client takes the lock at once.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any, Callable, List, Optional

import pytest
from stores import StoreFactory

from brokerlock import Adapter, BrokerLock, BrokerLockError, MemoryAdapter, SQLiteAdapter
from brokerlock.adapters import inflight
from brokerlock.adapters.base import Waiter


class Interrupt(BaseException):
    """What a signal handler might raise: not an Exception, so nothing swallows it."""


def assert_free(make_store: StoreFactory, name: str) -> None:
    """Free in the store, and no queue place of anybody's ahead of a newcomer."""
    third = BrokerLock(make_store()).item(name, ttl="10s", timeout=0)
    assert third.try_acquire() is third, f"{name!r} is not free: {third._adapter.get(name)}"
    third.release()


def test_interrupt_right_after_the_grant(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    item = BrokerLock(make_store()).item("grant", ttl="30s", timeout="5s")
    granted = inflight.Acquisition.granted

    def grant_then_interrupt(self: inflight.Acquisition, lease: Any) -> None:
        granted(self, lease)
        raise Interrupt

    for attempt in (item.acquire, item.try_acquire):
        with monkeypatch.context() as patch:
            patch.setattr(inflight.Acquisition, "granted", grant_then_interrupt)
            with pytest.raises(Interrupt):
                attempt()
        assert not item.acquired and item.fence is None
        assert_free(make_store, "grant")
    with item.hold():  # the item is usable again
        assert item.acquired


def test_interrupt_at_the_hand_over_to_the_thread(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread has recorded its hold, but acquire() has not returned: its caller
    never got the item, so the hold is given back."""
    item = BrokerLock(make_store()).item("owned", ttl="30s", keepalive=True)
    owned = inflight.Acquisition.owned

    def own_then_interrupt(self: inflight.Acquisition) -> None:
        owned(self)
        raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(inflight.Acquisition, "owned", own_then_interrupt)
        with pytest.raises(Interrupt):
            item.acquire()
    assert not item.acquired
    assert_free(make_store, "owned")
    item.acquire()  # nothing of the given-back hold is left in the thread either
    item.release()


@pytest.mark.parametrize("form", ["hold", "item"])
def test_interrupt_after_acquire_made_the_hold_and_before_the_block(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """CPython 3.9 and 3.10 raise a pending interrupt at almost any instruction: also in
    acquire() after the hold became the thread's. A with statement whose __enter__
    raised never calls __exit__, so __enter__ gives the hold back itself. (A bare
    acquire() leaves it with the thread, as the ownership contract says.)"""
    from brokerlock.lock import BrokerLockItem

    item = BrokerLock(make_store()).item("entered", ttl="30s", timeout="5s")
    attempt = BrokerLockItem._attempt

    def attempt_then_interrupt(self: BrokerLockItem, *args: Any) -> bool:
        assert attempt(self, *args)
        raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(BrokerLockItem, "_attempt", attempt_then_interrupt)
        with pytest.raises(Interrupt):
            with item.hold() if form == "hold" else item:
                raise AssertionError("the block must not run")
        assert not item.acquired
    assert_free(make_store, "entered")
    with monkeypatch.context() as patch:
        patch.setattr(BrokerLockItem, "_attempt", attempt_then_interrupt)
        with pytest.raises(Interrupt):
            item.acquire()
    assert item.acquired  # the thread's, and its release() frees it
    item.release()
    assert_free(make_store, "entered")


def test_interrupt_inside_the_cleanup_is_finished_by_the_next_call(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupts that keep landing in the cleanup itself: the acquisition stays
    pending, and the thread's next call on the item finishes it."""
    item = BrokerLock(make_store()).item("pending", ttl="30s")
    granted = inflight.Acquisition.granted
    abandon = inflight.Acquisition.abandon

    def grant_then_interrupt(self: inflight.Acquisition, lease: Any) -> None:
        granted(self, lease)
        raise Interrupt

    monkeypatch.setattr(inflight.Acquisition, "granted", grant_then_interrupt)
    monkeypatch.setattr(inflight, "CLEANUP_TRIES", 0)  # every try of the cleanup cut short
    with pytest.raises(Interrupt):
        item.acquire()
    assert not item.acquired
    assert item._local.pending.state is inflight.State.GRANTED
    assert BrokerLock(make_store()).item("pending").is_reserved()  # granted, not yet given back
    monkeypatch.undo()
    assert inflight.Acquisition.abandon is abandon
    item.release()  # the next call on the item finishes the cleanup
    assert item._local.pending is None
    assert_free(make_store, "pending")


@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupt_in_the_store_release(make_store: StoreFactory, when: str) -> None:
    """Before the store's release ran (at its start) or after (before it returned):
    the release is finished before the interrupt propagates, and the hold is over."""
    adapter = make_store()
    item = BrokerLock(adapter).item("release", ttl="30s")
    item.acquire()
    release = adapter.release
    calls: List[str] = []

    def interrupted(name: str, token: str) -> bool:
        calls.append(token)
        if len(calls) > 1:
            return release(name, token)  # the retry of the cleanup
        if when == "after":
            release(name, token)
        raise Interrupt

    adapter.release = interrupted  # type: ignore[method-assign]
    with pytest.raises(Interrupt):
        item.release()
    assert len(calls) == 2
    assert not item.acquired and not item.lost
    assert_free(make_store, "release")
    item.release()  # a no-op now


def test_release_interrupted_again_and_again_can_be_called_again(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_store()
    item = BrokerLock(adapter).item("again", ttl="30s")
    item.acquire()
    release = adapter.release
    monkeypatch.setattr(adapter, "release", lambda name, token: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        item.release()
    assert item.acquired, "not released in the store: the thread must keep the hold"
    monkeypatch.setattr(adapter, "release", release)
    item.release()  # no LockLost: the lease was intact
    assert not item.acquired
    assert_free(make_store, "again")


def _interrupt_waits(monkeypatch: pytest.MonkeyPatch, before: Callable[[], None]) -> None:
    """Patch the back end's wait primitive so that the first wait of a queued waiter
    runs ``before()`` and then raises ``Interrupt``."""
    fired = threading.Event()

    def fire() -> None:
        if not fired.is_set():
            fired.set()
            before()
            raise Interrupt

    from brokerlock.adapters import memory
    from brokerlock.adapters.embedded import bells

    class InterruptingWaiter(Waiter):
        def wait(self, timeout: Optional[float]) -> None:
            fire()
            time.sleep(min(timeout or 0.01, 0.01))

    class Cond:
        def __init__(self, mutex: Any) -> None:
            self.cond = threading.Condition(mutex)

        def wait(self, timeout: Optional[float]) -> bool:
            fire()
            return self.cond.wait(timeout)

        def notify(self) -> None:
            self.cond.notify()

    class MemoryWaiter:
        def __init__(self, mutex: Any) -> None:
            self.cond = Cond(mutex)

    monkeypatch.setattr(memory, "_Waiter", MemoryWaiter)
    monkeypatch.setattr(bells.Bells, "waiter", lambda self, bell: InterruptingWaiter())
    monkeypatch.setattr(Adapter, "waiter", lambda self, name: InterruptingWaiter())
    try:
        from brokerlock.adapters.redis.adapter import RedisAdapter

        block = RedisAdapter._pop  # the waiter's blocking step (BLPOP)

        def redis_block(self: Any, *args: Any) -> Any:
            fire()
            return block(self, *args)

        monkeypatch.setattr(RedisAdapter, "_pop", redis_block)
    except ImportError:
        pass
    try:
        from brokerlock.adapters.postgres.listen import Listener

        listen = Listener.wait

        def pg_wait(self: Any, *args: Any) -> Any:
            fire()
            return listen(self, *args)

        monkeypatch.setattr(Listener, "wait", pg_wait)
    except ImportError:
        pass


@pytest.mark.parametrize("granted", [False, True], ids=["queued", "handed-over"])
def test_interrupt_in_the_queue(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch, granted: bool
) -> None:
    """A waiter interrupted in its queue, while the lock is still held or just after
    the holder's release handed it the lock in the store: its place and any lease it
    was handed go on to the next; nobody waits for it."""
    holder = BrokerLock(make_store()).item("queue", ttl="30s")
    holder.acquire()
    assert holder.lease is not None
    token = holder.lease.token
    waiter = BrokerLock(make_store()).item("queue", ttl="30s", timeout="10s")

    def release() -> None:
        # The holder's release, by the store, from another thread (this one is the
        # waiter's). The memory store's waiter holds the store's mutex here, and that
        # store hands nothing over: its release runs once the waiter is gone.
        thread = threading.Thread(target=lambda: holder._adapter.release("queue", token))
        releases.append(thread)
        thread.start()
        if not isinstance(holder._adapter, MemoryAdapter):
            thread.join()

    releases: List[threading.Thread] = []

    _interrupt_waits(monkeypatch, release if granted else lambda: None)
    outcome: List[BaseException] = []

    def wait() -> None:
        try:
            waiter.acquire()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Interrupt), outcome
    for release_thread in releases:
        release_thread.join()
    assert len(releases) == granted
    monkeypatch.undo()
    if not granted:
        holder.release()
    started = time.monotonic()
    assert_free(make_store, "queue")
    assert time.monotonic() - started < 2


def _hold_in_a_thread(item: Any, name: str) -> threading.Thread:
    thread = threading.Thread(target=item.acquire, name=name)
    thread.start()
    thread.join()
    return thread


def test_a_dead_threads_kept_alive_hold_ends_by_its_ttl(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    item = BrokerLock(make_store()).item("orphan", ttl="1s", keepalive=True)
    other = BrokerLock(make_store()).item("orphan", timeout=0)
    caplog.set_level(logging.WARNING, logger="brokerlock")
    started = time.monotonic()
    _hold_in_a_thread(item, "short-lived")
    fence = BrokerLock(make_store()).adapter.get("orphan").fence  # type: ignore[union-attr]
    while other.try_acquire() is None:
        assert time.monotonic() - started < 2.0, "the dead thread's lease was kept alive"
        time.sleep(0.02)
    other.release()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "'orphan'" in m and f"fence {fence}" in m and "short-lived" in m and "ended" in m for m in warnings
    ), warnings


def test_a_dropped_items_kept_alive_hold_ends_by_its_ttl(caplog: pytest.LogCaptureFixture) -> None:
    lock = BrokerLock(MemoryAdapter())
    caplog.set_level(logging.WARNING, logger="brokerlock")
    item = lock.item("dropped", ttl="600ms", keepalive=True)
    item.acquire()
    fence = item.fence
    del item
    gc.collect()
    started = time.monotonic()
    while lock.adapter.get("dropped") is not None:
        assert time.monotonic() - started < 1.6, "a dropped item's lease was kept alive"
        time.sleep(0.02)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'dropped'" in m and f"fence {fence}" in m and "item was dropped" in m for m in messages)


@pytest.mark.parametrize("timeout", [None, "30s"])
def test_same_thread_two_items_one_name_raises_at_once(
    make_store: StoreFactory, timeout: Optional[str]
) -> None:
    first = BrokerLock(make_store()).item("self", ttl="1m")
    first.acquire()
    for second in (
        BrokerLock(first._adapter).item("self", timeout=timeout),  # the same adapter
        BrokerLock(make_store()).item("self", timeout=timeout),  # another client, same store
    ):
        started = time.monotonic()
        with pytest.raises(BrokerLockError, match=r"'self'.*this thread") as info:
            second.acquire()
        assert time.monotonic() - started < 1
        assert "LockTimeout" not in type(info.value).__name__
        assert second.try_acquire() is None  # one attempt is no wait: just taken
    first.release()
    assert BrokerLock(make_store()).item("self", timeout=timeout).acquire().acquired


def test_two_sqlite_adapters_on_one_file_are_one_store(tmp_path: Any) -> None:
    (tmp_path / "sub").mkdir()
    first = SQLiteAdapter(tmp_path / "one.db")
    second = SQLiteAdapter(str(tmp_path / "sub" / ".." / "one.db"))
    assert first.store_id == second.store_id
    assert SQLiteAdapter(tmp_path / "two.db").store_id != first.store_id
