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
from types import TracebackType
from typing import Any, Callable, Optional, Type, TypeVar

from ._log import log
from .adapters.base import Adapter, Lease, Request
from .adapters.inflight import Acquisition, settle
from .durations import Duration, format_duration, parse_duration
from .errors import BrokerLockError, LockLost, LockTimeout
from .hold import Hold, mark_lost
from .names import validate_name
from .owning import Owning

F = TypeVar("F", bound=Callable[..., Any])
OnLost = Callable[["BrokerLockItem"], None]


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


class BrokerLockItem(Owning):
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
        #: The name in its store, whichever client reaches it: the key of the thread's
        #: registry of holds (see ``_begin``).
        self._key = (lock.adapter.store_id, self.name)
        self._local = threading.local()

    # -- per-thread state ------------------------------------------------------
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

    def acquire(self, *, keepalive: Optional[bool] = None) -> BrokerLockItem:
        """Block until the lock is held and return the item; :class:`LockTimeout` (naming
        the holder) once ``timeout`` passes, :class:`BrokerLockError` if this thread
        already holds it or the store fails. ``keepalive`` overrides the item's setting
        for this hold.

        :class:`BrokerLockError` at once, too, if this thread holds the name in the same
        store through another item: it would wait for itself (docs/ownership.rst).
        """
        acquisition = self._begin(self.timeout != 0)
        asked = time.monotonic()
        timeout = self.timeout

        def wait(request: Request) -> Optional[Lease]:
            return self._adapter.acquire(request, timeout)

        if self._attempt(acquisition, asked, wait, keepalive):
            return self
        # Timed out: the adapter left the queue, and nothing is ours.
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

    def try_acquire(self, *, keepalive: Optional[bool] = None) -> Optional[BrokerLockItem]:
        """One attempt that never waits (Deepkit's ``try()``): the item if acquired,
        else ``None``. ``keepalive`` overrides the item's setting for this hold."""
        acquisition = self._begin(False)
        if self._attempt(acquisition, time.monotonic(), self._adapter.try_acquire, keepalive):
            return self
        return None

    def _attempt(
        self, acquisition: Acquisition, asked: float,
        ask: Callable[[Request], Optional[Lease]], keepalive: Optional[bool],
    ) -> bool:
        """Ask the store once through ``ask``; ``True`` once the thread owns the lease.
        On ``False`` nothing is ours: the adapter left the queue, the acquisition is
        forgotten. On any exception the lease is not ours either (see ``_undo``)."""
        try:
            lease = ask(acquisition.request)
            if lease is not None:
                acquisition.granted(lease)
                self._took(acquisition, asked, keepalive)
                return True
        except BrokerLockError:
            # The store failed us: cleaning up would wait for it again (a busy SQLite
            # file, a server that is gone). What it may keep of ours lapses by itself:
            # a queue place after its patience, a lease by its ttl or with this process.
            self._forget_acquisition(acquisition)
            raise
        except BaseException:
            self._undo(acquisition)
            raise
        self._forget_acquisition(acquisition)
        return False

    # -- holding ---------------------------------------------------------------
    def _mark_lost(self, hold: Hold, why: str) -> None:
        mark_lost(hold, why)

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
        Interrupted (``KeyboardInterrupt``...), it finishes the release before the
        interrupt propagates; if interrupts keep coming, the thread keeps the hold and
        ``release()`` can be called again.
        """
        try:
            self._release()
        except BrokerLockError:
            raise
        except BaseException:
            # Interrupted anywhere in it: run it again to its end, then propagate.
            settle(self._release_quietly, self.name)
            raise

    def _release(self) -> None:
        hold = self._current()
        if hold is None:
            self._finish_pending()
            return
        with hold.mutex:
            # A release that began before (and was cut short) may have freed it already.
            again = hold.ended
            hold.ended = True
            known_lost = hold.lost
        try:
            intact = self._adapter.release(self.name, hold.lease.token)
        except BrokerLockError:
            self._forget(hold)
            raise
        # Only now: never forget a hold before the store let it go.
        self._forget(hold)
        if known_lost or not (intact or again):
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
            hold.ended = True
            self._forget(hold)
            self._mark_lost(hold, hold.why_gone())
            raise self._lost_error(hold, "extend")
        log.debug("extended %r fence %d by %s", self.name, lease.fence, format_duration(seconds))

    def is_reserved(self) -> bool:
        """Whether anyone (this thread included) holds the lock now, per the store."""
        return self._adapter.get(self.name) is not None

    def hold(self, keepalive: Optional[bool] = None) -> Holding:
        """``with item.hold():`` acquire, run the block, release, exceptions included.

        ``keepalive`` overrides the item's setting for this hold. If the block raised,
        its exception propagates even when the lease was also lost (the loss is logged
        at WARNING); otherwise a lost lease raises :class:`LockLost` here.
        """
        return Holding(self, keepalive)

    def _release_quietly(self) -> None:
        try:
            self._release()
        except LockLost:
            pass  # logged at WARNING; the block's own error matters more

    def __enter__(self) -> BrokerLockItem:
        """``with item:`` is ``with item.hold():``."""
        return self._enter(None)

    def _enter(self, keepalive: Optional[bool]) -> BrokerLockItem:
        """``acquire()`` for a ``with`` statement, which never calls ``__exit__`` once
        ``__enter__`` raised. CPython 3.9 and 3.10 raise a pending interrupt at almost
        any instruction, also after the hold became this thread's and before the block
        starts: a hold this call made then goes back before the interrupt propagates.
        (Left open: the ``return`` itself, one instruction, as docs/ownership.rst says.)"""
        before = self._current()
        try:
            return self.acquire(keepalive=keepalive)
        except BaseException:
            hold = self._current()
            if hold is not None and hold is not before:
                settle(self._release_quietly, self.name)
            raise

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """Release; a lost lease raises :class:`LockLost` unless the block raised."""
        # Guarded from the first line, not one call deeper: CPython raises a pending
        # interrupt as a Python function starts, so every call between the block and
        # this guard would be one more instant where the hold outlives the block.
        try:
            if exc_type is None:
                self._release()
            else:
                # Runs to its end even if another interrupt lands in the release.
                settle(self._release_quietly, self.name)
        except BrokerLockError:
            raise
        except BaseException:
            settle(self._release_quietly, self.name)
            raise

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


class Holding:
    """What ``item.hold()`` returns: ``with`` acquires, runs the block, releases.

    A class rather than a ``@contextmanager`` generator, for the ownership invariant:
    between ``acquire()`` returning and the block starting, contextlib's ``__enter__``
    returns from a call to ``next()``, where a pending interrupt is raised, leaving the
    lock held by a suspended generator until the exception is dropped. Here
    ``__enter__`` returns straight from ``acquire()``, so an interrupt lands in the
    block and ``__exit__`` releases.
    """

    __slots__ = ("item", "keepalive")

    def __init__(self, item: BrokerLockItem, keepalive: Optional[bool]) -> None:
        self.item = item
        self.keepalive = keepalive

    def __enter__(self) -> BrokerLockItem:
        return self.item._enter(self.keepalive)

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.item.__exit__(exc_type, exc, tb)
