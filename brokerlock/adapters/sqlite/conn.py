"""The SQLite store's connections: one per thread, made anew after fork() or when the
database file was deleted or replaced; WAL and the schema set up safely when many
processes open a store at once; statements retried while SQLite is busy, and errors
reported in the store's words.
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import threading
import time
from typing import Any, Callable, NoReturn, Optional

from ..._log import log
from ...errors import BrokerLockError
from ..embedded.files import YIELDS, open_private, yield_cpu
from . import sql


class _OutOfTime(Exception):
    """The store stayed busy until the caller's wait was over: a timeout, not a fault."""


def _busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message


#: How long one statement may wait for SQLite's write lock before we report the store
#: as stuck; contention is microseconds, so this only trips on a wedged writer.
BUSY_TIMEOUT = 30.0


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


class SQLiteConnections:
    """The connection plumbing of :class:`SQLiteAdapter` (a mixin: it needs ``path``,
    ``url`` and a ``threading.local`` in ``_local``)."""

    path: str
    url: str
    _local: threading.local

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
        tries = 0
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
                tries += 1
                if tries <= YIELDS:
                    # The writer in our way is most likely done within microseconds.
                    yield_cpu()
                    continue
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
