"""The generic wait loop of ``Adapter.acquire``: what a new back end gets before it
has a queue of its own (try, sleep with backoff, bounded by the lease's expiry)."""

from __future__ import annotations

import threading
import time
from typing import List

from brokerlock import Adapter, BrokerLock, LockTimeout, MemoryAdapter


class PlainAdapter(MemoryAdapter):
    """A store that only knows how to try: the base class waits for it."""

    acquire = Adapter.acquire  # type: ignore[assignment]


def test_generic_loop_hands_over_a_released_lock() -> None:
    store = PlainAdapter()
    holder = BrokerLock(store).item("g", ttl="30s")
    holder.acquire()
    waiter = BrokerLock(store).item("g", timeout="10s")
    got: List[float] = []
    thread = threading.Thread(target=lambda: (waiter.acquire(), got.append(time.monotonic())))
    thread.start()
    time.sleep(0.05)
    released = time.monotonic()
    holder.release()
    thread.join(10)
    assert got and got[0] - released < 0.5  # backoff is capped at 100 ms


def test_generic_loop_wakes_at_the_lease_expiry_and_times_out() -> None:
    store = PlainAdapter()
    BrokerLock(store).item("e", ttl="300ms").acquire()
    started = time.monotonic()
    taker = BrokerLock(store).item("e", timeout="5s").acquire()
    assert 0.25 <= time.monotonic() - started < 1.5
    assert taker.fence == 2
    timed_out: List[BaseException] = []

    def wait() -> None:  # another thread: this one holds "e" and would wait for itself
        try:
            BrokerLock(store).item("e", timeout="200ms").acquire()
        except LockTimeout as exc:
            timed_out.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(10)
    assert timed_out
