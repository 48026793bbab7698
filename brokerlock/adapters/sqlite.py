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

import os
import sqlite3
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from .._wakeup import CLOSED, MODIFIED, file_waiter
from .._witness import Witness, witness_for
from ..errors import BrokerLockError
from ._files import ensure_private_dir, open_private
from .base import Adapter, Lease, Request, Waiter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS brokerlock_locks (
    name TEXT PRIMARY KEY,
    token TEXT,
    fence INTEGER NOT NULL,
    acquired_at REAL,
    expires_at REAL,
    host TEXT,
    pid INTEGER,
    thread TEXT,
    witness TEXT
)
"""
_COLUMNS = "name, token, fence, acquired_at, expires_at, host, pid, thread, witness"
_FREE = "brokerlock_locks.token IS NULL OR brokerlock_locks.expires_at <= :now"
_ACQUIRE = f"""
INSERT INTO brokerlock_locks ({_COLUMNS})
VALUES (:name, :token, 1, :now, :expires, :host, :pid, :thread, :witness)
ON CONFLICT(name) DO UPDATE SET
    token = excluded.token, fence = brokerlock_locks.fence + 1,
    acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
    host = excluded.host, pid = excluded.pid, thread = excluded.thread,
    witness = excluded.witness
WHERE {_FREE}
RETURNING fence
"""
_TAKE_FROM_DEAD = """
UPDATE brokerlock_locks SET
    token = :token, fence = fence + 1, acquired_at = :now, expires_at = :expires,
    host = :host, pid = :pid, thread = :thread, witness = :witness
WHERE name = :name AND token = :dead
RETURNING fence
"""
_LIVE = "token IS NOT NULL AND (expires_at IS NULL OR expires_at > :now)"

#: How long one statement may wait for SQLite's write lock before we report the store
#: as stuck; contention is microseconds, so this only trips on a wedged writer.
BUSY_TIMEOUT = 30.0


class SQLiteAdapter(Adapter):
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
        self._clock = clock
        self._local = threading.local()
        # Created 0600 and never through a symlink, before sqlite3 gets to open it.
        os.close(open_private(self.path, os.O_RDWR))
        self._witness: Witness = witness_for(self.path + "-witness")
        self._run("open the database", self._setup)

    # -- plumbing ---------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: Optional[sqlite3.Connection] = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            # A connection inherited across fork() must never be used by the child.
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=True
            )
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL (journal mode is {mode})")
        conn.execute(_SCHEMA)

    def _run(self, action: str, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            return fn(self._conn())
        except sqlite3.DatabaseError as exc:
            message = str(exc)
            if "not a database" in message or "malformed" in message:
                message = f"{message} (is {self.path} an SQLite database brokerlock may use?)"
            raise BrokerLockError(f"{self.url}: could not {action}: {message}") from None
        except OSError as exc:
            raise BrokerLockError(f"{self.url}: could not {action}: {exc}") from None

    def _params(self, request: Request) -> dict[str, Any]:
        now = self._clock()
        return {
            "name": request.name, "token": request.token, "now": now,
            "expires": None if request.ttl is None else now + request.ttl,
            "host": request.host, "pid": request.pid, "thread": request.thread,
            "witness": self._witness.mine(),
        }

    @staticmethod
    def _lease(row: Tuple[Any, ...]) -> Lease:
        name, token, fence, acquired_at, expires_at, host, pid, thread, _w = row
        return Lease(name, token, fence, acquired_at, expires_at, host, pid, thread)

    # -- the contract -----------------------------------------------------------
    def now(self) -> float:
        return self._clock()

    def try_acquire(self, request: Request) -> Optional[Lease]:
        params = self._params(request)

        def attempt(conn: sqlite3.Connection) -> Optional[int]:
            row = conn.execute(_ACQUIRE, params).fetchone()
            if row is not None:
                return int(row[0])
            holder = conn.execute(
                "SELECT token, witness FROM brokerlock_locks WHERE name = ?", (request.name,)
            ).fetchone()
            if holder is None or self._witness.is_alive(holder[1]):
                return None
            row = conn.execute(_TAKE_FROM_DEAD, {**params, "dead": holder[0]}).fetchone()
            return None if row is None else int(row[0])

        fence = self._run(f"acquire {request.name!r}", attempt)
        if fence is None:
            return None
        return Lease(
            request.name, request.token, fence, params["now"], params["expires"],
            request.host, request.pid, request.thread,
        )

    def release(self, name: str, token: str) -> bool:
        # The token is cleared but expires_at kept, so RETURNING reports whether the
        # lease had run out before the release: nobody took it yet, so clearing it hurts
        # no one, but the caller must hear that its lease had ended.
        row = self._run(
            f"release {name!r}",
            lambda conn: conn.execute(
                "UPDATE brokerlock_locks SET token = NULL, witness = NULL "
                "WHERE name = ? AND token = ? RETURNING expires_at",
                (name, token),
            ).fetchone(),
        )
        return row is not None and (row[0] is None or row[0] > self._clock())

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        now = self._clock()
        expires = None if ttl is None else now + ttl
        row = self._run(
            f"extend {name!r}",
            lambda conn: conn.execute(
                f"UPDATE brokerlock_locks SET expires_at = :expires "
                f"WHERE name = :name AND token = :token AND {_LIVE} RETURNING {_COLUMNS}",
                {"expires": expires, "name": name, "token": token, "now": now},
            ).fetchone(),
        )
        return None if row is None else self._lease(row)

    def _live_rows(self, where: str, params: dict[str, Any]) -> List[Lease]:
        params = {**params, "now": self._clock()}
        rows = self._run(
            "read the locks",
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM brokerlock_locks WHERE {_LIVE} {where} ORDER BY name",
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
        if lease is None:
            return False
        return bool(
            self._run(
                f"break {name!r}",
                lambda conn: conn.execute(
                    "UPDATE brokerlock_locks SET token = NULL, witness = NULL "
                    "WHERE name = ? AND token = ?",
                    (name, lease.token),
                ).rowcount,
            )
        )

    def waiter(self, name: str) -> Waiter:
        # Every commit appends to the WAL; a holder that dies closes the witness file.
        return file_waiter(
            {self.path + "-wal": MODIFIED, self.path: MODIFIED, self._witness.path: CLOSED}
        )

    def _recheck_after(self, name: str, remaining: Optional[float]) -> Optional[float]:
        bound = super()._recheck_after(name, remaining)
        # Safety net: a missed wake-up costs at most this much.
        return 1.0 if bound is None else min(bound, 1.0)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()
