"""A blocked waiter burns (almost) no CPU on any back end (issue 17).

The target is 1 ms of CPU per 5 s blocked, measured by ``benchmarks/waiter_cpu.py``.
On a shared CI machine one CPU reading is too noisy to hold a test to that, so this
test holds a 2 s wait to a loose 4 ms (four times the 5 s target, with the cost of
queueing and of taking the lock included): it does not prove the target, it catches
what breaks it by an order of magnitude, a waiter that polls (a wake-up every 10-100 ms
costs tens of ms here). Redis is held to 12 ms: it misses the target (see BOUNDS_MS).
"""

from __future__ import annotations

import threading
import time
from typing import Any, List, Optional

import pytest

from brokerlock import BrokerLock
from brokerlock._platform import HAVE_INOTIFY

BLOCKED = 2.0
BOUND_MS = 4.0
#: Redis waiters still watch the one ahead of them from 2 ms, doubling to 0.5 s (how a
#: queue recovers from deaths there; see docs/frugality.rst): about 12 looks in 2 s.
BOUNDS_MS = {"redis": 12.0}


def _wait_once(make_store: Any, name: str, hold: float) -> Optional[float]:
    """A thread blocks on ``name`` while another holds it for ``hold`` s; the waiter's
    own CPU time (ms) or ``None`` if it did not get the lock after the release."""
    holder = BrokerLock(make_store())
    waiter = BrokerLock(make_store())
    held, released = threading.Event(), threading.Event()
    got: List[float] = []

    def hold_it() -> None:
        item = holder.item(name, ttl=60)
        item.acquire()
        held.set()
        time.sleep(hold)
        released.set()
        item.release()

    def wait() -> None:
        item = waiter.item(name, ttl=60, timeout=30)
        t0 = time.thread_time()
        item.acquire()
        cpu = time.thread_time() - t0
        if released.is_set():
            got.append(cpu * 1e3)
        item.release()

    holding = threading.Thread(target=hold_it)
    holding.start()
    assert held.wait(30)
    waiting = threading.Thread(target=wait)
    waiting.start()
    holding.join(60)
    waiting.join(60)
    holder.close()
    waiter.close()
    return got[0] if got else None


def test_a_blocked_waiter_burns_almost_no_cpu(make_store: Any, request: pytest.FixtureRequest) -> None:
    kind = request.node.callspec.params["make_store"]
    if kind in ("sqlite", "file") and not HAVE_INOTIFY:
        pytest.skip("no inotify here: embedded-store waiters poll with backoff (documented)")
    # A first, short wait of the same kind pays the one-time costs (a bell, inotify's
    # ctypes, a listening session, a presence connection), as a long-running program
    # pays them once; the figure is about waiting, not starting.
    warm = _wait_once(make_store, "warm", 0.2)
    assert warm is not None, "the warm-up waiter did not get the released lock"
    bound = BOUNDS_MS.get(kind, BOUND_MS)
    for attempt in range(2):  # one retry: a burst of load on a shared machine
        cpu = _wait_once(make_store, f"job{attempt}", BLOCKED)
        assert cpu is not None, "the waiter got the lock while it was held"
        if cpu <= bound:
            return
    pytest.fail(f"a waiter blocked {BLOCKED} s on {kind} burnt {cpu:.2f} ms of CPU (bound {bound} ms)")
