"""Run in a real subprocess by the multi-process tests: ``python worker.py MODE URL NAME ...``."""

from __future__ import annotations

import os
import sys
import time

from brokerlock import BrokerLock


def increment(url: str, name: str, count: str, counter: str) -> None:
    """Read-modify-write a counter file ``count`` times under the lock.

    The read and the write are separated by a yield, so without mutual exclusion
    increments would be lost and the total would come out short.
    """
    item = BrokerLock.from_url(url).item(name, ttl="30s", timeout="60s")
    for _ in range(int(count)):
        with item.hold():
            with open(counter) as f:
                value = int(f.read() or 0)
            time.sleep(0)
            with open(counter, "w") as f:
                f.write(str(value + 1))


def churn(url: str, name: str, count: str) -> None:
    """Take and release the lock ``count`` times, nothing held in between, with the
    waiters' safety net out of the way: a wake-up that a release loses then leaves its
    waiter asleep until its timeout (LockTimeout, exit 1) instead of for a second."""
    from brokerlock.adapters.embedded import bells as _bells

    _bells.SAFETY_NET = _bells.DEATH_NET = 600.0
    item = BrokerLock.from_url(url).item(name, ttl="60s", timeout="20s")
    for _ in range(int(count)):
        item.acquire()
        item.release()


def hold(url: str, name: str, ttl: str, ready: str) -> None:
    """Take the lock, say so by creating ``ready``, then wait to be killed."""
    item = BrokerLock.from_url(url).item(name, ttl=ttl, timeout="10s")
    item.acquire()
    with open(ready, "w") as f:
        f.write(str(item.fence))
    time.sleep(600)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"increment": increment, "hold": hold, "churn": churn}[mode](*args)
    sys.stdout.flush()
    os._exit(0)
