"""The public façade: :class:`BrokerLock` and its named :class:`BrokerLockItem`.

An item can be shared by many threads (a service holding one injected item): each
thread contends as a holder of its own, with its own token, so ``acquired``, ``fence``,
``lost`` and ``release()`` are per thread. The adapter below knows nothing of threads.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Callable, Iterator, Optional, Type, TypeVar

from ._log import DEBUG, WARNING, log
from .adapters.base import Adapter, Lease, Request
from .durations import Duration, format_duration, parse_duration
from .errors import BrokerLockError, LockLost, LockTimeout
from .names import validate_name

F = TypeVar("F", bound=Callable[..., Any])
OnLost = Callable[["BrokerLockItem"], None]


def _nothing() -> None:
    pass


class Hold:
    """One thread's hold of one item: its lease and what the holder knows of it.

    ``expires`` is the monotonic time by which the lease ends at the latest, counted
    from *before* the store was asked, so it is never optimistic. ``mutex`` orders the
    renewer's extends against the owner's extend and release.
    """

    def __init__(self, item: BrokerLockItem, lease: Lease, asked: float, keepalive: bool) -> None:
        self.item = item
        self.lease = lease
        self.ttl = item.ttl
        self.pid = os.getpid()
        self.expires = None if self.ttl is None else asked + self.ttl
        self.keepalive = keepalive and self.ttl is not None
        self.lost = False
        self.why = ""  # why it was lost, once it is
        self.ended = False
        self.failures = 0
        self.mutex = threading.Lock()
        self.unwatch: Callable[[], None] = _nothing  # stops the store's watch of the lease

    @property
    def finished(self) -> bool:
        return self.ended or self.lost

    @property
    def name(self) -> str:
        return self.item.name

    def remaining(self) -> Optional[float]:
        if self.lost:
            return 0.0
        if self.expires is None:
            return None
        return max(0.0, self.expires - time.monotonic())

    def why_gone(self) -> str:
        """Why the store no longer has this lease, as far as the holder can tell.

        ``expires`` is counted from before the store was asked, so it is never later
        than the store's own expiry: while it lies ahead, the lease cannot have run out
        (up to a wall clock step on a store that uses it), and so it was broken.
        """
        if self.expires is None or self.expires - time.monotonic() > 0.01:
            return (
                "it was broken before its lease ended (brokerlock release --force, or the "
                "store lost this process's connection and took it for dead)"
            )
        return f"its lease of {format_duration(self.ttl)} ran out before it was renewed or released"

    def renew(self) -> Optional[float]:
        """Extend the lease once, for the renewer; the next due time, or ``None``."""
        from .renewer import MAX_RETRY_DELAY, RENEW_AT
        assert self.ttl is not None
        with self.mutex:
            if self.finished:
                return None
            asked = time.monotonic()
            try:
                lease = self.item._adapter.extend(self.item.name, self.lease.token, self.ttl)
            except Exception as exc:
                assert self.expires is not None
                left = self.expires - time.monotonic()
                if left > 0:
                    self.failures += 1
                    # One warning per run of failures, not one per retry: a retry a second
                    # would flood a cron job's mail while the store is down.
                    log.log(
                        WARNING if self.failures == 1 else DEBUG,
                        "renewing lock %r fence %d failed, retrying (%.3fs of lease left): %s",
                        self.item.name, self.lease.fence, left, exc,
                    )
                    return time.monotonic() + min(MAX_RETRY_DELAY, self.ttl * RENEW_AT / 4, left / 2)
                lease, why = None, f"could not renew before the lease ran out: {exc}"
            else:
                why = self.why_gone()
            if lease is not None:
                self.lease, self.expires = lease, asked + self.ttl
                if self.failures:
                    log.info(
                        "renewed %r fence %d after %d failed attempts",
                        self.item.name, lease.fence, self.failures,
                    )
                    self.failures = 0
                else:
                    log.debug("renewed %r fence %d", self.item.name, lease.fence)
                return asked + self.ttl * RENEW_AT
        self.item._mark_lost(self, why)
        return None


class BrokerLock:
    """A store of named locks, reached through one adapter.

    ``BrokerLock()`` uses ``$BROKERLOCK_URL`` if set, else the SQLite database in the
    user's state directory (see :func:`brokerlock.default_url`). Pass an adapter
    (``BrokerLock(SQLiteAdapter("locks.db"))``) or use :meth:`from_url` to choose the
    store; ``adapter`` is the one in use. ``TypeError`` if ``adapter`` is not an
    :class:`~brokerlock.Adapter`.
    """

    def __init__(self, adapter: Optional[Adapter] = None) -> None:
        if adapter is None:
            from .urls import default_adapter

            adapter = default_adapter()
        if not isinstance(adapter, Adapter):
            raise TypeError(f"BrokerLock needs an adapter, not {type(adapter).__name__}: {adapter!r}")
        self.adapter = adapter

    @classmethod
    def from_url(cls, url: str) -> BrokerLock:
        """The store a URL names: ``sqlite:////absolute.db`` (or ``sqlite:/absolute.db``),
        ``sqlite:///relative.db``, ``file:///absolute/dir``, ``memory://`` (a fresh
        private store),
        ``redis://[user:password@]host:6379/0`` (``rediss://`` for TLS,
        ``?prefix=`` for the keys), ``postgresql://user:password@host/db``
        (``postgres://``; ``?table=`` for the table).

        Relative paths and ``memory://`` are for programs: the command line refuses
        them (see docs/urls.rst).

        ``ValueError`` naming the URL when it names no store, ``TypeError`` if it is
        not a ``str``, :class:`~brokerlock.BrokerLockError` when the store cannot be
        opened.
        """
        from .urls import adapter_from_url

        return cls(adapter_from_url(url))

    def item(
        self,
        name: str,
        ttl: Duration = "2m",
        timeout: Duration = "30s",
        *,
        keepalive: bool = False,
        on_lost: Optional[OnLost] = None,
    ) -> BrokerLockItem:
        """A handle on the lock ``name``; creating it touches no store.

        ``name`` is any non-empty ``str`` that encodes to UTF-8, without NUL, up to 4096
        bytes. ``ttl`` is the lease every acquisition asks for (``None``: no expiry);
        ``timeout`` bounds how long :meth:`~BrokerLockItem.acquire` waits (``0``: one
        attempt, ``None``: for ever). The defaults are Deepkit's. With ``keepalive``,
        every hold's lease is renewed until it is released; ``on_lost(item)`` is called
        once when a hold's lease is found lost. Bad values raise ``ValueError`` or
        ``TypeError`` naming them.
        """
        return BrokerLockItem(self, name, ttl=ttl, timeout=timeout, keepalive=keepalive, on_lost=on_lost)

    def close(self) -> None:
        """Close the adapter's files and connections; locks still held are released
        by their ttl or when the process exits, whichever comes first."""
        self.adapter.close()

    def __repr__(self) -> str:
        return f"BrokerLock({self.adapter.url!r})"


class BrokerLockItem:
    """One named lock with its lease (``ttl``) and wait bound (``timeout``).

    Made by :meth:`BrokerLock.item`; ``name``, ``ttl`` and ``timeout`` (in seconds, or
    ``None``), ``keepalive`` and ``on_lost`` are its attributes. An item can be shared by
    threads: each thread is a holder of its own, and :attr:`acquired`, :attr:`fence`,
    :attr:`lease` and :meth:`release` are per thread. Not reentrant: acquiring what the
    calling thread already holds raises. With ``keepalive``, the process's renewer
    thread extends every hold's lease at a third of its ttl; ``on_lost(item)`` is called
    once per hold whose lease is lost, by whichever thread learns of it first, and what
    it raises is logged, not propagated.
    """

    def __init__(
        self,
        lock: BrokerLock,
        name: str,
        ttl: Duration,
        timeout: Duration,
        keepalive: bool = False,
        on_lost: Optional[OnLost] = None,
    ) -> None:
        self.name = validate_name(name)
        self.ttl = parse_duration(ttl, "ttl")
        if self.ttl == 0:
            raise ValueError("ttl must be longer than 0 (use None for a lease without expiry)")
        self.timeout = parse_duration(timeout, "timeout")
        if on_lost is not None and not callable(on_lost):
            raise TypeError(f"on_lost must be callable, not {on_lost!r}")
        self.keepalive = bool(keepalive)
        self.on_lost = on_lost
        self._lock = lock
        self._adapter = lock.adapter
        self._local = threading.local()

    # -- per-thread state ------------------------------------------------------
    def _current(self) -> Optional[Hold]:
        """The calling thread's hold, lost or not."""
        hold: Optional[Hold] = getattr(self._local, "hold", None)
        if hold is not None and hold.pid != os.getpid():
            # Inherited through fork(): the child holds none of its parent's locks.
            self._local.hold = hold = None
        return hold

    def _hold(self) -> Optional[Hold]:
        """The calling thread's hold while it is not known to be lost."""
        hold = self._current()
        return None if hold is None or hold.lost else hold

    @property
    def acquired(self) -> bool:
        """Whether the calling thread holds this lock, as far as it knows."""
        return self._hold() is not None

    @property
    def lost(self) -> bool:
        """Whether the calling thread's last hold was lost; false again once it acquires."""
        hold = self._current() or getattr(self._local, "last", None)
        return hold is not None and hold.pid == os.getpid() and hold.lost

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

    def remaining(self) -> Optional[float]:
        """Seconds left on the calling thread's lease by the monotonic clock, never
        optimistic; ``None`` when it holds nothing or the lease has no ttl, ``0.0``
        once the lease is known to be lost."""
        hold = self._current()
        return None if hold is None else hold.remaining()

    # -- acquiring -------------------------------------------------------------
    def _request(self) -> Request:
        if self._hold() is not None:
            raise BrokerLockError(
                f"lock {self.name!r} is already acquired by this thread; call release() first"
            )
        return Request.make(self.name, os.urandom(16).hex(), self.ttl)

    def _took(self, lease: Lease, asked: float, keepalive: Optional[bool]) -> BrokerLockItem:
        hold = Hold(self, lease, asked, self.keepalive if keepalive is None else keepalive)
        self._local.hold, self._local.last = hold, None
        # A loss the store tells of at once (a server's presence connection killed)
        # stops the keepalive and reaches on_lost now, not at the next renewal.
        hold.unwatch = self._adapter.watch(self.name, lease.token, functools.partial(self._gone, hold))
        if hold.keepalive:
            from .renewer import renewer  # loaded with the first kept-alive hold

            renewer().add(hold)
        if log.isEnabledFor(DEBUG):  # (its arguments cost a fast cycle ~1 µs)
            log.debug(
                "acquired %r fence %d after %.6fs on %s",
                self.name, lease.fence, time.monotonic() - asked, self._adapter.url,
            )
        return self

    def acquire(self, *, keepalive: Optional[bool] = None) -> BrokerLockItem:
        """Block until the lock is held and return the item; :class:`LockTimeout` (naming
        the holder) once ``timeout`` passes, :class:`BrokerLockError` if this thread
        already holds it or the store fails. ``keepalive`` overrides the item's setting
        for this hold."""
        request = self._request()
        asked = time.monotonic()
        lease = self._adapter.acquire(request, self.timeout)
        if lease is None:
            waited = time.monotonic() - asked
            holder = self._adapter.get(self.name)
            who = holder.describe() if holder is not None else "its holder just released it"
            log.debug("timed out on %r after %.3fs", self.name, waited)
            raise LockTimeout(
                f"could not acquire lock {self.name!r} within {format_duration(self.timeout)} "
                f"(waited {format_duration(waited)}): {who}",
                name=self.name,
                holder=holder,
                waited=waited,
            )
        return self._took(lease, asked, keepalive)

    def try_acquire(self, *, keepalive: Optional[bool] = None) -> Optional[BrokerLockItem]:
        """One attempt that never waits (Deepkit's ``try()``): the item if acquired,
        else ``None``. ``keepalive`` overrides the item's setting for this hold."""
        request = self._request()
        asked = time.monotonic()
        lease = self._adapter.try_acquire(request)
        return None if lease is None else self._took(lease, asked, keepalive)

    # -- holding ---------------------------------------------------------------
    def _mark_lost(self, hold: Hold, why: str) -> None:
        """Record the loss once, however many parties learn of it."""
        with hold.mutex:
            if hold.lost:
                return
            hold.lost, hold.why = True, why
        log.warning("lost lock %r fence %d: %s", self.name, hold.lease.fence, why)
        if self.on_lost is not None:
            try:
                self.on_lost(self)
            except Exception:
                log.exception("on_lost callback of lock %r raised", self.name)

    def _gone(self, hold: Hold, why: str) -> None:
        if not hold.ended:  # a hold released meanwhile lost nothing
            self._mark_lost(hold, why)

    def _lost_error(self, hold: Hold, when: str) -> LockLost:
        return LockLost(f"lock {self.name!r} (fence {hold.lease.fence}) was lost before {when}: {hold.why}")

    def release(self) -> None:
        """Free the lock. A no-op when the calling thread holds nothing.

        Raises :class:`LockLost` when the lease had ended before this call (expired,
        taken over, broken): someone else may have run the critical section meanwhile.
        The hold ends either way, also when the store cannot be reached (then
        :class:`BrokerLockError`: the lease ends by its ttl or with this process).
        """
        hold = self._current()
        if hold is None:
            return
        with hold.mutex:
            hold.ended = True
            known_lost = hold.lost
        hold.unwatch()
        self._local.hold, self._local.last = None, hold
        intact = self._adapter.release(self.name, hold.lease.token)
        if known_lost or not intact:
            self._mark_lost(hold, hold.why_gone())
            raise self._lost_error(hold, "release")
        log.debug("released %r fence %d", self.name, hold.lease.fence)

    def extend(self, ttl: Duration = None) -> None:
        """Push the lease's expiry to now + ``ttl`` (default: the item's ttl).

        Raises :class:`LockLost` if the lease had already ended (the hold is then
        over), :class:`BrokerLockError` if the calling thread holds nothing.
        """
        seconds = self.ttl if ttl is None else parse_duration(ttl, "ttl")
        if seconds == 0:
            raise ValueError("ttl must be longer than 0")
        hold = self._current()
        if hold is None:
            raise BrokerLockError(f"cannot extend lock {self.name!r}: this thread does not hold it")
        with hold.mutex:
            asked = time.monotonic()
            lease = None if hold.lost else self._adapter.extend(self.name, hold.lease.token, seconds)
            if lease is not None:
                hold.lease = lease
                hold.expires = None if seconds is None else asked + seconds
        if lease is None:
            self._local.hold, self._local.last = None, hold
            hold.ended = True
            hold.unwatch()
            self._mark_lost(hold, hold.why_gone())
            raise self._lost_error(hold, "extend")
        log.debug("extended %r fence %d by %s", self.name, lease.fence, format_duration(seconds))

    def is_reserved(self) -> bool:
        """Whether anyone (this thread included) holds the lock now, per the store."""
        return self._adapter.get(self.name) is not None

    @contextmanager
    def hold(self, keepalive: Optional[bool] = None) -> Iterator[BrokerLockItem]:
        """``with item.hold():`` acquire, run the block, release, exceptions included.

        ``keepalive`` overrides the item's setting for this hold. If the block raised,
        its exception propagates even when the lease was also lost (the loss is logged
        at WARNING); otherwise a lost lease raises :class:`LockLost` here.
        """
        self.acquire(keepalive=keepalive)
        try:
            yield self
        except BaseException:
            self._release_quietly()
            raise
        self.release()

    def _release_quietly(self) -> None:
        try:
            self.release()
        except LockLost:
            pass  # logged at WARNING; the block's own error matters more

    def __enter__(self) -> BrokerLockItem:
        """``with item:`` is ``with item.hold():``."""
        return self.acquire()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """Release; a lost lease raises :class:`LockLost` unless the block raised."""
        if exc_type is None:
            self.release()
        else:
            self._release_quietly()

    def __call__(self, fn: F) -> F:
        """``@item`` runs each call of ``fn`` under ``item.hold()``."""

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with self.hold():
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"BrokerLockItem({self.name!r}, ttl={self.ttl!r}, timeout={self.timeout!r}, "
            f"store={self._adapter.url!r})"
        )
