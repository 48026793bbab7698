"""Keepalive: one daemon thread per process renews every kept-alive lease.

One thread serves every hold (not one per lock), waking for whichever renewal is due
first on the monotonic clock. Each lease is renewed at a third of its ttl, so two
renewals can fail before it runs out; a failed renewal is retried until the lease
would have expired, and only then is the hold declared lost. Nothing a store or an
``on_lost`` callback raises can kill the thread: a renewer that dies silently leaves
holders that believe they still hold their locks (python-redis-lock's flaw).
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from typing import List, Optional, Protocol, Tuple

from ._log import log

#: Renew when this share of the ttl has passed since the last renewal.
RENEW_AT = 1 / 3
#: The longest pause between two retries of a failed renewal.
MAX_RETRY_DELAY = 1.0


class Hold(Protocol):
    """What the renewer needs of a hold (``lock.Hold`` is the one there is). A protocol
    rather than an import keeps the arrow one way: ``lock`` uses the renewer, the
    renewer knows nothing of ``lock``."""

    @property
    def ttl(self) -> Optional[float]: ...

    @property
    def finished(self) -> bool: ...

    @property
    def name(self) -> str: ...

    def renew(self) -> Optional[float]: ...


class Renewer:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: List[Tuple[float, int, Hold]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def add(self, hold: Hold) -> None:
        assert hold.ttl is not None
        self._schedule(hold, time.monotonic() + hold.ttl * RENEW_AT)

    def _schedule(self, hold: Hold, due: float) -> None:
        with self._cond:
            heapq.heappush(self._queue, (due, next(self._seq), hold))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="brokerlock-renewer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _next(self) -> Hold:
        with self._cond:
            while True:
                # Ended holds are dropped lazily here instead of searched for on release.
                # (No loop with a condition inside the ``with``: see sqlite.pool.take.)
                while True:
                    if not (self._queue and self._queue[0][2].finished):
                        break
                    heapq.heappop(self._queue)
                if not self._queue:
                    self._cond.wait()
                    continue
                due = self._queue[0][0]
                delay = due - time.monotonic()
                if delay <= 0:
                    return heapq.heappop(self._queue)[2]
                self._cond.wait(delay)

    def _run(self) -> None:
        while True:
            hold = self._next()
            try:
                due = hold.renew()
            except BaseException:
                log.exception("renewing lock %r failed unexpectedly", hold.name)
                due = time.monotonic() + MAX_RETRY_DELAY
            if due is not None:
                self._schedule(hold, due)


_renewer: Optional[Renewer] = None
_mutex = threading.Lock()


def renewer() -> Renewer:
    """This process's renewer, started on first use."""
    global _renewer
    with _mutex:
        if _renewer is None:
            _renewer = Renewer()
        return _renewer


def _forget_in_child() -> None:
    # A fork() child has no renewer thread and holds none of its parent's locks; its
    # copy of the mutex may even be locked by a thread that does not exist there.
    global _renewer, _mutex
    _renewer, _mutex = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
