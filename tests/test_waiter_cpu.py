"""A blocked waiter burns (almost) no CPU on any back end (issue 17).

The target is 1 ms of CPU per 5 s blocked, measured by ``benchmarks/waiter_cpu.py``.
On a shared CI machine one CPU reading is too noisy to hold a test to that, so this
test holds a 2 s wait to a loose 4 ms (four times the 5 s target, with the cost of
queueing and of taking the lock included): it does not prove the target, it catches
what breaks it by an order of magnitude, a waiter that polls (a wake-up every 10-100 ms
costs tens of ms here). A waiter that looks at the store every second costs less than
the bound in 2 s, so on the server back ends, where each look is a round trip, the
test also counts the looks: at most LOOKS in a 2 s wait (see docs/frugality.rst).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional

import pytest

from brokerlock import BrokerLock
from brokerlock._platform import WAKEUP

BLOCKED = 2.0
BOUND_MS = 4.0
#: Looks (scripts, statements that take or renew a place in the queue) a server-store
#: waiter may make in a BLOCKED wait; the safety net of both is 5 s. Redis: the one that
#: queues it, and one to spare. PostgreSQL, exactly: a first try without queueing (the
#: name is not known as contended), the one that queues, one early look. The old
#: waiters made 10 (Redis) and 4; a look every second would make 3 and 5.
LOOKS = {"redis": 2, "postgres": 3}


def _wait_once(
    make_store: Any, name: str, hold: float, looks: Optional[Dict[str, int]] = None
) -> Optional[float]:
    """A thread blocks on ``name`` while another holds it for ``hold`` s; the waiter's
    own CPU time (ms) or ``None`` if it did not get the lock after the release. With
    ``looks``, a server store's waiter counts its looks there (``looks["n"]``)."""
    holder = BrokerLock(make_store())
    waiter = BrokerLock(make_store())
    if looks is not None:
        # Counted on the real server's adapter: each call is one round trip.
        adapter: Any = waiter.adapter
        look = adapter._try

        def counted(*args: Any) -> Any:
            looks["n"] = looks.get("n", 0) + 1
            return look(*args)

        adapter._try = counted
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
    if kind in ("sqlite", "file") and WAKEUP is None:
        pytest.skip(
            "no push wake-ups here (BROKERLOCK_PORTABLE=1): embedded-store waiters poll "
            "(docs/frugality.rst)"
        )
    # A first, short wait of the same kind pays the one-time costs (a bell, inotify's
    # ctypes, a listening session, a presence connection), as a long-running program
    # pays them once; the figure is about waiting, not starting.
    warm = _wait_once(make_store, "warm", 0.2)
    assert warm is not None, "the warm-up waiter did not get the released lock"
    for attempt in range(2):  # one retry: a burst of load on a shared machine
        looks: Dict[str, int] = {}
        cpu = _wait_once(make_store, f"job{attempt}", BLOCKED, looks if kind in LOOKS else None)
        assert cpu is not None, "the waiter got the lock while it was held"
        if kind in LOOKS:
            # Counting is exact, load or not: no retry for it.
            assert 1 <= looks["n"] <= LOOKS[kind], f"{looks['n']} looks in {BLOCKED} s on {kind}"
        if cpu <= BOUND_MS:
            return
    pytest.fail(f"a waiter blocked {BLOCKED} s on {kind} burnt {cpu:.2f} ms of CPU (bound {BOUND_MS} ms)")
