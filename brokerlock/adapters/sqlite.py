"""SQLite store: one row per lock name, changed by single atomic statements.

Acquire is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <free> RETURNING fence``.
Rows are never deleted (release only clears the token), so the fence of a name keeps
growing across releases, processes and restarts. A holder's process is proved alive by
its witness byte (see ``_witness``), so a killed holder's lock is free at once; waiters
are woken by inotify on the database's WAL, which every commit writes.

Good for one host. SQLite's locking is unreliable on NFS and other network file
systems: use Redis or PostgreSQL for locks shared between hosts.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import stat
import threading
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

from ..errors import BrokerLockError
from . import _sqlite_sql as sql
from ._embedded import EmbeddedStore, grant_news
from ._files import ensure_private_dir, open_private
from .base import Lease, Request, clock_fence

log = logging.getLogger("brokerlock")


class _OutOfTime(Exception):
    """The store stayed busy until the caller's wait was over: a timeout, not a fault."""


def _busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message


#: How long one statement may wait for SQLite's write lock before we report the store
#: as stuck; contention is microseconds, so this only trips on a wedged writer.
BUSY_TIMEOUT = 30.0
#: How long a waiter's place in the queue lasts unless renewed, which the waiter does
#: while it waits; bounds the stall a waiter that vanished without a trace can cause.
QUEUE_ENTRY_LIFE = 6.0


def _prepare_database_file(path: str) -> None:
    """Refuse a symlink at ``path``; create a missing database file 0600.

    An existing database is never opened here: SQLite keeps POSIX locks on it, and
    closing *any* descriptor of the file would silently drop every lock this process
    holds on it, including those of another adapter's open connection (then SQLite
    reports "disk I/O error", or worse, two writers meet).
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        try:
            os.close(open_private(path, os.O_RDWR | os.O_EXCL))
        except BrokerLockError:
            if not os.path.isfile(path) or os.path.islink(path):
                raise  # not the benign race of two adapters creating it at once
        return
    except OSError as exc:
        raise BrokerLockError(f"cannot use database {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise BrokerLockError(
            f"refusing to open {path}: it is a symbolic link, which a lock database never is"
        )
    if not stat.S_ISREG(info.st_mode):
        raise BrokerLockError(f"cannot use database {path}: it is not a regular file")


class SQLiteAdapter(EmbeddedStore):
    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
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
        self._local = threading.local()
        _prepare_database_file(self.path)
        super().__init__(self.path + "-witness", self.path + "-bells", clock)
        self._run("open the database", lambda conn: None)

    # -- plumbing ---------------------------------------------------------------
    def _conn(self, check_file: bool = True) -> sqlite3.Connection:
        """This thread's connection, made anew after fork() or when the database file
        was deleted or replaced: a connection keeps the old inode open, and locks taken
        in a ghost file would exclude nobody.

        Without ``check_file`` the file is not looked at (a stat() is a tenth of a
        release): a release only clears the caller's own lease, and a file replaced
        under it holds no lease of the caller's to clear.
        """
        conn: Optional[sqlite3.Connection] = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            if not check_file:
                return conn
            try:
                info = os.stat(self.path)
            except OSError:
                info = None
            if info is not None and info.st_ino == self._local.ino and info.st_dev == self._local.dev:
                return conn
            log.warning("database %s was deleted or replaced; reconnecting", self.path)
            conn.close()
        # (A connection inherited across fork() is dropped unclosed: it is the parent's.)
        _prepare_database_file(self.path)
        conn = sqlite3.connect(
            self.path, timeout=0, isolation_level=None, check_same_thread=True
        )
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            self._setup(conn)
            info = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self._local.conn, self._local.pid = conn, os.getpid()
        self._local.dev, self._local.ino = info.st_dev, info.st_ino
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        """WAL and the schema, idempotent and safe when many processes start at once.

        Changing the journal mode and creating tables can meet a lock that SQLite's busy
        handler does not wait for (another process converting the file at that moment),
        so those steps are retried here; each is skipped when already done, so a busy
        store is opened with reads only.
        """
        give_up = time.monotonic() + BUSY_TIMEOUT
        delay = 0.001
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    if str(mode).lower() != "wal":
                        raise sqlite3.OperationalError(f"cannot switch to WAL (journal mode is {mode})")
                present = conn.execute(sql.SCHEMA_CHECK, sql.SCHEMA_NAMES).fetchone()[0]
                if present != len(sql.SCHEMA_NAMES) + 2:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        for statement in sql.SCHEMA:
                            conn.execute(statement)
                        for table, column in sql.NEW_COLUMNS:
                            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                            if column.split()[0] not in have:
                                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > give_up:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _run(
        self, action: str, fn: Callable[[sqlite3.Connection], Any], deadline: Optional[float] = None
    ) -> Any:
        """Run ``fn`` on this thread's connection; retry it while SQLite is busy, for up
        to BUSY_TIMEOUT or until the monotonic ``deadline`` of the caller's wait.

        SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries: each time two
        writers meet, a hand-over would cost milliseconds. Our writers hold the write
        lock for one short statement, so ``fn`` is retried after tens of microseconds
        instead. Every ``fn`` here is safe to retry: a busy statement did nothing, and
        none goes on after a write that succeeded.
        """
        delay = 0.00002
        give_up = 0.0
        while True:
            try:
                return fn(self._conn())
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    self._fail(action, exc)
                now = time.monotonic()
                if not give_up:
                    give_up = now + BUSY_TIMEOUT
                if deadline is not None and now > deadline:
                    raise _OutOfTime from None
                if now > give_up:
                    self._fail(action, exc)
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.005)
            except sqlite3.DatabaseError as exc:
                self._fail(action, exc)
            except OSError as exc:
                raise BrokerLockError(f"{self.url}: could not {action}: {exc}") from None

    def _fail(self, action: str, exc: sqlite3.DatabaseError) -> NoReturn:
        """Report a database error, naming the store and what we were doing."""
        # A connection that met a fault (a read-only or damaged file, a full disk) can
        # keep its view of it; the next call starts afresh, so that it works as soon as
        # the fault is repaired.
        self._drop_connection()
        message = str(exc)
        if "not a database" in message or "malformed" in message:
            message = f"{message} (is {self.path} an SQLite database brokerlock may use?)"
        raise BrokerLockError(f"{self.url}: could not {action}: {message}") from None

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

    def _try_acquire(self, request: Request, deadline: Optional[float]) -> Optional[Lease]:
        """One attempt; ``_OutOfTime`` if the store stays busy past ``deadline``."""
        params = self._params(request)
        try:  # the common case, a free lock, in one statement and no retry machinery
            row = self._conn().execute(sql.ACQUIRE_NEW, params).fetchone()
        except (sqlite3.Error, OSError):
            row = None  # busy or a fault: the careful path below retries or reports it
        if row is not None:
            return self._new_lease(request, params, int(row[0]))

        def attempt(conn: sqlite3.Connection) -> Optional[int]:
            fence = self._take(conn, params, newcomer=True)
            if fence is None and self._prune(conn, request.name, params["now"]):
                fence = self._take(conn, params, newcomer=True)
            return fence

        return self._new_lease(request, params, self._run(f"acquire {request.name!r}", attempt, deadline))

    def _head(
        self, conn: sqlite3.Connection, name: str, now: float
    ) -> Tuple[Optional[Tuple[str, Optional[str]]], List[Tuple[int, Optional[str]]]]:
        """The ``(token, bell)`` of the first live waiter, and the ``(ticket, bell)`` of
        the dead ones before it. Liveness is tested only up to the head: those behind
        it are looked at when their turn comes."""
        dead: List[Tuple[int, Optional[str]]] = []
        for ticket, token, witness, until, bell in conn.execute(
            "SELECT ticket, token, witness, until, bell FROM brokerlock_waiters "
            "WHERE name = ? ORDER BY ticket",
            (name,),
        ):
            if until > now and self._witness.is_alive(witness):
                return (token, bell), dead
            dead.append((ticket, bell))
        return None, dead

    def _delete_waiters(self, conn: sqlite3.Connection, dead: List[Tuple[int, Optional[str]]]) -> None:
        if dead:
            conn.executemany("DELETE FROM brokerlock_waiters WHERE ticket = ?", [(t,) for t, _ in dead])
            for _, bell in dead:
                if bell:
                    self._bells.discard(bell)

    def _prune(self, conn: sqlite3.Connection, name: str, now: float) -> bool:
        """Drop waiters that died or vanished; whether there were any."""
        _head, dead = self._head(conn, name, now)
        self._delete_waiters(conn, dead)
        return bool(dead)

    def _holder(self, conn: sqlite3.Connection, name: str, now: float) -> Tuple[bool, Optional[float]]:
        """Whether a live holder has ``name``, and when its lease runs out."""
        row = conn.execute(
            "SELECT token, expires_at, witness FROM brokerlock_locks WHERE name = ?", (name,)
        ).fetchone()
        busy = (
            row is not None
            and row[0] is not None
            and (row[1] is None or row[1] > now)
            and self._witness.is_alive(row[2])
        )
        return busy, (row[1] if busy else None)

    def _next_bell(self, conn: sqlite3.Connection, name: str, *, freed: bool = False) -> Optional[str]:
        """The bell of the waiter whose turn it now is, if the lock is free (as it is
        when the caller has just ``freed`` it)."""
        now = self._clock()
        head, _dead = self._head(conn, name, now)
        if head is None or (not freed and self._holder(conn, name, now)[0]):
            return None
        return head[1]

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        """FIFO: a waiter queues in ``brokerlock_waiters`` and takes the lock only at the
        queue's head, woken by its bell (see ``_bells``). Waiters look with reads, which
        never block in WAL mode, and write only when it is their turn, so a crowd of
        waiters does not fight over SQLite's write lock."""
        if timeout == 0:
            return self.try_acquire(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        params = self._params(request)
        try:  # a free lock in one statement; anything else is the queue's business below
            row = self._conn().execute(sql.ACQUIRE_NEW, params).fetchone()
        except (sqlite3.Error, OSError):
            row = None  # busy or a fault: the waiter's steps retry or report it
        if row is not None:
            return self._new_lease(request, params, int(row[0]))
        name, token = request.name, request.token
        witness = self._witness.mine()  # also creates the witness file the waiter watches
        bell = self._bells.make()
        ticket: Optional[int] = None
        refresh_at = 0.0

        entry = {
            "name": name, "token": token, "witness": witness, "bell": bell, "ttl": request.ttl,
            "host": request.host, "pid": request.pid, "thread": request.thread,
        }

        def step(conn: sqlite3.Connection) -> Tuple[Optional[Lease], Optional[float], Optional[str]]:
            nonlocal ticket, refresh_at
            now = self._clock()
            if ticket is None or time.monotonic() >= refresh_at:
                until = now + QUEUE_ENTRY_LIFE
                if ticket is None:
                    ticket = conn.execute(sql.JOIN_QUEUE, {**entry, "until": until}).fetchone()[0]
                elif not conn.execute(
                    "UPDATE brokerlock_waiters SET until = ? WHERE ticket = ?", (until, ticket)
                ).rowcount:
                    # Granted the lock (see below), or our place ran out while we could not
                    # renew it (a pause, a clock step) and someone pruned it: then queue
                    # again rather than wait for nothing.
                    holder = conn.execute(sql.HOLDER, (name,)).fetchone()
                    if holder is not None and holder[1] == token:
                        ticket = None
                        return self._lease(holder), None, None
                    ticket = conn.execute(sql.JOIN_QUEUE, {**entry, "until": until}).fetchone()[0]
                refresh_at = time.monotonic() + QUEUE_ENTRY_LIFE / 3
            # A read first, which never waits for SQLite's write lock: granted (its news
            # lost), or held by a live holder (then sleep until the bell or its expiry).
            holder = conn.execute(sql.HOLDER, (name,)).fetchone()
            if holder is not None and holder[1] == token:
                ticket = None
                return self._lease(holder), None, None
            if (
                holder is not None
                and holder[1] is not None
                and (holder[4] is None or holder[4] > now)
                and self._witness.is_alive(holder[8])
            ):
                return None, holder[4], None
            # Free, run out or its holder dead: take it if we head the queue, in one
            # statement; dead waiters ahead of us make it fail, and are pruned below.
            params = self._params(request)
            row = conn.execute(sql.ACQUIRE_HEAD, params).fetchone()
            if row is not None:
                ticket = None  # the trigger took us out of the queue
                return self._new_lease(request, params, int(row[0])), None, None
            conn.execute("BEGIN IMMEDIATE")
            try:
                head, dead = self._head(conn, name, params["now"])
                busy, expires = self._holder(conn, name, params["now"])
                turn = not busy and head is not None and head[0] == token
                fence = self._take(conn, params, newcomer=False) if turn else None
                if fence is not None:
                    conn.execute("DELETE FROM brokerlock_waiters WHERE ticket = ?", (ticket,))
                self._delete_waiters(conn, dead)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            # Dead waiters ahead were dropped: if the lock is free, tell the new head.
            wake = head[1] if dead and head is not None and not busy and fence is None else None
            return self._new_lease(request, params, fence), expires, wake

        taken: Optional[Lease] = None
        try:
            taken = self._bells.wait_turn(
                bell,
                deadline,
                self._clock,
                lambda: self._run(f"acquire {name!r}", step, deadline),
                lambda news: self._granted(request, news),
            )
            if taken is not None:
                ticket = None  # granted: the trigger took us out of the queue
            return taken
        except _OutOfTime:
            return None
        finally:
            if taken is None and ticket is not None:
                self._leave(name, token, ticket)

    def _leave(self, name: str, token: str, ticket: int) -> None:
        """Take a waiter that gives up out of the queue. A release may have granted it the
        lock in the meantime: then the lock goes on to the next waiter."""

        def leave(conn: sqlite3.Connection) -> Optional[str]:
            conn.execute("DELETE FROM brokerlock_waiters WHERE ticket = ?", (ticket,))
            return self._next_bell(conn, name)

        bell = self._run(f"leave the queue of {name!r}", leave)
        if bell:
            self._bells.ring(bell)
        self._free(name, token, "pass on")

    def _free(self, name: str, token: str, action: str) -> Optional[Tuple[Any, ...]]:
        """End ``token``'s lease of ``name`` and hand the lock to the next waiter.

        One statement grants the lock to the head of the queue, or clears it when nobody
        waits, and the head's bell carries the news of the grant: the woken waiter then
        has nothing left to do. A lease that is not the caller's, or ran out while
        others wait, goes the careful way: cleared, then granted, step by step.
        """
        params = {"name": name, "token": token, "now": self._clock()}

        def hand_over(conn: sqlite3.Connection, head: Optional[str]) -> Tuple[Optional[str], bytes]:
            if head is None:
                return None, b""
            bell, witness, waiter = head.split(" ", 2)
            if not self._witness.is_alive(witness or None):
                return self._next_bell(conn, name, freed=True), b"\1"
            grant = {**params, "head": waiter, "clock_fence": clock_fence()}
            row = conn.execute(sql.GRANT, grant).fetchone()
            if row is None:  # it left, or a waiter of an older version: it looks itself
                return bell or None, b"\1"
            return bell or None, grant_news(waiter, row[0], row[1], row[2])

        released = self._release(name, {**params, "clock_fence": clock_fence()}, action)
        if released is not None:
            return released
        row = self._run(
            f"{action} {name!r}", lambda conn: conn.execute(sql.FREE_LEASE, params).fetchone()
        )
        if row is None or row[1] is None:
            return row  # type: ignore[no-any-return]
        head = row[1]
        # A step of its own: retrying the release itself would find the lease cleared.
        bell, news = self._run(f"{action} {name!r}", lambda conn: hand_over(conn, head))
        if bell:
            self._bells.ring(bell, news)
        return row  # type: ignore[no-any-return]

    def _release(self, name: str, params: Dict[str, Any], action: str) -> Optional[Tuple[Any, ...]]:
        """The common release in one statement (sql.RELEASE): the row, if it matched."""
        try:  # without the retry machinery
            row = self._conn(check_file=False).execute(sql.RELEASE, params).fetchone()
        except (sqlite3.Error, OSError):  # busy (the statement did nothing) or a fault:
            row = self._run(  # retried or reported there
                f"{action} {name!r}", lambda conn: conn.execute(sql.RELEASE, params).fetchone()
            )
        if row is None or row[1] is None:
            return row  # type: ignore[no-any-return]  # (None: the careful way)
        expires_at, waiter, fence, acquired_at, witness, bell = row
        if self._witness.is_alive(witness):
            if bell:
                self._bells.ring(bell, grant_news(waiter, fence, acquired_at, expires_at))
            return row  # type: ignore[no-any-return]
        # Granted to a waiter that had died: the next one finds its lease dead and takes it.
        bell = self._run(f"{action} {name!r}", lambda conn: self._next_bell(conn, name, freed=True))
        if bell:
            self._bells.ring(bell)
        return row  # type: ignore[no-any-return]

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

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and self._local.pid == os.getpid():
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def close(self) -> None:
        self._drop_connection()
        self._local = threading.local()
