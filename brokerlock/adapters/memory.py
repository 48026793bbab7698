"""In-process store: a dict and one Condition. Each instance is a private store.

Useful for tests and for threads of one process. Waiters are served first come, first
served: a newcomer never overtakes a thread that is already waiting.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional

from .base import Adapter, Lease, Request


class MemoryAdapter(Adapter):
    """Locks of the threads of one process, in memory; each instance is its own store.

    Fences count from 1 per name and are forgotten with the store. ``clock`` exists for
    tests.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.url = "memory://"
        self._clock = clock
        self._cond = threading.Condition()
        self._leases: Dict[str, Lease] = {}
        # One counter for the whole store rather than one per name: a released name
        # then leaves nothing behind, and its fences still only grow.
        self._fence = 0
        self._queues: Dict[str, Deque[int]] = {}
        self._tickets = itertools.count(1)

    def now(self) -> float:
        return self._clock()

    def _live(self, name: str) -> Optional[Lease]:
        lease = self._leases.get(name)
        if lease is not None and lease.expires_at is not None and lease.expires_at <= self._clock():
            del self._leases[name]
            self._cond.notify_all()
            return None
        return lease

    def _grant(self, request: Request) -> Lease:
        self._fence += 1
        fence = self._fence
        now = self._clock()
        lease = Lease(
            name=request.name, token=request.token, fence=fence, acquired_at=now,
            expires_at=None if request.ttl is None else now + request.ttl,
            host=request.host, pid=request.pid, thread=request.thread,
        )
        self._leases[request.name] = lease
        return lease

    def try_acquire(self, request: Request) -> Optional[Lease]:
        with self._cond:
            if self._live(request.name) is None and not self._queues.get(request.name):
                return self._grant(request)
            return None

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        name = request.name
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            queue = self._queues.setdefault(name, deque())
            ticket = next(self._tickets)
            queue.append(ticket)
            try:
                while True:
                    lease = self._live(name)
                    if lease is None and queue[0] == ticket:
                        return self._grant(request)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    # Look again at least every few seconds: the expiry was computed from the
                    # wall clock, and a clock stepped back and corrected must not park us for
                    # the size of the step. (Every release notifies, so this is only a net.)
                    bound = 4.0
                    if lease is not None and lease.expires_at is not None:
                        bound = min(bound, max(0.0, lease.expires_at - self._clock()) + 0.0005)
                    self._cond.wait(bound if remaining is None else min(remaining, bound))
            finally:
                queue.remove(ticket)
                if not queue:
                    del self._queues[name]
                self._cond.notify_all()

    def release(self, name: str, token: str) -> bool:
        with self._cond:
            lease = self._leases.get(name)
            if lease is None or lease.token != token:
                return False
            del self._leases[name]
            self._cond.notify_all()
            return lease.expires_at is None or lease.expires_at > self._clock()

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        with self._cond:
            lease = self._live(name)
            if lease is None or lease.token != token:
                return None
            expires = None if ttl is None else self._clock() + ttl
            lease = lease._replace(expires_at=expires)
            self._leases[name] = lease
            return lease

    def get(self, name: str) -> Optional[Lease]:
        with self._cond:
            return self._live(name)

    def list(self) -> List[Lease]:
        with self._cond:
            return [lease for name in list(self._leases) if (lease := self._live(name)) is not None]

    def force_release(self, name: str) -> bool:
        with self._cond:
            lease = self._live(name)
            if lease is None:
                return False
            del self._leases[name]
            self._cond.notify_all()
            return True
