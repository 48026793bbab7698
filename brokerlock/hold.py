"""A thread's hold of a lock: what the holder knows of its lease, and its renewal.

Kept apart from the façade (``lock``): the renewer keeps holds, so a hold refers to
its item and its thread weakly, and must make sense alone once both are gone.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

from ._log import DEBUG, WARNING, log
from .adapters.base import Lease
from .durations import format_duration

if TYPE_CHECKING:
    from .lock import BrokerLockItem



def _nothing() -> None:
    pass


class Hold:
    """One thread's hold of one item: its lease and what the holder knows of it.

    ``expires`` is the monotonic time by which the lease ends at the latest, counted
    from *before* the store was asked, so it is never optimistic. ``mutex`` orders the
    renewer's extends against the owner's extend and release.

    The hold refers to its item and its thread weakly: the renewer keeps holds, and
    must not keep alive an item that was dropped, nor renew for a thread that ended
    (see ``renew`` and docs/ownership.rst).
    """

    def __init__(
        self, item: BrokerLockItem, lease: Lease, asked: float, keepalive: bool, pid: int
    ) -> None:
        thread = threading.current_thread()
        self._item = weakref.ref(item)
        self._thread = weakref.ref(thread)
        self.thread_name = thread.name
        self.name = item.name
        self.adapter = item._adapter
        self.lease = lease
        self.ttl = item.ttl
        self.pid = pid
        self.expires = None if self.ttl is None else asked + self.ttl
        self.keepalive = keepalive and self.ttl is not None
        self.lost = False
        self.why = ""  # why it was lost, once it is
        #: Set when a release (or a lost extend) begins: the renewer leaves it alone.
        self.ended = False
        self.failures = 0
        self.mutex = threading.Lock()
        self.unwatch: Callable[[], None] = _nothing  # stops the store's watch of the lease

    @property
    def item(self) -> Optional[BrokerLockItem]:
        return self._item()

    @property
    def finished(self) -> bool:
        return self.ended or self.lost

    def orphaned(self) -> Optional[str]:
        """Why nobody can release this hold any more, if so: its thread ended, or its
        item was garbage-collected while held."""
        thread = self._thread()
        if thread is None or not thread.is_alive():
            return f"its thread {self.thread_name!r} ended without releasing it"
        if self._item() is None:
            return f"its item was dropped by thread {self.thread_name!r} without releasing it"
        return None

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
            orphaned = self.orphaned()
            if orphaned is not None:
                # Renewing it would keep the lock for ever, with nobody to release it:
                # stop, and let the lease end by its ttl.
                self.ended = True
                log.warning(
                    "lock %r fence %d is no longer renewed: %s; it ends by its ttl of %s",
                    self.name, self.lease.fence, orphaned, format_duration(self.ttl),
                )
                return None
            asked = time.monotonic()
            try:
                lease = self.adapter.extend(self.name, self.lease.token, self.ttl)
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
                        self.name, self.lease.fence, left, exc,
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
                        self.name, lease.fence, self.failures,
                    )
                    self.failures = 0
                else:
                    log.debug("renewed %r fence %d", self.name, lease.fence)
                return asked + self.ttl * RENEW_AT
        mark_lost(self, why)
        return None


def mark_lost(hold: Hold, why: str) -> None:
    """Record the loss once, however many parties learn of it."""
    with hold.mutex:
        if hold.lost:
            return
        hold.lost, hold.why = True, why
    log.warning("lost lock %r fence %d: %s", hold.name, hold.lease.fence, why)
    item = hold.item
    if item is not None and item.on_lost is not None:
        try:
            item.on_lost(item)
        except Exception:
            log.exception("on_lost callback of lock %r raised", hold.name)


#: Per thread: the holds it has, by (store id, name), whichever item they came through.
_threads = threading.local()


def held_by_thread() -> Dict[Tuple[str, str], Hold]:
    held: Optional[Dict[Tuple[str, str], Hold]] = getattr(_threads, "held", None)
    if held is None:
        held = _threads.held = {}
    return held
