"""The public façade: :class:`BrokerLock` and its named :class:`BrokerLockItem`.

An item can be shared by many threads (a service holding one injected item): each
thread contends as a holder of its own, with its own token, so ``acquired``, ``fence``
and ``release()`` are per thread. The adapter below knows nothing of threads.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from contextlib import contextmanager
from types import TracebackType
from typing import Iterator, Optional, Type

from .adapters.base import Adapter, Lease, Request
from .durations import Duration, format_duration, parse_duration
from .errors import BrokerLockError, LockLost, LockTimeout
from .names import validate_name

log = logging.getLogger("brokerlock")


class _Hold:
    """One thread's hold of one item."""

    __slots__ = ("lease", "pid")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.pid = os.getpid()


class BrokerLock:
    """A store of named locks, reached through one adapter.

    ``BrokerLock()`` uses ``$BROKERLOCK_URL`` if set, else the SQLite database in the
    user's state directory (see :func:`brokerlock.default_url`).
    """

    def __init__(self, adapter: Optional[Adapter] = None) -> None:
        if adapter is None:
            from .urls import adapter_from_url, default_url

            adapter = adapter_from_url(default_url())
        if not isinstance(adapter, Adapter):
            raise TypeError(f"BrokerLock needs an adapter, not {type(adapter).__name__}: {adapter!r}")
        self.adapter = adapter

    @classmethod
    def from_url(cls, url: str) -> BrokerLock:
        """``sqlite:///rel.db``, ``sqlite:////abs.db``, ``file:///dir``, ``memory://``..."""
        from .urls import adapter_from_url

        return cls(adapter_from_url(url))

    def item(
        self, name: str, ttl: Duration = "2m", timeout: Duration = "30s"
    ) -> BrokerLockItem:
        """A handle on the lock ``name``; creating it touches no store."""
        return BrokerLockItem(self, name, ttl=ttl, timeout=timeout)

    def close(self) -> None:
        self.adapter.close()

    def __repr__(self) -> str:
        return f"BrokerLock({self.adapter.url!r})"


class BrokerLockItem:
    """One named lock with its lease (``ttl``) and wait bound (``timeout``).

    Not reentrant: acquiring what the calling thread already holds raises.
    """

    def __init__(self, lock: BrokerLock, name: str, ttl: Duration, timeout: Duration) -> None:
        self.name = validate_name(name)
        self.ttl = parse_duration(ttl, "ttl")
        if self.ttl == 0:
            raise ValueError("ttl must be longer than 0 (use None for a lease without expiry)")
        self.timeout = parse_duration(timeout, "timeout")
        self._lock = lock
        self._adapter = lock.adapter
        self._local = threading.local()

    # -- per-thread state ------------------------------------------------------
    def _hold(self) -> Optional[_Hold]:
        hold: Optional[_Hold] = getattr(self._local, "hold", None)
        if hold is not None and hold.pid != os.getpid():
            # Inherited through fork(): the child holds none of its parent's locks.
            self._local.hold = hold = None
        return hold

    def _require_hold(self, action: str) -> _Hold:
        hold = self._hold()
        if hold is None:
            raise BrokerLockError(f"cannot {action} lock {self.name!r}: this thread does not hold it")
        return hold

    @property
    def acquired(self) -> bool:
        """Whether the calling thread holds this lock (by its own record)."""
        return self._hold() is not None

    @property
    def fence(self) -> Optional[int]:
        """The fencing token of the calling thread's hold, ``None`` when it holds none.

        It grows with every acquisition of the name: pass it to the resource you
        protect, and let the resource refuse writes with a fence lower than the
        highest it has seen.
        """
        hold = self._hold()
        return None if hold is None else hold.lease.fence

    @property
    def lease(self) -> Optional[Lease]:
        """The calling thread's lease record, ``None`` when it holds none."""
        hold = self._hold()
        return None if hold is None else hold.lease

    # -- acquiring -------------------------------------------------------------
    def _request(self) -> Request:
        if self._hold() is not None:
            raise BrokerLockError(
                f"lock {self.name!r} is already acquired by this thread; call release() first"
            )
        return Request(self.name, secrets.token_hex(16), self.ttl)

    def _took(self, lease: Lease, waited: float) -> BrokerLockItem:
        self._local.hold = _Hold(lease)
        log.debug(
            "acquired %r fence %d after %.6fs (%s)", self.name, lease.fence, waited, self._adapter.url
        )
        return self

    def acquire(self) -> BrokerLockItem:
        """Block until the lock is held; :class:`LockTimeout` once ``timeout`` passes."""
        request = self._request()
        started = time.monotonic()
        lease = self._adapter.acquire(request, self.timeout)
        waited = time.monotonic() - started
        if lease is None:
            holder = self._adapter.get(self.name)
            who = holder.describe() if holder is not None else "its holder just released it"
            log.debug("timed out on %r after %.3fs", self.name, waited)
            raise LockTimeout(
                f"could not acquire lock {self.name!r} within {format_duration(self.timeout)} "
                f"(waited {format_duration(waited)}): {who}"
            )
        return self._took(lease, waited)

    def try_acquire(self) -> Optional[BrokerLockItem]:
        """One attempt that never waits: the item if acquired, else ``None``."""
        lease = self._adapter.try_acquire(self._request())
        return None if lease is None else self._took(lease, 0.0)

    # -- holding ---------------------------------------------------------------
    def release(self) -> None:
        """Free the lock. A no-op when the calling thread holds nothing.

        Raises :class:`LockLost` when the lease had ended before this call (expired,
        taken over, broken): someone else may have run the critical section meanwhile.
        """
        hold = self._hold()
        if hold is None:
            return
        intact = self._adapter.release(self.name, hold.lease.token)
        self._local.hold = None
        if not intact:
            log.warning("lock %r fence %d was lost before its release", self.name, hold.lease.fence)
            raise LockLost(
                f"lock {self.name!r} (fence {hold.lease.fence}) was lost before release: its "
                f"lease of {format_duration(self.ttl)} ran out or it was broken"
            )
        log.debug("released %r fence %d", self.name, hold.lease.fence)

    def extend(self, ttl: Duration = None) -> None:
        """Push the lease's expiry to now + ``ttl`` (default: the item's ttl).

        Raises :class:`LockLost` if the lease had already ended (the hold is then
        over), :class:`BrokerLockError` if the calling thread holds nothing.
        """
        seconds = self.ttl if ttl is None else parse_duration(ttl, "ttl")
        if seconds == 0:
            raise ValueError("ttl must be longer than 0")
        hold = self._require_hold("extend")
        lease = self._adapter.extend(self.name, hold.lease.token, seconds)
        if lease is None:
            self._local.hold = None
            log.warning("lock %r fence %d was lost before extend", self.name, hold.lease.fence)
            raise LockLost(f"lock {self.name!r} (fence {hold.lease.fence}) was lost before extend")
        hold.lease = lease
        log.debug("extended %r fence %d by %s", self.name, lease.fence, format_duration(seconds))

    def is_reserved(self) -> bool:
        """Whether anyone (this thread included) holds the lock now, per the store."""
        return self._adapter.get(self.name) is not None

    @contextmanager
    def hold(self) -> Iterator[BrokerLockItem]:
        """``with item.hold():`` acquire, run the block, release, exceptions included.

        If the block raised, its exception propagates even when the lease was also lost
        (the loss is logged); otherwise a lost lease raises :class:`LockLost` here.
        """
        self.acquire()
        try:
            yield self
        except BaseException:
            try:
                self.release()
            except LockLost:
                pass  # already logged at WARNING; the block's own error matters more
            raise
        self.release()

    def __enter__(self) -> BrokerLockItem:
        return self.acquire()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc_type is None:
            self.release()
            return
        try:
            self.release()
        except LockLost:
            pass  # logged at WARNING; the block's own error propagates

    def __repr__(self) -> str:
        return (
            f"BrokerLockItem({self.name!r}, ttl={self.ttl!r}, timeout={self.timeout!r}, "
            f"store={self._adapter.url!r})"
        )
