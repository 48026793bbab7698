"""What a thread owns of an item, and the states of an acquisition in flight.

``BrokerLockItem`` (in ``lock``) is the public façade; this is the machinery under
its ``acquire()`` and ``release()`` that keeps the invariant of
``adapters/inflight.py``: at every bytecode the lease is either owned by the calling
thread or free in the store. Per thread, an item keeps in ``_local``:

``hold``
    the thread's :class:`~brokerlock.hold.Hold`, which ``release()`` frees;
``pending``
    an :class:`~brokerlock.adapters.inflight.Acquisition` not yet owned nor given
    back (only while an acquire runs, or after an interrupt cut its cleanup short);
``last``
    the hold that ended last, for ``lost``.

Each thread also keeps a registry of its holds by (store, name), whichever item they
came through (``hold.held_by_thread``): a wait for one of them would wait for itself.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import TYPE_CHECKING, Optional, Tuple, cast

from ._log import DEBUG, log
from .adapters.base import Adapter, Request
from .adapters.inflight import Acquisition
from .errors import BrokerLockError
from .hold import Hold, held_by_thread

if TYPE_CHECKING:
    from .lock import BrokerLockItem



class Owning:
    """The per-thread state of ``BrokerLockItem`` and its acquire and release steps."""

    name: str
    ttl: Optional[float]
    timeout: Optional[float]
    keepalive: bool
    _adapter: Adapter
    _key: Tuple[str, str]
    _local: threading.local

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

    # -- acquiring -------------------------------------------------------------
    #
    # The invariant (see adapters/inflight.py): at every bytecode the lease is either
    # owned by the calling thread (``_local.hold``, which ``release()`` frees) or free in
    # the store. ``_local.pending`` is recorded *before* the store is asked and cleared
    # only once the lease is owned or given back, so an interrupt that lands even in
    # the cleanup itself leaves a record that the thread's next call finishes.
    # An ``acquire()`` that raises leaves nothing held: its caller never got the item.

    def _begin(self, waits: bool) -> Acquisition:
        self._finish_pending()
        if self._hold() is not None:
            raise BrokerLockError(
                f"lock {self.name!r} is already acquired by this thread; call release() first"
            )
        if waits:
            self._refuse_to_wait_for_ourselves()
        acquisition = Acquisition(self._adapter, Request.make(self.name, os.urandom(16).hex(), self.ttl))
        self._local.pending = acquisition
        return acquisition

    def _refuse_to_wait_for_ourselves(self) -> None:
        """Raise if this thread holds the name in this store through another item.

        Only a wait can wait for ourselves; one attempt (try_acquire, timeout 0) just
        finds the lock taken, as it would by anyone else. A wait that outlasts our own
        lease (not kept alive) ends in a takeover, which is no deadlock; nor is a hold
        the store no longer has (a server that lost its data, a broken lease).
        """
        other = held_by_thread().get(self._key)
        if other is None or other.pid != os.getpid() or other.finished:
            return
        left = other.remaining()
        if left == 0.0 or not (
            left is None or other.keepalive or self.timeout is None or left >= self.timeout
        ):
            return
        current = self._adapter.get(self.name)
        if current is None or current.token != other.lease.token:
            return
        how = "another item" if other.item is not None else "an item dropped without release()"
        raise BrokerLockError(
            f"lock {self.name!r} is already held by this thread through {how} "
            f"(fence {other.lease.fence}) in {self._adapter.url}: waiting for it would "
            "wait for ourselves"
        )

    def _took(self, acquisition: Acquisition, asked: float, keepalive: Optional[bool]) -> None:
        lease = acquisition.lease
        assert lease is not None
        hold = Hold(
            cast("BrokerLockItem", self), lease, asked, self.keepalive if keepalive is None else keepalive,
            acquisition.request.pid,
        )
        # Known to the thread's registry first: whatever is known there, _undo finds.
        held_by_thread()[self._key] = hold
        # A loss the store tells of at once (a server's presence connection killed)
        # stops the keepalive and reaches on_lost now, not at the next renewal.
        item = cast("BrokerLockItem", self)
        hold.unwatch = self._adapter.watch(self.name, lease.token, functools.partial(item._gone, hold))
        if hold.keepalive:
            from .renewer import renewer  # loaded with the first kept-alive hold

            renewer().add(hold)
        if log.isEnabledFor(DEBUG):  # (its arguments cost a fast cycle ~1 µs)
            log.debug(
                "acquired %r fence %d after %.6fs on %s",
                self.name, lease.fence, time.monotonic() - asked, self._adapter.url,
            )
        # The hand-over: plain stores, no calls, so no interrupt lands between them; one
        # that lands before makes the caller's handler give the lease back (_undo).
        self._local.hold, self._local.last = hold, None
        acquisition.owned()
        self._local.pending = None

    def _undo(self, acquisition: Acquisition) -> None:
        """Give back all an interrupted acquire got (the caller re-raises): forget a hold
        it recorded, leave the queue, release a lease granted to it."""
        token = acquisition.token
        hold = self._current()
        if hold is not None and hold.lease.token == token:
            self._local.hold = None
        held = held_by_thread()
        mine = held.get(self._key)
        if mine is not None and mine.lease.token == token:
            mine.ended = True  # (the renewer drops it)
            mine.unwatch()
            del held[self._key]
        acquisition.disowned()  # the caller never got it: the cleanup gives it back
        if acquisition.abandon() and getattr(self._local, "pending", None) is acquisition:
            self._local.pending = None

    def _forget_acquisition(self, acquisition: Acquisition) -> None:
        acquisition.abandoned()
        if getattr(self._local, "pending", None) is acquisition:
            self._local.pending = None

    def _finish_pending(self) -> None:
        """Finish the cleanup of an acquire whose own cleanup was cut short."""
        acquisition: Optional[Acquisition] = getattr(self._local, "pending", None)
        if acquisition is not None:
            if acquisition.request.pid != os.getpid():  # inherited through fork()
                self._local.pending = None
            else:
                self._undo(acquisition)

    def _forget(self, hold: Hold, last: bool = True) -> None:
        """The thread no longer holds ``hold``: only once the store has let it go."""
        hold.unwatch()
        if getattr(self._local, "hold", None) is hold:
            self._local.hold = None
        if last:
            self._local.last = hold
        held = held_by_thread()
        if held.get(self._key) is hold:
            del held[self._key]
