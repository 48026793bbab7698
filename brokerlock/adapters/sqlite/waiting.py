"""A waiter's place in the queue of an SQLite store, as one object with its state.

The state a waiter carries between its looks at the store is its ``ticket`` (its place
in ``brokerlock_waiters``, ``None`` while it has none) and when that place must be
renewed. The place is left by token (``SQLiteAdapter._leave``), never by ticket, so
whichever step an interrupt cuts short, the one cleanup finds what is ours.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Optional, Tuple

from ..._platform import WAKEUP
from ..base import Lease, Request
from ..embedded.store import Renewal, entry_life
from . import sql

if TYPE_CHECKING:
    from ..embedded.liveness import Watch
    from .adapter import SQLiteAdapter

#: What a step tells ``Bells.wait_turn``: the lease if taken, when the current lease
#: expires, a bell to ring, and whose death to watch (``embedded.liveness``).
Step = Tuple[Optional[Lease], Optional[float], Optional[str], "Watch"]
#: Whether a waiter needs to know whom to watch: only where no inotify tells it of
#: every death in the store.
_WATCHES = WAKEUP in ("fifo", "event")
#: ``sql.HOLDER``'s row and, for a waiter that watches deaths, the nearest waiter ahead
#: of its ticket ("witness pid", or NULL when it heads the queue), in one read: a
#: statement more per look costs contended hand-overs on 2 cores a few per cent.
_HOLDER_AND_AHEAD = (
    f"SELECT {sql.COLUMNS}, (SELECT COALESCE(w.witness, '') || ' ' || COALESCE(w.pid, '') "
    "FROM brokerlock_waiters w WHERE w.name = l.name AND w.ticket < ? AND w.until > ? "
    "ORDER BY w.ticket DESC LIMIT 1) FROM brokerlock_locks l WHERE l.name = ?"
)


class QueuePlace:
    def __init__(
        self, store: SQLiteAdapter, request: Request, witness: Optional[str],
        bell: Optional[str], life: float, *, newcomer: bool = False,
    ) -> None:
        self.store = store
        self.request = request
        #: When our place must be renewed, lest others prune it.
        self.renewal = Renewal(entry_life(witness, life))
        #: Our place in the queue; ``None``: not queued (yet, or any more: a grant or our
        #: own take removed it).
        self.ticket: Optional[int] = None
        #: No attempt was made before the wait: the first look takes the lock as a
        #: newcomer would, or queues, in one write transaction (``_take_or_join``).
        self.newcomer = newcomer
        #: Whether a statement that queues us may have been committed: if none was (the
        #: store stayed busy until the wait was over), there is nothing to leave, and a
        #: departure would only wait for the busy store in vain.
        self.maybe_queued = False
        self.entry = {
            "name": request.name, "token": request.token, "witness": witness, "bell": bell,
            "ttl": request.ttl, "host": request.host, "pid": request.pid,
            "thread": request.thread,
        }

    def join(self, conn: sqlite3.Connection, now: float) -> None:
        """Take a place at the end of the queue (again)."""
        until = now + self.renewal.life
        cursor = conn.execute(sql.JOIN_QUEUE, {**self.entry, "until": until})
        self.maybe_queued = True
        self.ticket = cursor.fetchone()[0]
        self.renewal.done(now)

    def step(self, conn: sqlite3.Connection) -> Step:
        """One look at the store: the lease if we have it or can take it now."""
        store, request = self.store, self.request
        name, token = request.name, request.token
        now = store._clock()
        if self.ticket is None and self.newcomer:
            lease = self._take_or_join(conn, now)
            if lease is not None:
                return lease, None, None, None
        elif self.ticket is None:
            self.join(conn, now)
        elif self.renewal.due(now):
            if conn.execute(
                "UPDATE brokerlock_waiters SET until = ? WHERE ticket = ?",
                (now + self.renewal.life, self.ticket),
            ).rowcount:
                self.renewal.done(now)
            else:
                # Granted the lock (see below), or our place ran out while we could not
                # renew it (a pause, a clock step) and someone pruned it: then queue
                # again rather than wait for nothing.
                holder = conn.execute(sql.HOLDER, (name,)).fetchone()
                if holder is not None and holder[1] == token and live(holder, now):
                    self.ticket = None
                    return store._lease(holder), None, None, None
                self.join(conn, now)
        # A read first, which never waits for SQLite's write lock: granted (its news
        # lost), or held by a live holder (then sleep until the bell or its expiry).
        # It must come after the join: a release from then on finds us and rings.
        ahead: Optional[str] = None
        if _WATCHES and self.ticket is not None:
            row = conn.execute(_HOLDER_AND_AHEAD, (self.ticket, now, name)).fetchone()
            holder, ahead = (None, None) if row is None else (row[:-1], row[-1])
        else:
            holder = conn.execute(sql.HOLDER, (name,)).fetchone()
        if holder is not None and holder[1] == token:
            if live(holder, now):
                self.ticket = None
                return store._lease(holder), None, None, None
            # Granted, but the lease ran out before we learned of it (we were
            # stopped): not ours to walk in with. Our place went with the grant:
            # queue again and take the lock below like any head of the queue (what
            # follows never sleeps on this read: its lease is not live).
            self.join(conn, now)
        if (
            holder is not None
            and holder[1] is not None
            and live(holder, now)
            and store._witness.is_alive(holder[8])
        ):
            return None, holder[4], None, _watch(holder, ahead) if _WATCHES else None
        # Free, run out or its holder dead: take it if we head the queue, in one
        # statement; dead waiters ahead of us make it fail, and are pruned below.
        params = store._params(request)
        row = conn.execute(sql.ACQUIRE_HEAD, params).fetchone()
        if row is not None:
            self.ticket = None  # the trigger took us out of the queue
            return store._new_lease(request, params, int(row[0])), None, None, None
        return self._turn(conn, params)

    def _take_or_join(self, conn: sqlite3.Connection, now: float) -> Optional[Lease]:
        """A newcomer's take (free, nobody queued), or else its place in the queue, in
        one transaction: one turn at SQLite's write lock instead of two. A dead holder
        is not taken from here: the step goes on as any queued waiter's."""
        store, request = self.store, self.request
        params = store._params(request)
        try:
            conn.execute("BEGIN IMMEDIATE")  # (inside the try: see _turn)
            self.maybe_queued = True
            row = conn.execute(sql.ACQUIRE_NEW, params).fetchone()
            ticket = None
            if row is None:
                until = now + self.renewal.life
                ticket = conn.execute(sql.JOIN_QUEUE, {**self.entry, "until": until}).fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.newcomer = False
        if row is not None:
            return store._new_lease(request, params, int(row[0]))
        self.ticket = ticket
        self.renewal.done(now)
        return None

    def _turn(self, conn: sqlite3.Connection, params: Any) -> Step:
        """The careful way, in a write transaction: take the lock if it is our turn,
        and drop the dead waiters ahead of us."""
        store, name, token = self.store, self.request.name, self.request.token
        try:
            # (BEGIN inside the try: an interrupt right after it must not leave the
            # connection in a transaction that keeps SQLite's write lock from all.)
            conn.execute("BEGIN IMMEDIATE")
            head, dead = store._head(conn, name, params["now"])
            busy, expires = store._holder(conn, name, params["now"])
            turn = not busy and head is not None and head[0] == token
            fence = store._take(conn, params, newcomer=False) if turn else None
            if fence is not None:
                conn.execute("DELETE FROM brokerlock_waiters WHERE ticket = ?", (self.ticket,))
            store._delete_waiters(conn, dead)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if fence is not None:
            self.ticket = None
        # Dead waiters ahead were dropped: if the lock is free, tell the new head.
        wake = head[1] if dead and head is not None and not busy and fence is None else None
        lease = store._new_lease(self.request, params, fence)
        # (Whom to watch is not known here: the net covers this passing state.)
        return lease, expires, wake, None


def live(holder: Tuple[Any, ...], now: float) -> bool:
    """Whether the lease in a ``sql.HOLDER`` row has not run out."""
    return holder[4] is None or bool(holder[4] > now)


def _watch(holder: Tuple[Any, ...], ahead: Optional[str]) -> Watch:
    """Whose death a waiter behind the live ``holder`` watches (``liveness``): the
    holder, and the nearest waiter ``ahead`` of it; pids are those of their
    processes (``Request.pid``)."""
    peers = []
    if ahead:
        mark, _, pid = ahead.partition(" ")
        peers.append((mark or None, int(pid) if pid.isdigit() else None))
    return (holder[8], holder[6]), peers
