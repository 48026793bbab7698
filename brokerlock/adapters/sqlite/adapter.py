"""SQLite store: one row per lock name, changed by single atomic statements.

Acquire is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <free> RETURNING fence``
(or a plain ``UPDATE`` of a row the adapter kept free, see ``sql.ACQUIRE_KEPT``).
A row freed while nobody waits is kept free for the name's next cycle and deleted later
by the adapter that freed it (see ``embedded.deferred``), and the store's fence floor
keeps its fence (see ``sql``), so the fence of a name keeps growing across releases,
processes and restarts while the table holds the names in use and a few recently
freed. A holder's process is proved alive by its witness byte (see
``embedded.witness``), so a killed holder's lock is free at once. Waiters queue in a
table; a release grants the lock to the first live one in the same statement and
rings its bell (see ``embedded.bells``).
Connections and retries: ``sqlite.conn``.

Good for one host. SQLite's locking is unreliable on NFS and other network file
systems: use Redis or PostgreSQL for locks shared between hosts.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..._log import log
from ...errors import BrokerLockError
from ..base import Lease, Request, clock_fence
from ..embedded.files import ensure_private_dir
from ..embedded.store import EmbeddedStore
from . import sql
from .conn import RECLAIM_PATIENCE, SQLiteConnections, _busy, _OutOfTime, _prepare_database_file, reclaim_rows
from .handover import HandOver
from .pool import Pool
from .waiting import QueuePlace

#: How long a waiter's place without a witness mark lasts unless renewed (see
#: ``embedded.store.entry_life``).
QUEUE_ENTRY_LIFE = 6.0


class SQLiteAdapter(HandOver):
    """Locks of the processes of one host, in a SQLite database file.

    ``path`` names the database, created (with its directory, ``0700``) if missing;
    beside it live ``<path>-witness`` and the ``<path>-bells`` directory. Keep it on a
    local disk, not NFS. Leases are counted on the host's boot clock, so wall-clock steps
    move none (see the clocks page); ``clock`` (seconds since the epoch) replaces that
    clock, for tests.
    ``ValueError`` for ``":memory:"`` or a ``file:`` URI, :class:`~brokerlock.BrokerLockError`
    when the database cannot be opened or is not one.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Optional[Callable[[], float]] = None
    ) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or not path or path == ":memory:" or path.startswith("file:"):
            raise ValueError(
                f"SQLiteAdapter needs the path of a database file, not {path!r} "
                "(for an in-process store use MemoryAdapter)"
            )
        directory, base = os.path.split(os.path.abspath(path))
        directory = ensure_private_dir(directory)
        self.path = os.path.join(os.path.realpath(directory), base)
        self.url = "sqlite:///" + self.path
        self._store_id = "sqlite://" + os.path.realpath(self.path)
        self._pool = Pool()
        _prepare_database_file(self.path)
        super().__init__(self.path + "-witness", self.path + "-bells", clock)
        self._run("open the database", lambda conn: None)

    def _reclaimer(self) -> Callable[[List[str]], None]:
        return functools.partial(reclaim_rows, self.path)

    def _reclaim(self, names: List[str]) -> None:
        # With a connection of the pool: a release of a one-off name pushes a name out
        # of the set each time. The write lock is waited for like any statement's, but
        # not for a wedged writer's 30 s after a release that succeeded: a name given
        # up on keeps its row (free), as after a crash.
        def delete(conn: sqlite3.Connection) -> None:
            conn.executemany(sql.RECLAIM, [(name,) for name in names])

        try:
            self._run("remove free rows", delete, time.monotonic() + RECLAIM_PATIENCE)
        except (BrokerLockError, _OutOfTime) as exc:
            log.debug("%s: could not remove %d free rows: %r", self.url, len(names), exc)

    def close(self) -> None:
        EmbeddedStore.close(self)  # the kept rows go first, with a connection of their own
        SQLiteConnections.close(self)

    def _read_pin(self) -> float:
        # (Every new connection reads it too: see sqlite.conn.)
        return float(self._run("read the store's clock", self._pin))

    def _params(self, request: Request) -> dict[str, Any]:
        now = self._clock()
        return {
            "name": request.name, "token": request.token, "now": now, "clock_fence": clock_fence(),
            "expires": None if request.ttl is None else now + request.ttl,
            "host": request.host, "pid": request.pid, "thread": request.thread,
            "witness": self._witness.mine(),
        }

    @staticmethod
    def _lease(row: Tuple[Any, ...]) -> Lease:
        name, token, fence, acquired_at, expires_at, host, pid, thread, _w = row
        return Lease(name, token, fence, acquired_at, expires_at, host, pid, thread)

    # -- the contract -----------------------------------------------------------
    def _take(self, conn: sqlite3.Connection, params: Dict[str, Any], newcomer: bool) -> Optional[int]:
        """Take the lock if it is free or its holder dead; a newcomer only when no one
        is queued (a waiter has checked its turn itself)."""
        row = conn.execute(sql.ACQUIRE_NEW if newcomer else sql.ACQUIRE_TURN, params).fetchone()
        if row is not None:
            return int(row[0])
        holder = conn.execute(
            "SELECT token, witness FROM brokerlock_locks WHERE name = ?", (params["name"],)
        ).fetchone()
        if holder is None or holder[0] is None or self._witness.is_alive(holder[1]):
            return None
        take = sql.TAKE_FROM_DEAD_NEW if newcomer else sql.TAKE_FROM_DEAD_TURN
        row = conn.execute(take, {**params, "dead": holder[0]}).fetchone()
        return None if row is None else int(row[0])

    def _new_lease(self, request: Request, params: Dict[str, Any], fence: Optional[int]) -> Optional[Lease]:
        if fence is None:
            return None
        return Lease(
            request.name, request.token, fence, params["now"], params["expires"],
            request.host, request.pid, request.thread,
        )

    def try_acquire(self, request: Request) -> Optional[Lease]:
        # One attempt; a store that stays busy (a writer stopped mid-transaction) is
        # reported after a second rather than waited for.
        try:
            return self._try_acquire(request, time.monotonic() + 1.0)
        except _OutOfTime:
            raise BrokerLockError(
                f"{self.url}: could not acquire {request.name!r}: database is locked"
            ) from None

    def _take_if_free(self, request: Request, params: Dict[str, Any]) -> Optional[Lease]:
        """The common case, a free lock, in one statement without the retry machinery;
        a busy or failing store raises, for the caller's careful path to retry or report."""
        row = None
        if request.name in self._deferred:  # (its row is most likely there, and free)
            row = self._execute(sql.ACQUIRE_KEPT, params)
        if row is None:
            row = self._execute(sql.ACQUIRE_NEW, params)
        return None if row is None else self._new_lease(request, params, int(row[0]))

    def _try_acquire(self, request: Request, deadline: Optional[float]) -> Optional[Lease]:
        """One attempt; ``_OutOfTime`` if the store stays busy past ``deadline``."""
        params = self._params(request)
        try:
            lease = self._take_if_free(request, params)
        except (sqlite3.Error, OSError):
            lease = None  # busy or a fault: the careful path below retries or reports it
        if lease is not None:
            return lease

        def attempt(conn: sqlite3.Connection) -> Optional[int]:
            fence = self._take(conn, params, newcomer=True)
            if fence is None and self._prune(conn, request.name, params["now"]):
                fence = self._take(conn, params, newcomer=True)
            return fence

        return self._new_lease(request, params, self._run(f"acquire {request.name!r}", attempt, deadline))

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        """FIFO: a waiter queues in ``brokerlock_waiters`` and takes the lock only at the
        queue's head, woken by its bell (see ``embedded.bells``). Waiters look with reads, which
        never block in WAL mode, and write only when it is their turn, so a crowd of
        waiters does not fight over SQLite's write lock."""
        if timeout == 0:
            return self.try_acquire(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        bells = self._bells_made
        # A thread whose last wait here found the lock taken (Bells.armed): its first
        # look takes the lock if free or queues, in one write transaction (every write
        # is a turn at SQLite's write lock, which the holder's release may wait for).
        newcomer = bells is not None and bells.armed()
        if not newcomer:
            params = self._params(request)
            try:
                lease = self._take_if_free(request, params)  # else the queue's business below
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    # Others are writing, so the lock is most likely contended: queue
                    # (the first look takes it if free) rather than retry a newcomer's
                    # statement against every writer in the way.
                    newcomer, lease = True, None
                else:
                    lease = self._report_or_take(request, deadline)
            except (sqlite3.Error, OSError):
                lease = self._report_or_take(request, deadline)
            if lease is not None:
                return lease
        name, token = request.name, request.token
        witness = self._witness.mine()  # also creates the witness file the waiter watches
        bell = self._bells.make()
        place = QueuePlace(self, request, witness, bell, QUEUE_ENTRY_LIFE, newcomer=newcomer)
        taken: Optional[Lease] = None
        try:
            taken = self._bells.wait_turn(
                bell,
                deadline,
                self._clock,
                lambda: self._run(f"acquire {name!r}", place.step, deadline),
                lambda news: self._granted(request, news),
                steady=self._pinned,
            )
            return taken
        except _OutOfTime:
            return None
        finally:
            if taken is None and place.maybe_queued:
                # By token: our place, and a lock a release granted us meanwhile, go on
                # to the next waiter (an interrupt gets the same from Adapter.abandon).
                self._leave(name, token)

    def _report_or_take(self, request: Request, deadline: Optional[float]) -> Optional[Lease]:
        """After a fault of the lone statement: the careful attempt, which retries or
        reports it before a waiter makes its bell and queues."""
        try:
            return self._try_acquire(request, deadline)
        except _OutOfTime:  # the store stayed busy until the wait was over
            return None

    def abandon(self, name: str, token: str) -> None:
        # (A transaction an interrupt left open is rolled back as its connection goes
        # back to the pool: see SQLiteConnections._give_back.)
        self._leave(name, token)

    def _leave(self, name: str, token: str) -> None:
        """Take a waiter that gives up out of the queue, and free a lease ``token`` holds
        (a release may have granted it the lock in the meantime): the lock goes on to
        the next waiter. By token, not ticket: safe to run again, and whatever step
        of the queue an interrupt cut short."""

        def leave(conn: sqlite3.Connection) -> Optional[str]:
            conn.execute("DELETE FROM brokerlock_waiters WHERE name = ? AND token = ?", (name, token))
            return self._next_bell(conn, name)

        bell = self._run(f"leave the queue of {name!r}", leave)
        if bell:
            self._bells.ring(bell)
        self._free(name, token, "pass on")

    def release(self, name: str, token: str) -> bool:
        # The token is cleared but expires_at kept, so the row reports whether the lease
        # had run out before the release: nobody took it yet, so clearing it hurts no
        # one, but the caller must hear that its lease had ended.
        row = self._free(name, token, "release")
        return row is not None and (row[0] is None or row[0] > self._clock())

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        now = self._clock()
        expires = None if ttl is None else now + ttl
        row = self._run(
            f"extend {name!r}",
            lambda conn: conn.execute(
                f"UPDATE brokerlock_locks SET expires_at = :expires "
                f"WHERE name = :name AND token = :token AND {sql.LIVE} RETURNING {sql.COLUMNS}",
                {"expires": expires, "name": name, "token": token, "now": now},
            ).fetchone(),
        )
        return None if row is None else self._lease(row)

    def _live_rows(self, where: str, params: dict[str, Any]) -> List[Lease]:
        params = {**params, "now": self._clock()}
        rows = self._run(
            "read the locks",
            lambda conn: conn.execute(
                f"SELECT {sql.COLUMNS} FROM brokerlock_locks WHERE {sql.LIVE} {where} ORDER BY name",
                params,
            ).fetchall(),
        )
        return [self._lease(row) for row in rows if self._witness.is_alive(row[8])]

    def get(self, name: str) -> Optional[Lease]:
        leases = self._live_rows("AND name = :name", {"name": name})
        return leases[0] if leases else None

    def list(self) -> List[Lease]:
        return self._live_rows("", {})

    def force_release(self, name: str) -> bool:
        lease = self.get(name)
        return lease is not None and self._free(name, lease.token, "break") is not None
