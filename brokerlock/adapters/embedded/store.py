"""What the embedded stores (SQLite, lock files) share: the host's clock (see
``embedded.clock``), the process witness, the bells of their waiters and the news of a
grant a bell carries."""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..base import Adapter, Lease, Request
from .clock import BOOT_ID, boot_clock
from .deferred import Deferred
from .witness import Witness, witness_for

if TYPE_CHECKING:
    from .bells import Bells


#: How long a waiter's place in the queue lasts unless renewed, which the waiter does
#: while it waits; bounds the stall a waiter that vanished without a trace can cause.
QUEUE_ENTRY_LIFE = 6.0
#: The same for a place that carries its process's witness mark. A killed waiter's place
#: is then dropped at once (its byte is free), so the deadline only bounds a place a live
#: process leaked (a failed departure): renewing it every 2 s would be most of what a
#: blocked waiter costs.
WITNESSED_ENTRY_LIFE = 60.0


def entry_life(witness: Optional[str], unwitnessed: float = QUEUE_ENTRY_LIFE) -> float:
    """How long a waiter's queue place with this ``witness`` mark lives unrenewed."""
    return unwitnessed if witness is None else max(unwitnessed, WITNESSED_ENTRY_LIFE)


class Renewal:
    """When a waiter's queue place (deadline: the store's clock + ``life``) is due for
    renewal: after a third of its life on the monotonic clock, or on the store's clock,
    whichever comes first. A place written while the wall clock was stepped back looks
    run out once the clock is corrected: the waiter must renew it at its next look, not
    a monotonic third of a long life later, or it waits behind nobody."""

    def __init__(self, life: float) -> None:
        self.life = life
        self._by_ticks = 0.0
        self._by_clock = float("-inf")

    def due(self, now: float) -> bool:
        return time.monotonic() >= self._by_ticks or now >= self._by_clock

    def done(self, now: float) -> None:
        """Record a renewal to ``now + life`` made at store time ``now``."""
        self._by_ticks = time.monotonic() + self.life / 3
        self._by_clock = now + self.life / 3


class EmbeddedStore(Adapter):
    #: Set by each store before ``__init__`` runs: its path resolved once, since every
    #: item asks for it and ``realpath`` costs syscalls (a handle on Windows) each time.
    _store_id: str

    @property
    def store_id(self) -> str:
        return self._store_id

    def __init__(
        self, witness_path: str, bells_dir: str, clock: Optional[Callable[[], float]] = None
    ) -> None:
        # The store's time: by default the host's boot clock, pinned in the store to
        # the wall clock once per boot (``_read_pin``); a clock given is used as it is.
        self._offset: Optional[float] = None
        self._pinned = clock is None and bool(BOOT_ID)
        self._clock: Callable[[], float] = (
            self._pinned_clock if self._pinned else clock if clock is not None else time.time
        )
        self._witness: Witness = witness_for(witness_path, bells_dir)
        self._bells_dir = bells_dir
        self._bells_made: Optional[Bells] = None
        #: Names whose free records this adapter kept (see ``embedded.deferred``); the
        #: store removes them when closed, dropped, or at the interpreter's exit.
        self._deferred = Deferred(self._reclaimer())
        weakref.finalize(self, self._deferred.flush)
        #: Grants of a lock that this adapter's releases and departures wrote and may
        #: not have rung yet, by name. Noted before the store changes and dropped once
        #: the ring is done, so an interrupt landing anywhere in between (after the
        #: write, at the ring's first line) leaves the note behind; the release or
        #: departure that runs again after an interrupt (``lock``, ``inflight.settle``
        #: always run one again) finds its lease gone, sees the note and rings the
        #: waiter the store shows then. Without it that waiter slept until its safety
        #: net (seconds), which the interrupt fuzz test saw. A ring too many only
        #: wakes a waiter once for nothing: the store, not the ring, is the truth.
        self._unrung: Dict[str, Any] = {}

    def _reclaimer(self) -> Callable[[List[str]], None]:
        """A function that removes the free, unwaited records of the names it is given,
        for ``Deferred``: it must not hold the adapter (see there)."""
        raise NotImplementedError

    def _kept_free(self, name: str) -> None:
        """``name``'s record was left free with no queue: remember it, and remove the
        record of the name that pushes out of the set (see ``embedded.deferred``)."""
        evicted = self._deferred.freed(name)
        if evicted:
            self._reclaim(evicted)

    def _reclaim(self, names: List[str]) -> None:
        """Remove the free, unwaited records of ``names`` now (a store may do it with
        what the adapter has open; the ``_reclaimer`` must do without)."""
        self._deferred.reclaim(names)

    def close(self) -> None:
        self._deferred.flush()

    def now(self) -> float:
        return self._clock()

    def _pinned_clock(self) -> float:
        offset = self._offset
        if offset is None:
            offset = self._offset = self._read_pin()
        return offset + boot_clock()

    def _read_pin(self) -> float:
        """The offset from the boot clock to the store's time that the store keeps for
        this boot, pinned now if no process of this boot has yet (``clock.new_pin``)."""
        raise NotImplementedError

    def on_wall_clock(self, lease: Lease) -> Lease:
        # The store's time is the wall clock of the moment the boot's pin was taken: it
        # parts from the wall clock only by the steps the wall clock took since.
        if not self._pinned:
            return lease
        shift = time.time() - self._clock()
        expires = None if lease.expires_at is None else lease.expires_at + shift
        return lease._replace(acquired_at=lease.acquired_at + shift, expires_at=expires)

    def _granted(self, request: Request, news: bytes) -> Optional[Lease]:
        """The lease that a bell's ``news`` grants ``request``, if the news is of a grant
        to it (see ``grant_news``) and its lease has not run out: a waiter stopped
        between the ring and its reading of the news must not walk in on whoever took
        the lock after its lease; the store then tells it where it stands."""
        try:
            text = news.decode("ascii").split(";", 1)[0]
            if not text.startswith("G"):
                return None
            token, fence, acquired, expires = text[1:].split(",")
            if token != request.token:
                return None  # news of an earlier wait, or a torn ring: the store decides
            until = None if expires == "None" else float(expires)
            if until is not None and until <= self._clock():
                return None
            return Lease(
                request.name, token, int(fence), float(acquired), until,
                request.host, request.pid, request.thread,
            )
        except ValueError:
            return None

    @property
    def _bells(self) -> Bells:
        # Loaded when first needed (a wait, or a release with someone waiting): an
        # uncontended cron job does not pay for inotify's ctypes at start-up.
        if self._bells_made is None:
            from .bells import Bells

            self._bells_made = Bells(self._bells_dir, self._witness.path)
        return self._bells_made


def grant_news(
    token: str, fence: int, acquired_at: float, expires_at: Optional[float],
    number: Callable[[float], str] = repr,
) -> bytes:
    """What a release rings into the bell of the waiter it granted the lock to; its
    time stamps printed by ``number``, which must give them back exactly (the lock
    file's stamps have a cheaper way than ``repr``).

    The store is the truth and the news only spares the waiter a look at it: a waiter
    that cannot read its news (a plain ring overwrote it, a token of another wait)
    finds the grant in the store instead.
    """
    expires = "None" if expires_at is None else number(expires_at)
    return f"G{token},{fence},{number(acquired_at)},{expires};".encode("ascii", "replace")
