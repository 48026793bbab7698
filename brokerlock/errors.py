"""The exceptions brokerlock raises; every one derives from :class:`BrokerLockError`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .adapters.base import Lease


class BrokerLockError(Exception):
    """Base class of every error brokerlock raises on purpose.

    Store failures (unreadable database, lock directory gone, server down) are
    reported with this class, never as the driver's own exception.
    """


class LockTimeout(BrokerLockError, TimeoutError):
    """The lock could not be acquired before the item's ``timeout`` ran out.

    ``name``, ``holder`` (the lease in the way, if it was still there) and ``waited``
    (seconds) let a caller report the conflict in its own words.
    """

    def __init__(
        self,
        message: str,
        *,
        name: Optional[str] = None,
        holder: Optional[Lease] = None,
        waited: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.name = name
        self.holder = holder
        self.waited = waited


class LockLost(BrokerLockError):
    """The calling thread's lease ended before it released or extended it.

    It expired, was taken over by the next waiter, or was broken by
    ``release --force``: the critical section was not protected to its end.
    """
