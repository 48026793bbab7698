"""An acquisition in flight, and the one cleanup path every back end uses.

The invariant this module keeps: at every bytecode of an acquire or a release, also
when an exception or a ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``, an
exception raised by a signal handler) lands there, the lease is either

* held by the calling thread (its item says ``acquired``, and ``release()`` frees it), or
* free in the store, with no queue place of ours left to stall the waiters behind it.

Why this can be kept simply: a token is made afresh for every acquisition and never
reused, so "leave the queue, and release the lease if this token holds it" cannot
touch anybody else's lease and is safe to run at any moment, any number of times
(``Adapter.abandon``). Whatever an interrupt left half done (a place in the queue, a
lease granted but not yet handed to the thread, a release not yet sent), running
``abandon`` with the token to the end puts the store right. So the state below needs
no finer steps than the four a reader can reason about, and the cleanup is one call.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable, Optional

from .._log import log
from ..errors import BrokerLockError

if TYPE_CHECKING:
    from .base import Adapter, Lease, Request


#: How often a cleanup is tried again when interrupts keep landing inside it. Each try
#: is one or two store round trips; interrupts that come faster than that for this long
#: leave the acquisition pending, and the next call on the item finishes it.
CLEANUP_TRIES = 20


class State(enum.Enum):
    #: Asked the store; may be queued (waiting), may even have been granted already.
    QUEUED = "queued"
    #: The store gave us the lease; the calling thread does not own it yet.
    GRANTED = "granted"
    #: The calling thread owns the lease: recorded where ``release()`` finds it.
    OWNED = "owned"
    #: Over: released, abandoned, or never got anything. Nothing left in the store.
    RELEASED = "released"


class Acquisition:
    """One acquisition of ``request.name`` with ``request.token``, from asking to owning.

    Cleanup (:meth:`abandon`) is only for the states before ``OWNED``: an owned lease
    is the holder's to release. It is idempotent: the state becomes ``RELEASED`` only
    after the store confirmed, so an interrupted cleanup is simply run again.
    """

    __slots__ = ("adapter", "lease", "request", "state")

    def __init__(self, adapter: Adapter, request: Request) -> None:
        self.adapter = adapter
        self.request = request
        self.state = State.QUEUED
        self.lease: Optional[Lease] = None

    @property
    def name(self) -> str:
        return self.request.name

    @property
    def token(self) -> str:
        return self.request.token

    @property
    def pending(self) -> bool:
        """Whether the store may hold something of ours that nobody owns."""
        return self.state is State.QUEUED or self.state is State.GRANTED

    def granted(self, lease: Lease) -> None:
        self.lease = lease
        self.state = State.GRANTED

    def owned(self) -> None:
        self.state = State.OWNED

    def disowned(self) -> None:
        """The thread gave up what it owned before its caller saw it: clean it up."""
        if self.state is State.OWNED:
            self.state = State.GRANTED

    def abandoned(self) -> None:
        """The store gave us nothing and keeps nothing of ours (a timeout, a refusal)."""
        self.state = State.RELEASED

    def abandon(self) -> bool:
        """Leave the queue and free a lease granted to us; whether it is done."""
        if not self.pending:
            return True
        if settle(lambda: self.adapter.abandon(self.name, self.token), self.name):
            self.state = State.RELEASED
            return True
        return False

    def __repr__(self) -> str:
        return f"<Acquisition {self.name!r} {self.state.value}>"


def settle(cleanup: Callable[[], object], name: str) -> bool:
    """Run ``cleanup`` to its end despite interrupts landing inside it.

    For the cleanups of this module, which are safe to run again from the start. An
    interrupt (any exception but a store's error) makes it run again, up to
    ``CLEANUP_TRIES`` times; the caller re-raises the *first* exception, the one that
    sent it here, once this returns. A store error ends it: the store cannot be
    reached, and what we left there ends by itself (a queue place lapses, a lease by
    its ttl, everything with our process or session). ``False`` when it could not
    finish for interrupts: the caller keeps the state so that it is finished later.
    """
    for _try in range(CLEANUP_TRIES):
        try:
            cleanup()
            return True
        except BrokerLockError as exc:
            log.warning("could not clean up after an interrupted call on %r: %s", name, exc)
            return True
        except BaseException:  # an interrupt inside the cleanup: run it again
            continue
    return False
