"""The adapter contract: the few atomic operations every back end provides.

An adapter knows nothing of threads, items or policy. It stores one lease record per
name and changes it atomically. Waiting is the one place where back ends differ most
(a Condition, inotify, LISTEN/NOTIFY, BLPOP, a FIFO queue), so ``acquire`` lives here
too, with a generic try-then-wait loop that back ends refine.
"""

from __future__ import annotations

import abc
import os
import random
import sys
import threading
import time
from typing import Callable, List, NamedTuple, Optional


def _hostname() -> str:
    # os.uname() instead of the socket module: importing socket costs a cron job ~2 ms.
    if sys.platform != "win32":
        return os.uname().nodename
    return os.environ.get("COMPUTERNAME", "") or sys.platform


_HOST = _hostname()


class Request(NamedTuple):
    """What an acquirer brings: who it is and how long its lease should last."""

    name: str
    token: str
    ttl: Optional[float]
    host: str
    pid: int
    thread: str

    @classmethod
    def make(cls, name: str, token: str, ttl: Optional[float]) -> Request:
        """A request from the calling thread of this process."""
        return cls(name, token, ttl, _HOST, os.getpid(), threading.current_thread().name)


class Lease(NamedTuple):
    """One holder's record of one lock, as the store sees it.

    ``expires_at`` and ``acquired_at`` are seconds since the epoch by the store's
    clock (the server's for Redis and PostgreSQL, the host's boot clock pinned to the
    wall clock for SQLite and lock files: see ``Adapter.on_wall_clock``); ``expires_at``
    is ``None`` when the lease has no ttl.
    """

    name: str
    token: str
    fence: int
    acquired_at: float
    expires_at: Optional[float]
    host: str
    pid: int
    thread: str

    def describe(self) -> str:
        """Who holds it, for error messages and ``brokerlock status``."""
        since = local_time(self.acquired_at)
        until = "no expiry" if self.expires_at is None else "until " + local_time(self.expires_at)
        return (
            f"held by pid {self.pid} on {self.host} (thread {self.thread}) "
            f"since {since}, {until}, fence {self.fence}"
        )


def local_time(epoch: float) -> str:
    """``2026-12-07 03:00:00+01:00``: local time with its UTC offset, so that readers in
    other zones (a log shipped elsewhere, a server's UTC) read the right hour."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S%z", time.localtime(epoch))
    return stamp[:-2] + ":" + stamp[-2:]  # ISO 8601's +01:00 rather than C's +0100


def clock_fence() -> int:
    """The wall clock in microseconds: the floor of every new fence.

    Stores give ``max(previous fence + 1, clock_fence())``. One acquisition takes far
    longer than a microsecond, so a fence never runs ahead of the clock, and a write
    lost in a crash, a store deleted and made anew, or a damaged record still cannot
    make a fence repeat, as long as the wall clock does not step back past it.
    """
    return time.time_ns() // 1000


class Adapter(abc.ABC):
    """A lock store. Every method is thread-safe; errors are :class:`BrokerLockError`."""

    #: Human description of the store, used in error messages ("sqlite:///x.db").
    url: str = ""

    @abc.abstractmethod
    def try_acquire(self, request: Request) -> Optional[Lease]:
        """Take the lock if it is free (absent, expired or its holder dead), else ``None``.

        The fence of the returned lease is greater than that of every earlier lease of
        this name in this store.
        """

    @abc.abstractmethod
    def release(self, name: str, token: str) -> bool:
        """Free the lock if ``token`` holds it; ``False`` if the lease had already ended.

        Never touches a lease that belongs to another token.
        """

    @abc.abstractmethod
    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        """Set the lease's expiry to now + ``ttl``; ``None`` if ``token`` no longer holds it."""

    @abc.abstractmethod
    def get(self, name: str) -> Optional[Lease]:
        """The live lease of ``name``, or ``None`` when the lock is free."""

    @abc.abstractmethod
    def list(self) -> List[Lease]:
        """Every live lease in the store."""

    @abc.abstractmethod
    def force_release(self, name: str) -> bool:
        """Break whoever holds ``name``; ``True`` if there was a live holder."""

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        """Block until acquired or ``timeout`` seconds have passed (``None``: forever)."""
        lease = self.try_acquire(request)
        if lease is not None or timeout == 0:
            return lease
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.waiter(request.name) as waiter:
            while True:
                # Try again only once the waiter is armed, so a release between the
                # first attempt and the arming cannot be missed.
                lease = self.try_acquire(request)
                if lease is not None:
                    return lease
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                waiter.wait(self._recheck_after(request.name, remaining))

    def _recheck_after(self, name: str, remaining: Optional[float]) -> Optional[float]:
        """How long a waiter may sleep before it must look again, at most ``remaining``.

        The current lease's expiry bounds it, because an expiring lease changes nothing
        in the store that could wake the waiter.
        """
        lease = self.get(name)
        bound = remaining
        if lease is not None and lease.expires_at is not None:
            until_expiry = max(0.0, lease.expires_at - self.now()) + 0.001
            bound = until_expiry if bound is None else min(bound, until_expiry)
        return bound

    def watch(self, name: str, token: str, on_gone: Callable[[str], None]) -> Callable[[], None]:
        """Ask to hear at once when the lease ``token`` of ``name`` ends without its
        holder's doing, where the store can tell; returns the function that stops it.

        ``on_gone(why)`` is called at most once, from any thread, with no lock of the
        adapter held. Server stores call it when this process's presence connection
        ends (which frees its leases at once); the default hears of nothing, and the
        holder learns of a loss at its next renewal or release.
        """
        return _nothing

    def waiter(self, name: str) -> Waiter:
        """Something to block on until ``name`` may have changed; polling by default."""
        return BackoffWaiter()

    def now(self) -> float:
        """The store's clock, in seconds since the epoch."""
        return time.time()

    def on_wall_clock(self, lease: Lease) -> Lease:
        """``lease`` with its times on this host's wall clock, for display (the same
        lease where the store's clock is the wall clock, or a server's)."""
        return lease

    def close(self) -> None:  # noqa: B027  (optional: most adapters have nothing to free)
        """Release the adapter's resources; held leases stay in the store."""


def _nothing() -> None:
    pass


class Waiter:
    """Blocks until the lock it watches may have changed. Wake-ups may be spurious."""

    def wait(self, timeout: Optional[float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the waiter holds."""

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BackoffWaiter(Waiter):
    """The fallback where the store cannot push: sleeps from 1 ms up to ``cap``, jittered.

    Jitter keeps a crowd of waiters from retrying in lock-step; the cap bounds how late
    a waiter notices a release on a store that cannot tell it.
    """

    def __init__(self, cap: float = 0.1) -> None:
        self._delay = 0.001
        self._cap = cap

    def wait(self, timeout: Optional[float]) -> None:
        delay = self._delay * random.uniform(0.5, 1.5)
        if timeout is not None:
            delay = min(delay, timeout)
        self._delay = min(self._delay * 2, self._cap)
        time.sleep(max(0.0, delay))
