"""In-process store: a dict and one lock. Each instance is a private store.

Useful for tests and for threads of one process. Waiters are served first come, first
served: a newcomer never overtakes a thread that is already waiting. Each waiter
sleeps on a Condition of its own, and whoever frees the lock (a release, a break, an
expiry noticed, a waiter leaving the head of the queue) wakes only the head of the
queue: no thundering herd of 64 threads woken to find that one of them won.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

from .base import Adapter, Lease, Request


class _Waiter:
    __slots__ = ("cond",)

    def __init__(self, mutex: threading.RLock) -> None:
        self.cond = threading.Condition(mutex)


class MemoryAdapter(Adapter):
    """Locks of the threads of one process, in memory; each instance is its own store.

    Fences count from 1 per name and are forgotten with the store. ``clock`` exists for
    tests.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.url = "memory://"
        self._clock = clock
        # An RLock, not a Lock, for the waiters' Conditions on it: with a plain Lock,
        # Condition.wait() takes the mutex back in a Python method, whose entry an
        # interrupt can hit, and the waiter then leaves its ``with`` block without the
        # mutex ("release unlocked lock", the queue changed unguarded). An RLock's
        # restore is one C call: when wait() raises, the mutex is ours again.
        self._mutex = threading.RLock()
        self._leases: Dict[str, Lease] = {}
        # One counter for the whole store rather than one per name: a released name
        # then leaves nothing behind, and its fences still only grow.
        self._fence = 0
        # Per name, the waiters by token in arrival order (first: the head).
        self._queues: Dict[str, OrderedDict[str, _Waiter]] = {}

    @property
    def store_id(self) -> str:
        # Every instance is a store of its own, whatever its URL says.
        return f"memory://{id(self):x}"

    def now(self) -> float:
        return self._clock()

    def _live(self, name: str) -> Optional[Lease]:
        lease = self._leases.get(name)
        if lease is not None and lease.expires_at is not None and lease.expires_at <= self._clock():
            del self._leases[name]
            self._wake_head(name)
            return None
        return lease

    def _wake_head(self, name: str) -> None:
        """The lock of ``name`` became free: wake the first waiter, only it."""
        queue = self._queues.get(name)
        if queue:
            next(iter(queue.values())).cond.notify()

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
        with self._mutex:
            if self._live(request.name) is None and not self._queues.get(request.name):
                return self._grant(request)
            return None

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        name, token = request.name, request.token
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._mutex:
            queue = self._queues.get(name)
            if queue is None:
                if self._live(name) is None:
                    return self._grant(request)  # free, nobody waits: no queue needed
                queue = self._queues[name] = OrderedDict()
            waiter = queue[token] = _Waiter(self._mutex)
            try:
                while True:
                    lease = self._live(name)
                    if lease is None and next(iter(queue)) == token:
                        return self._grant(request)  # (the finally leaves the queue)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    # Look again at least every few seconds: the expiry was computed from the
                    # wall clock, and a clock stepped back and corrected must not park us for
                    # the size of the step. (Every release notifies, so this is only a net.)
                    bound = 4.0
                    if lease is not None and lease.expires_at is not None:
                        bound = min(bound, max(0.0, lease.expires_at - self._clock()) + 0.0005)
                    waiter.cond.wait(bound if remaining is None else min(remaining, bound))
            finally:
                # Condition.wait() restores the mutex in its own finally, which an
                # interrupt can cut short on CPython 3.9 and 3.10 (they look for
                # signals at almost every instruction): take it back before leaving.
                if not self._mutex._is_owned():  # type: ignore[attr-defined]
                    self._mutex.acquire()
                self._leave(name, token)

    def _leave(self, name: str, token: str) -> None:
        """Take ``token`` out of the queue (the mutex held); a head that leaves a free
        lock behind wakes the next waiter."""
        queue = self._queues.get(name)
        if queue is None or token not in queue:
            return
        head = next(iter(queue)) == token
        del queue[token]
        if not queue:
            del self._queues[name]
        elif head and name not in self._leases:
            self._wake_head(name)

    def abandon(self, name: str, token: str) -> None:
        with self._mutex:
            self._leave(name, token)
            self._release(name, token)

    def release(self, name: str, token: str) -> bool:
        with self._mutex:
            return self._release(name, token)

    def _release(self, name: str, token: str) -> bool:
        lease = self._leases.get(name)
        if lease is None or lease.token != token:
            return False
        del self._leases[name]
        self._wake_head(name)
        return lease.expires_at is None or lease.expires_at > self._clock()

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        with self._mutex:
            lease = self._live(name)
            if lease is None or lease.token != token:
                return None
            expires = None if ttl is None else self._clock() + ttl
            lease = lease._replace(expires_at=expires)
            self._leases[name] = lease
            return lease

    def get(self, name: str) -> Optional[Lease]:
        with self._mutex:
            return self._live(name)

    def list(self) -> List[Lease]:
        with self._mutex:
            return [lease for name in list(self._leases) if (lease := self._live(name)) is not None]

    def force_release(self, name: str) -> bool:
        with self._mutex:
            lease = self._live(name)
            if lease is None:
                return False
            del self._leases[name]
            self._wake_head(name)
            return True
