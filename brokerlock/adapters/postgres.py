"""PostgreSQL store: one row per lock name, changed by single atomic statements.

Acquire is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <free> RETURNING fence``
timed by the server's ``clock_timestamp()``. Rows are never deleted (release clears the
token), so a name's fence keeps growing, durably, across restarts.

Why lease rows *and* advisory locks: a session-level advisory lock alone dies with its
session, which is exactly right for a crashed holder, but it has no ttl, no fence and
no holder record, and it would pin one connection per held lock. A lease row alone
has all of those but would leave a killed holder's lock stuck until its ttl. So each
process keeps one *presence* session holding a session-level advisory lock on a random
63-bit key for its whole life, and writes that key into every row it holds. A row whose
key is no longer granted in ``pg_locks`` belongs to a dead process (or one that lost its
session) and is free at once; takeover is the same compare-and-set as for an expired
lease. Waiters ``LISTEN`` on a channel per name that release and force-release
``NOTIFY``; a session that ends notifies nobody, so waiters also re-check at least
every second.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import secrets
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import BrokerLockError
from .base import Adapter, Lease, Request, Waiter

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("brokerlock")

T = TypeVar("T")

#: Waiters look again at least this often, whatever they were told.
RECHECK = 1.0
#: libpq settings we add unless the DSN sets them: fail fast on a server that does not
#: answer, and notice a dead network instead of waiting on it for ever.
CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "application_name": "brokerlock",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
}
#: Idle connections kept per adapter for reuse; more are closed when handed back.
MAX_IDLE = 8
#: The advisory lock that serialises table creation between clients starting at once.
SCHEMA_LOCK = 0x62726F6B65726C6B  # "brokerlk"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}\Z")

#: Every advisory key granted to some session of this database (bigint form, objsubid 1).
_LIVE_KEYS = """(SELECT (l.classid::int8 << 32) | l.objid::int8 FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                        WHERE d.datname = current_database()))"""
_LIVE = (
    "token IS NOT NULL AND (expires_at IS NULL OR expires_at > clock_timestamp()) "
    f"AND holder IN {_LIVE_KEYS}"
)
_COLUMNS = (
    "name, token, fence, extract(epoch FROM acquired_at)::float8, "
    "extract(epoch FROM expires_at)::float8, host, pid, thread"
)
_SCHEMA = """CREATE TABLE IF NOT EXISTS {t} (
    name text PRIMARY KEY,
    token text,
    fence bigint NOT NULL,
    acquired_at timestamptz,
    expires_at timestamptz,
    host text,
    pid integer,
    thread text,
    holder bigint
)"""
_ACQUIRE = f"""INSERT INTO {{t}} AS t (name, token, fence, acquired_at, expires_at, host, pid, thread, holder)
SELECT %(name)s, %(token)s, 1, c.now, c.now + %(ttl)s::float8 * interval '1 second',
       %(host)s, %(pid)s, %(thread)s, %(holder)s::int8
FROM (SELECT clock_timestamp() AS now) c
WHERE %(holder)s::int8 IN {_LIVE_KEYS}
ON CONFLICT (name) DO UPDATE SET
    token = excluded.token, fence = t.fence + 1, acquired_at = excluded.acquired_at,
    expires_at = excluded.expires_at, host = excluded.host, pid = excluded.pid,
    thread = excluded.thread, holder = excluded.holder
WHERE t.token IS NULL OR t.token = excluded.token OR t.expires_at <= excluded.acquired_at
   OR t.holder NOT IN {_LIVE_KEYS}
RETURNING t.fence, extract(epoch FROM t.acquired_at)::float8, extract(epoch FROM t.expires_at)::float8"""
# The token is cleared but the row kept, so the fence survives; RETURNING reports
# whether the lease was still intact (unexpired, its holder's session alive).
_RELEASE = f"""WITH r AS (
    UPDATE {{t}} SET token = NULL WHERE name = %(name)s AND token = %(token)s
    RETURNING (expires_at IS NULL OR expires_at > clock_timestamp()) AND holder IN {_LIVE_KEYS} AS intact
) SELECT r.intact, pg_notify(%(channel)s, '') FROM r"""
_FORCE = f"""WITH r AS (
    UPDATE {{t}} SET token = NULL WHERE name = %(name)s AND {_LIVE} RETURNING 1
) SELECT pg_notify(%(channel)s, '') FROM r"""
_EXTEND = f"""UPDATE {{t}} SET expires_at = clock_timestamp() + %(ttl)s::float8 * interval '1 second'
WHERE name = %(name)s AND token = %(token)s AND {_LIVE} RETURNING {_COLUMNS}"""
_SELECT = f"SELECT {_COLUMNS} FROM {{t}} WHERE {_LIVE} {{where}} ORDER BY name COLLATE \"C\""


def _driver() -> Any:
    try:
        import psycopg
    except ImportError:
        raise BrokerLockError(
            "PostgresAdapter needs the psycopg package: pip install brokerlock[postgres]"
        ) from None
    return psycopg


def _table_parts(table: object) -> Tuple[str, ...]:
    if not isinstance(table, str):
        raise TypeError(f"table must be a str, not {type(table).__name__}: {table!r}")
    parts = tuple(table.split("."))
    if len(parts) > 2 or not all(_IDENTIFIER.match(part) for part in parts):
        raise ValueError(
            f"table {table!r} is not a plain identifier (letters, digits, _ and $, at most "
            "63 characters, optionally schema.table)"
        )
    return parts


class _Presence:
    """This process's presence session: holds one advisory key for the process's life."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._mutex = threading.Lock()
        self._conn: Optional[psycopg.Connection[Any]] = None
        self._pid = -1
        self.key = 0

    def current(self) -> int:
        with self._mutex:
            if self._pid != os.getpid() or self._conn is None or self._conn.closed:
                self._establish()
            return self.key

    def renew(self, stale: int) -> None:
        """Replace a session that is gone (its key no longer granted)."""
        with self._mutex:
            if self.key == stale or self._pid != os.getpid():
                self._establish()

    def _establish(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            # A new key, never the old one: leases written under the old key were
            # free for the taking while it lapsed, so they must stay dead.
            self._conn.close()
        self._conn = None  # a fork child's copy is the parent's: never close it
        conn = self._connect()
        try:
            # Let the server notice a vanished host within ~25 s, and never drop
            # this idle session on a timer.
            conn.execute("SET tcp_keepalives_idle = 10")
            conn.execute("SET tcp_keepalives_interval = 5")
            conn.execute("SET tcp_keepalives_count = 3")
            if conn.info.server_version >= 140000:
                conn.execute("SET idle_session_timeout = 0")
            while True:
                key = secrets.randbits(63) or 1
                row = conn.execute("SELECT pg_try_advisory_lock(%s::int8)", (key,)).fetchone()
                if row is not None and row[0]:
                    break
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid, self.key = conn, os.getpid(), key
        log.debug("presence session holds advisory key %d", key)


_presences: Dict[str, _Presence] = {}
_presences_mutex = threading.Lock()


class PostgresAdapter(Adapter):
    """Locks in a PostgreSQL table (created if missing).

    ``dsn_or_connection`` is a ``postgresql://`` URL (``?table=`` overrides ``table``),
    a libpq ``key=value`` string, or a psycopg connection whose parameters are used to
    open the adapter's own sessions (yours is never used, so your transactions and
    locks stay apart from ours).
    """

    def __init__(
        self, dsn_or_connection: str | psycopg.Connection[Any], table: str = "brokerlock_locks"
    ) -> None:
        driver = _driver()
        self._psycopg = driver
        from psycopg import sql

        if isinstance(dsn_or_connection, str):
            dsn, table = self._split_url(dsn_or_connection, table)
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
        parts = _table_parts(table)
        for key, value in CONNECT_DEFAULTS.items():
            params.setdefault(key, value)
        self._conninfo: str = driver.conninfo.make_conninfo(**params)
        host = str(params.get("host") or params.get("hostaddr") or "local socket")
        self.server = f"{host}:{params.get('port') or 5432}"
        self.url = self._display_url(params)

        ident = sql.Identifier(*parts)
        self._sql = {
            key: sql.SQL(text).format(t=ident)
            for key, text in (("acquire", _ACQUIRE), ("release", _RELEASE), ("force", _FORCE),
                              ("extend", _EXTEND), ("schema", _SCHEMA))
        }
        self._sql["get"] = sql.SQL(_SELECT).format(t=ident, where=sql.SQL("AND name = %(name)s"))
        self._sql["list"] = sql.SQL(_SELECT).format(t=ident, where=sql.SQL(""))
        self._idle: List[psycopg.Connection[Any]] = []
        self._idle_mutex = threading.Lock()
        self._idle_pid = os.getpid()
        with _presences_mutex:
            presence = _presences.get(self._conninfo)
            if presence is None:
                presence = _presences[self._conninfo] = _Presence(self._connect)
        self._presence = presence
        self._run("create the lock table", self._setup)

    @staticmethod
    def _split_url(dsn: str, table: str) -> Tuple[str, str]:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            return dsn, table
        query = parse_qsl(parts.query, keep_blank_values=True)
        table = next((value for key, value in query if key == "table"), table)
        rest = urlencode([(k, v) for k, v in query if k != "table"])
        return urlunsplit(parts._replace(query=rest)), table

    def _display_url(self, params: Dict[str, Any]) -> str:
        """A URL that reaches this store again, without the password."""
        user = f"{params['user']}@" if params.get("user") else ""
        host = str(params.get("host") or "")
        query = {"host": host} if host.startswith("/") else {}
        netloc = "" if host.startswith("/") else host
        if params.get("port"):
            netloc += f":{params['port']}"
        if self.table != "brokerlock_locks":
            query["table"] = self.table
        tail = "?" + urlencode(query) if query else ""
        return f"postgresql://{user}{netloc}/{params.get('dbname') or ''}{tail}"

    # -- connections ------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self._psycopg.connect(self._conninfo, autocommit=True)
        return conn

    def _take(self) -> Tuple[psycopg.Connection[Any], bool]:
        """An idle connection (``False``) or a new one (``True``)."""
        with self._idle_mutex:
            if self._idle_pid != os.getpid():
                # Inherited across fork(): the parent's sessions, never to be used here.
                self._idle, self._idle_pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), False
        return self._connect(), True

    def _give(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            return
        with self._idle_mutex:
            if self._idle_pid == os.getpid() and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _error(self, action: str, exc: BaseException) -> BrokerLockError:
        message = str(exc).strip() or type(exc).__name__
        return BrokerLockError(f"PostgreSQL at {self.server}: could not {action}: {message}")

    def _run(self, action: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        errors = self._psycopg
        for attempt in (1, 2):
            try:
                conn, fresh = self._take()
            except errors.Error as exc:
                raise self._error(action, exc) from None
            try:
                result = fn(conn)
            except errors.Error as exc:
                broken = conn.broken or conn.closed
                if broken:
                    conn.close()
                else:
                    self._give(conn)
                # A pooled session that died while idle (a server restart) gets one
                # retry on a new one; every statement is safe to repeat.
                if broken and not fresh and attempt == 1:
                    log.debug("%s: reconnecting after %s", self.server, exc)
                    continue
                raise self._error(action, exc) from None
            self._give(conn)
            return result
        raise AssertionError("unreachable")

    def _setup(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SELECT to_regclass(%s)", (self.table,)).fetchone()
        if row is not None and row[0] is not None:
            return  # existing table: needs no CREATE privilege
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s::int8)", (SCHEMA_LOCK,))
            conn.execute(self._sql["schema"])

    def _channel(self, name: str) -> str:
        digest = hashlib.sha256(f"{self.table}\0{name}".encode()).hexdigest()[:40]
        return "brokerlock_" + digest

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
        action = f"acquire {request.name!r}"
        for _attempt in (1, 2):
            try:
                holder = self._presence.current()
            except self._psycopg.Error as exc:
                raise self._error(action, exc) from None
            params = {
                "name": request.name, "token": request.token, "ttl": request.ttl,
                "host": request.host, "pid": request.pid, "thread": request.thread,
                "holder": holder,
            }

            row = self._run(action, functools.partial(self._attempt, params))
            if row is None:
                return None
            if row[0]:
                _ok, fence, acquired_at, expires_at = row
                return Lease(
                    request.name, request.token, int(fence), acquired_at, expires_at,
                    request.host, request.pid, request.thread,
                )
            # Our presence session is gone (a server restart, a dropped connection):
            # a row written under its key would be free for anyone, so get a new one.
            log.warning("%s: presence session lost; opening a new one", self.server)
            self._presence.renew(holder)
        raise self._error(action, RuntimeError("the presence session keeps failing"))

    def _attempt(self, params: Dict[str, Any], conn: psycopg.Connection[Any]) -> Optional[Tuple[Any, ...]]:
        """``(True, fence, acquired_at, expires_at)``, ``None`` if held, ``(False,)`` if our
        presence session is gone."""
        row = conn.execute(self._sql["acquire"], params).fetchone()
        if row is not None:
            return (True, *row)
        alive = conn.execute(f"SELECT %(holder)s::int8 IN {_LIVE_KEYS}", params).fetchone()
        return None if alive is None or alive[0] else (False,)

    def release(self, name: str, token: str) -> bool:
        params = {"name": name, "token": token, "channel": self._channel(name)}
        row = self._run(
            f"release {name!r}", lambda c: c.execute(self._sql["release"], params).fetchone()
        )
        return row is not None and bool(row[0])

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

    def force_release(self, name: str) -> bool:
        params = {"name": name, "channel": self._channel(name)}
        rows = self._run(
            f"break {name!r}", lambda c: c.execute(self._sql["force"], params).fetchall()
        )
        return bool(rows)

    def waiter(self, name: str) -> Waiter:
        return _NotifyWaiter(self, name)

    def _recheck_after(self, name: str, remaining: Optional[float]) -> Optional[float]:
        bound = super()._recheck_after(name, remaining)
        return RECHECK if bound is None else min(bound, RECHECK)

    def close(self) -> None:
        # The presence session stays: leases held by this process live on until it
        # exits, as with every other store.
        with self._idle_mutex:
            idle, self._idle = self._idle, []
            mine = self._idle_pid == os.getpid()
        for conn in idle if mine else []:
            conn.close()


class _NotifyWaiter(Waiter):
    """A session of its own that LISTENs on the name's channel while the waiter lives."""

    def __init__(self, adapter: PostgresAdapter, name: str) -> None:
        from psycopg import sql

        self._adapter = adapter
        self._action = f"wait for {name!r}"
        try:
            self._conn, _fresh = adapter._take()
            self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(adapter._channel(name))))
        except adapter._psycopg.Error as exc:
            raise adapter._error(self._action, exc) from None

    def wait(self, timeout: Optional[float]) -> None:
        block = RECHECK if timeout is None else min(timeout, RECHECK)
        if block <= 0:
            return
        try:
            for _notify in self._conn.notifies(timeout=block, stop_after=1):
                pass
        except self._adapter._psycopg.Error as exc:
            raise self._adapter._error(self._action, exc) from None

    def close(self) -> None:
        try:
            self._conn.execute("UNLISTEN *")
        except self._adapter._psycopg.Error:
            self._conn.close()
            return
        self._adapter._give(self._conn)
