"""PostgreSQL store: one row per lock name, changed by single atomic statements.

Acquire is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <free> RETURNING fence``
timed by the server's ``clock_timestamp()``. A row freed while nobody waits is deleted,
its fence kept in the store's floor (see ``postgres.sql``), so a name's fence keeps
growing, durably, across restarts, while the table holds only names in use.

Why lease rows *and* advisory locks: a session-level advisory lock alone dies with its
session, which is exactly right for a crashed holder, but it has no ttl, no fence and
no holder record, and it would pin one connection per held lock. A lease row alone
has all of those but would leave a killed holder's lock stuck until its ttl. So each
process keeps one *presence* session holding a session-level advisory lock on a random
63-bit key for its whole life, and writes that key into every row it holds. A row whose
key is no longer granted in ``pg_locks`` belongs to a dead process (or one that lost its
session) and is free at once; takeover is the same compare-and-set as for an expired
lease (see ``postgres.presence``).

Waiters queue in ``<table>_queue``, first come first served (arrival by the server's
clock; a dead process's waiters are skipped at once, a stalled one after
``QUEUE_PATIENCE``), and a newcomer never overtakes them. One statement takes the lock
or takes (renews) the waiter's place in the queue. Each waiting thread ``LISTEN``s on a
channel of its own, once, in a session it keeps (see ``postgres.listen``). Release and
force-release hand the lock straight to the head of the queue, in their own statement,
and ``NOTIFY`` the head with its lease: the woken waiter returns without another round
trip. A waiter that leaves (timed out) keeps a lock handed to it just before; one that
is interrupted passes it on. A session that ends notifies nobody, and a waiter handed
the lock may die before it learns so, so waiters also re-check when the current lease
expires and at least every ``RECHECK`` seconds. A waiter stopped between a NOTIFY and its reading
past the lease's end goes on waiting instead (someone else may hold the lock by now):
the server's clock at its latest statement plus the monotonic time since is a lower
bound of the server's clock, whatever the skew.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple, TypeVar

from ..._log import log
from ...errors import BrokerLockError
from ..base import Adapter, Lease, Request
from . import sql as statements
from .listen import CHANNEL_PREFIX, Listeners
from .pool import CONNECT_DEFAULTS, Pool, Prepared, flag, load_driver, number, text
from .presence import presence_for
from .url import DEFAULT_TABLE, display_url, split_url, table_parts

if TYPE_CHECKING:
    import psycopg


T = TypeVar("T")

#: Waiters look again at least this often, whatever they were told: a dead holder is
#: noticed by looking (nothing notifies of it), a release notifies. It also renews the
#: waiter's place (QUEUE_PATIENCE).
RECHECK = 5.0
#: A new waiter's one early look, if nothing woke it (see acquire()); the next come
#: every RECHECK.
FIRST_LOOK = 0.05
#: The local clock that carries the server's, read by a waiter's latest statement, forward.
_ticks = time.monotonic
#: Names remembered as contended, at most (past it, the memory starts afresh).
MAX_CONTENDED = 1024
#: Attempts in a row that may find the name's row deleted under them (each one waits
#: for the release that deleted it, so the next sees the lock free or taken anew).
STALE_LOOKS = 100
#: A queued waiter that has not renewed its place for this many seconds is skipped (it
#: stalled; a dead process's waiters are skipped at once, as their session ended).
QUEUE_PATIENCE = 15.0
#: The advisory lock that serialises table creation between clients starting at once.
SCHEMA_LOCK = 0x62726F6B65726C6B  # "brokerlk"


class PostgresAdapter(Adapter):
    """Locks in a PostgreSQL table (created if missing).

    ``dsn_or_connection`` is a ``postgresql://`` URL (``?table=`` overrides ``table``),
    a libpq ``key=value`` string, or a psycopg connection whose parameters are used to
    open the adapter's own sessions (yours is never used, so your transactions and
    locks stay apart from ours).
    """

    def __init__(
        self, dsn_or_connection: str | psycopg.Connection[Any], table: str = DEFAULT_TABLE
    ) -> None:
        driver = load_driver()
        self._psycopg = driver
        from psycopg import sql

        if isinstance(dsn_or_connection, str):
            dsn, table = split_url(dsn_or_connection, table)
            params = driver.conninfo.conninfo_to_dict(dsn)
        elif isinstance(dsn_or_connection, driver.Connection):
            info = dsn_or_connection.info
            params = dict(info.get_parameters())
            if info.password:
                params["password"] = info.password
        else:
            raise TypeError(
                "PostgresAdapter needs a postgresql:// DSN or a psycopg connection, not "
                f"{type(dsn_or_connection).__name__}: {dsn_or_connection!r}"
            )
        self.table = table
        parts = table_parts(table)
        for key, value in CONNECT_DEFAULTS.items():
            params.setdefault(key, value)
        self._conninfo: str = driver.conninfo.make_conninfo(**params)
        host = str(params.get("host") or params.get("hostaddr") or "local socket")
        self.server = f"{host}:{params.get('port') or 5432}"
        self.url = display_url(params, table)

        self._ident = ident = sql.Identifier(*parts)
        queue = sql.Identifier(*parts[:-1], parts[-1] + "_queue")

        def render(text: str, **extra: Any) -> bytes:
            # Once (identifiers are plain ASCII), not on every execute.
            return sql.SQL(text).format(t=ident, q=queue, **extra).as_string(None).encode()

        self._sql: Dict[str, bytes] = {
            "extend": render(statements.EXTEND),
            "schema": render(statements.SCHEMA),
            "migrate": render(statements.MIGRATE),
            "get": render(statements.SELECT, where=sql.SQL("AND name = %(name)s")),
            "list": render(statements.SELECT, where=sql.SQL("")),
        }
        # The statements of every acquire and release, run the lean way (_postgres_pool).
        self._hot: Dict[str, Prepared] = {
            key: Prepared(key, render(getattr(statements, key.upper())))
            for key in ("take", "acquire", "retry", "release", "force", "leave", "mine")
        }
        self._pool = Pool(self._connect, self.server)
        # Names whose last acquire found them held: their first attempt queues at once.
        self._contended: Set[str] = set()
        self._presence = presence_for(self._conninfo, self._connect)
        self._listeners = Listeners(self._connect)
        self._run("create the lock table", self._setup)

    # -- connections ------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self._psycopg.connect(self._conninfo, autocommit=True)
        return conn

    def _error(self, action: str, exc: BaseException) -> BrokerLockError:
        return self._pool.error(action, exc)

    def _run(self, action: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        return self._pool.run(action, fn)

    def _setup(self, conn: psycopg.Connection[Any]) -> None:
        name = self._ident.as_string(conn)
        queue = name[:-1] + '_queue"'  # name is a quoted identifier: "t" or "s"."t"
        row = conn.execute(statements.READY, {"t": name, "q": queue}).fetchone()
        if row is not None and row[0]:
            return  # existing tables: need no CREATE privilege
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s::int8)", (SCHEMA_LOCK,))
            conn.execute(self._sql["schema"])
            conn.execute(self._sql["migrate"])

    @staticmethod
    def _lease(row: Tuple[Any, ...]) -> Lease:
        name, token, fence, acquired_at, expires_at, host, pid, thread = row
        return Lease(name, token, int(fence), acquired_at, expires_at, host, pid, thread)

    # -- the contract -----------------------------------------------------------
    def now(self) -> float:
        row = self._run(
            "read the server's clock",
            lambda c: c.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone(),
        )
        assert row is not None
        return float(row[0])

    def try_acquire(self, request: Request) -> Optional[Lease]:
        return self._try(request, None, None)[0]

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        """Take the lock, or a place in the name's queue and wait: first come, first
        served. The release that frees the lock hands it to the head of the queue and
        NOTIFYs the head's thread with the lease, so a woken waiter returns at once."""
        if timeout == 0:
            return self.try_acquire(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        name = request.name
        if name not in self._contended and self._listeners.existing() is None:
            # Free last time: try the cheaper statement that cannot queue us first (a
            # thread that never has to wait never opens a listening session either).
            # A thread that listens already takes or queues in one statement: a name
            # new to it (a date-stamped one) costs no extra round trip when it waits.
            lease = self._try(request, None, None)[0]
            if lease is not None:
                return lease
            if len(self._contended) >= MAX_CONTENDED:
                self._contended.clear()  # a hint only: forgetting costs a statement
            self._contended.add(name)
        try:
            # LISTEN before the attempt that queues us, so no hand-over goes unheard.
            listener = self._listeners.mine()
        except self._psycopg.Error as exc:
            raise self._error(f"wait for {name!r}", exc) from None
        member = listener.member(request.token)
        # One statement: take the lock, or take our place in the queue.
        lease, left, arrival, offset = self._try(request, None, member)
        if lease is not None:
            self._contended.discard(name)
            return lease
        # A release whose snapshot predates our place in the queue cannot see us, so
        # it neither hands us the lock nor wakes us (when our statement locked the row
        # first and made it wait). Rare, so rather than a second look at once (a
        # statement per contended acquire), one look comes early: such a release was
        # waiting for our row lock, so it ends just after our statement. Then a waiter
        # behind a lease looks when it ends and at every RECHECK: the CPU of a parked
        # waiter is that of its looks. Behind no lease (free, another waiter's turn; or
        # no ttl) the early looks go on, each ten times as late, up to RECHECK: the one
        # whose turn it is may take the lock and die, and nobody notifies of that.
        look, behind_lease = FIRST_LOOK, True
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                if (left is None) == behind_lease:
                    behind_lease = left is not None
                    if not behind_lease:
                        look = FIRST_LOOK
                bound = min(look, RECHECK if remaining is None else min(RECHECK, remaining))
                look = RECHECK if behind_lease else min(look * 10, RECHECK)
                if left is not None:
                    # An expiring lease notifies nobody: look again when it ends.
                    bound = min(bound, max(0.0, left) + 0.001)
                try:
                    payload = listener.wait(member, bound)
                except self._psycopg.Error as exc:
                    raise self._error(f"wait for {request.name!r}", exc) from None
                if payload is not None and payload != member:
                    lease = self._granted(request, payload)
                    # The server's clock is at least our offset from ours, so a grant
                    # that ends by then has run out (we were stopped before reading it).
                    if lease.expires_at is None or lease.expires_at > _ticks() + offset:
                        return lease
                    # It took our place in the queue: the statement below takes the lock
                    # if it is still (or again) ours to take, or a new place.
                # Woken to take a free lock, or time to look again (a dead holder, an
                # expired lease, a lost notification): the same statement renews our place.
                lease, left, arrival, offset = self._try(request, arrival, member)
                if lease is not None:
                    return lease
        except BrokerLockError:
            raise  # unreachable: our place lapses by itself, and so would a hand-over
        except BaseException:
            # Interrupted: a lock handed to us meanwhile goes on to the next in line.
            self._leave(request, member, keep=False)
            raise
        # Timed out. A lock handed to us before we left the queue is ours to keep.
        return self._leave(request, member, keep=True)

    def abandon(self, name: str, token: str) -> None:
        listener = self._listeners.existing()  # none: this thread never queued here
        if listener is not None:
            params = {
                "name": name, "token": token, "member": listener.member(token),
                "prefix": CHANNEL_PREFIX,
            }
            self._pool.rows(f"leave the queue of {name!r}", self._hot["leave"], params)
        self.release(name, token)  # a lease of ours (a hand-over too) goes on to the next

    @staticmethod
    def _granted(request: Request, payload: str) -> Lease:
        _member, fence, acquired, expires = payload.split("|")
        return Lease(
            request.name, request.token, int(fence), float(acquired),
            float(expires) if expires else None, request.host, request.pid, request.thread,
        )

    def _leave(self, request: Request, member: str, keep: bool) -> Optional[Lease]:
        """Leave the queue: the lease if the lock was handed to us first and ``keep``,
        else ``None`` (a lock handed to us is released, so it goes on to the next)."""
        name = request.name
        params = {"name": name, "token": request.token, "member": member, "prefix": CHANNEL_PREFIX}
        try:
            left = self._pool.rows(f"leave the queue of {name!r}", self._hot["leave"], params)
            if flag(left, 0):
                return None  # we left our place: nothing was handed to us
            # Our place was gone: taken with a hand-over, or lapsed.
            mine = self._pool.rows(f"acquire {name!r}", self._hot["mine"], params)
        except BrokerLockError as exc:
            log.debug("%s", exc)  # our place (and any hand-over) lapses by itself
            return None
        if not mine.ntuples:
            return None
        if not keep:
            try:
                self.release(name, request.token)
            except BrokerLockError as exc:
                log.debug("%s", exc)  # the hand-over lapses by the lease's ttl
            return None
        return Lease(
            name, request.token, int(mine.get_value(0, 0) or 0), number(mine, 1) or 0.0,
            number(mine, 2), request.host, request.pid, request.thread,
        )

    def _try(
        self, request: Request, arrival: Optional[str], member: Optional[str] = None
    ) -> Tuple[Optional[Lease], Optional[float], Optional[str], float]:
        """The lease, or ``None``, the seconds left on the current lease (if known), our
        arrival in the queue (a waiter, ``member`` set, queues or renews its place) and,
        for a waiter, the server's clock minus ``_ticks()`` at least (else 0).

        A waiter that takes the lock leaves the queue with it."""
        statement = self._hot["retry" if arrival else "acquire" if member else "take"]
        for _attempt in (1, 2):
            try:
                holder = self._presence.current()
            except self._psycopg.Error as exc:
                raise self._error(f"acquire {request.name!r}", exc) from None
            params = {
                "name": request.name, "token": request.token, "ttl": request.ttl,
                "host": request.host, "pid": request.pid, "thread": request.thread,
                "holder": holder, "arrival": arrival, "member": member,
                "patience": QUEUE_PATIENCE,
            }
            for _look in range(STALE_LOOKS):
                row = self._pool.rows(f"acquire {request.name!r}", statement, params)
                # Stale: a release deleted the name's row after the statement's snapshot
                # was taken, so it took nothing (sql._START); a new one sees the release.
                if not flag(row, 7):
                    break
            else:
                raise self._error(
                    f"acquire {request.name!r}",
                    RuntimeError(f"the lock's row was deleted under {STALE_LOOKS} attempts in a row"),
                )
            # The server read its clock before its reply left, and we read ours after
            # the reply came: the difference is a lower bound of the offset.
            offset = (number(row, 6) or 0.0) - _ticks() if member else 0.0
            if flag(row, 0):
                lease = Lease(
                    request.name, request.token, int(row.get_value(0, 1) or 0),
                    number(row, 2) or 0.0, number(row, 3),
                    request.host, request.pid, request.thread,
                )
                return lease, None, None, offset
            if flag(row, 4):
                return None, number(row, 3), text(row, 5), offset
            # Our presence session is gone (a server restart, a dropped connection):
            # a row written under its key would be free for anyone, so get a new one;
            # the next attempt moves our place in the queue (if any) under it.
            log.warning("%s: presence session lost; opening a new one", self.server)
            self._presence.renew(holder)
        raise self._error(f"acquire {request.name!r}", RuntimeError("the presence session keeps failing"))

    def release(self, name: str, token: str) -> bool:
        params = {"name": name, "token": token, "prefix": CHANNEL_PREFIX}
        result = self._pool.rows(f"release {name!r}", self._hot["release"], params)
        return result.ntuples > 0 and flag(result, 0)

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        params = {"name": name, "token": token, "ttl": ttl}
        row = self._run(
            f"extend {name!r}", lambda c: c.execute(self._sql["extend"], params).fetchone()
        )
        return None if row is None else self._lease(row)

    def get(self, name: str) -> Optional[Lease]:
        row = self._run(
            f"read {name!r}", lambda c: c.execute(self._sql["get"], {"name": name}).fetchone()
        )
        return None if row is None else self._lease(row)

    def list(self) -> List[Lease]:
        rows = self._run("list the locks", lambda c: c.execute(self._sql["list"]).fetchall())
        return [self._lease(row) for row in rows]

    def watch(self, name: str, token: str, on_gone: Callable[[str], None]) -> Callable[[], None]:
        # Every lease of this process on the server lives by one presence connection.
        return self._presence.watch(on_gone)

    def force_release(self, name: str) -> bool:
        params = {"name": name, "prefix": CHANNEL_PREFIX}
        return self._pool.rows(f"break {name!r}", self._hot["force"], params).ntuples > 0

    def close(self) -> None:
        # The presence session stays: leases held by this process live on until it
        # exits, as with every other store.
        self._pool.close()
        self._listeners.close()
