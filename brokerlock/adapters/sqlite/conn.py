"""The SQLite store's connections: lent from a small pool (see ``sqlite.pool``), made
anew after fork() or when the database file was deleted or replaced; WAL and the
schema set up safely when many processes open a store at once; statements retried
while SQLite is busy, and errors reported in the store's words.
"""

from __future__ import annotations

import errno
import os
import pathlib
import random
import sqlite3
import stat
import sys
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

from ..._log import log
from ...errors import BrokerLockError
from ..embedded.clock import BOOT_ID, new_pin
from ..embedded.files import io_error, is_shared_dir, open_private
from ..embedded.locking import YIELDS, yield_cpu
from . import sql
from .pool import Pool, Slot


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
    if is_shared_dir(os.path.dirname(path)):
        _precreate_journals(path)
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
        raise io_error("use database", path, exc) from None
    if stat.S_ISLNK(info.st_mode):
        raise BrokerLockError(
            f"refusing to open {path}: it is a symbolic link, which a lock database never is"
        )
    if not stat.S_ISREG(info.st_mode):
        raise BrokerLockError(f"cannot use database {path}: it is not a regular file")


#: Descriptors of ``-shm`` files we made, kept open: SQLite holds POSIX locks on that
#: file, which closing any descriptor of it in this process would drop.
_made_shm: List[int] = []


def _precreate_journals(path: str) -> None:
    """In a group-shared directory, make the ``-wal`` and ``-shm`` files before SQLite
    does. SQLite gives them the database's mode too, but only by a chmod after it
    created them with the umask's: another user of the group opening them in between
    would be refused (and fail as "readonly database"). Ours appear with their mode."""
    for suffix in ("-wal", "-shm"):
        if os.path.lexists(path + suffix):
            continue
        try:
            fd = open_private(path + suffix, os.O_RDWR | os.O_EXCL)
        except BrokerLockError:
            continue  # made meanwhile by another process, or not ours to make: SQLite decides
        if suffix == "-wal":
            os.close(fd)
            continue
        for kept in list(_made_shm):
            try:
                gone = os.fstat(kept).st_nlink == 0
            except OSError:
                gone = True
            if gone:  # (unlinked by SQLite after its last connection closed: no locks left)
                _made_shm.remove(kept)
                try:
                    os.close(kept)
                except OSError:
                    pass
        _made_shm.append(fd)


def _diagnose(path: str) -> Optional[BrokerLockError]:
    """Why SQLite could not write the database at ``path``, if we can tell: a read-only
    file system, or a file or directory we may not write."""
    directory = os.path.dirname(path)
    if sys.platform != "win32":
        try:
            if os.statvfs(directory).f_flag & os.ST_RDONLY:
                return io_error("write", path, OSError(errno.EROFS, "Read-only file system"))
        except OSError:
            pass
    effective = os.access in os.supports_effective_ids
    for target in (path, path + "-wal", path + "-shm", directory):
        if os.path.exists(target) and not os.access(target, os.W_OK, effective_ids=effective):
            return io_error("write", target, OSError(errno.EACCES, "Permission denied"))
    return None


class SQLiteConnections:
    """The connection plumbing of :class:`SQLiteAdapter` (a mixin: it needs ``path``,
    ``url`` and a :class:`~.pool.Pool` in ``_pool``)."""

    path: str
    url: str
    _pool: Pool
    _pinned: bool
    _offset: Optional[float]

    def _borrow(self) -> Tuple[Pool, Slot]:
        """A slot of this process's pool; give it back with ``_give_back``."""
        pool = self._pool
        if pool.pid != os.getpid():
            # Forked: the parent's connections are not the child's to use (SQLite's
            # lock bookkeeping of a process does not survive fork()).
            pool = self._pool = Pool()
        return pool, pool.take()

    def _give_back(self, pool: Pool, slot: Slot) -> None:
        conn = slot.conn
        if conn is not None and conn.in_transaction:
            # Left open by an exception inside a transaction: the next borrower must
            # not run its statements in it.
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                slot.close()
        if pool is self._pool:
            pool.give_back(slot)
        elif pool.pid == os.getpid():
            slot.close()  # the adapter was closed while the slot was lent

    def _ready(self, slot: Slot, check_file: bool = True) -> sqlite3.Connection:
        """The slot's connection, made anew when it has none, or when the database file
        was deleted or replaced: a connection keeps the old inode open, and locks taken
        in a ghost file would exclude nobody.

        Without ``check_file`` the file is not looked at: a release looks after its
        statement instead (``_same_file``), which also catches a swap during it.
        """
        conn = slot.conn
        if conn is not None:
            if not check_file or sys.platform == "win32":
                # (Windows: SQLite's handle does not share delete, so the file cannot be
                # deleted or replaced while this connection is open; and a stat() costs
                # milliseconds there, 7 ms under Wine.)
                return conn
            try:
                info: Optional[os.stat_result] = os.stat(self.path)
            except OSError:
                info = None
            if info is not None and info.st_ino == slot.ino and info.st_dev == slot.dev:
                return conn
            if self._pool.reported != (slot.dev, slot.ino):
                self._pool.reported = (slot.dev, slot.ino)
                log.warning("database %s was deleted or replaced; reconnecting", self.path)
            slot.close()
        _prepare_database_file(self.path)
        # check_same_thread off: a pooled connection serves one thread at a time, but
        # not always the same one.
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            self._setup(conn)
            info = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        slot.conn, slot.dev, slot.ino = conn, info.st_dev, info.st_ino
        return conn

    def _same_file(self, slot: Slot) -> bool:
        """Whether the slot's connection is to the file now at the store's path; looked
        at *after* a statement, it proves the statement changed the live store."""
        if sys.platform == "win32":
            return True  # no file held open can be swapped there (see _conn)
        try:
            info = os.stat(self.path)
        except OSError:
            return False
        return info.st_ino == slot.ino and info.st_dev == slot.dev

    def _execute(self, text: str, params: Dict[str, Any]) -> Any:
        """One statement and its first row, without the retry machinery: a busy or
        failing store raises (``sqlite3.Error``, ``OSError``) for the caller's careful
        path to retry or report."""
        pool, slot = self._borrow()
        try:
            return self._ready(slot).execute(text, params).fetchone()
        finally:
            self._give_back(pool, slot)

    def _execute_then_look(self, text: str, params: Dict[str, Any]) -> Tuple[Any, bool]:
        """Like ``_execute``, without looking at the file first; and whether the file the
        statement changed was still the store's after it (see ``_same_file``)."""
        pool, slot = self._borrow()
        try:
            row = self._ready(slot, check_file=False).execute(text, params).fetchone()
            return row, self._same_file(slot)
        finally:
            self._give_back(pool, slot)

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
                if present != sql.SCHEMA_COMPLETE:
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
                if self._pinned:
                    self._offset = self._pin(conn)
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > give_up:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _pin(self, conn: sqlite3.Connection) -> float:
        """The store's offset from the boot clock for this boot, pinned if no process of
        this boot has yet (see ``embedded.clock``); read with each new connection, so a
        store made anew (deleted, replaced) is read anew."""
        row = conn.execute(sql.READ_PIN).fetchone()
        if row is None or row[0] != BOOT_ID:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    raise
                # A store we may only read (brokerlock status as another user): our
                # own pin, the wall clock of now, is as good as any for looking.
                return new_pin()[1]
            try:
                row = conn.execute(sql.READ_PIN).fetchone()
                if row is None or row[0] != BOOT_ID:
                    row = new_pin()
                    conn.execute(sql.WRITE_PIN, row)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return float(row[1])

    def _run(
        self, action: str, fn: Callable[[sqlite3.Connection], Any], deadline: Optional[float] = None
    ) -> Any:
        """Run ``fn`` on a connection of the pool; retry it while SQLite is busy, for up
        to BUSY_TIMEOUT or until the monotonic ``deadline`` of the caller's wait. ``fn``
        must not borrow another connection (a pool with every slot lent to borrowers
        that wait for one more would wait for ever).

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
            pool, slot = self._borrow()
            try:
                return fn(self._ready(slot))
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    self._fail(action, exc, slot)
                busy = exc
            except sqlite3.DatabaseError as exc:
                self._fail(action, exc, slot)
            except OSError as exc:
                raise BrokerLockError(f"{self.url}: could not {action}: {exc}") from None
            finally:
                self._give_back(pool, slot)
            # Busy: the connection went back to the pool while we back off.
            now = time.monotonic()
            if not give_up:
                give_up = now + BUSY_TIMEOUT
            if deadline is not None and now > deadline:
                raise _OutOfTime from None
            if now > give_up:
                self._fail(action, busy, None)
            tries += 1
            if tries <= YIELDS:
                # The writer in our way is most likely done within microseconds.
                yield_cpu()
                continue
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.005)

    def _fail(self, action: str, exc: sqlite3.DatabaseError, slot: Optional[Slot]) -> NoReturn:
        """Report a database error, naming the store and what we were doing."""
        # A connection that met a fault (a read-only or damaged file, a full disk) can
        # keep its view of it; the next call starts afresh, so that it works as soon as
        # the fault is repaired. (The idle ones too: they may have met it unnoticed.)
        if slot is not None:
            slot.close()
        if self._pool.pid == os.getpid():
            self._pool.close_idle()
        message = str(exc)
        if "not a database" in message or "malformed" in message:
            message = f"{message} (is {self.path} an SQLite database brokerlock may use?)"
        elif "readonly" in message or "unable to open" in message or "I/O error" in message:
            # SQLite's words for a file it may not write read like a state of the
            # database; say which file or directory, and why.
            cause = _diagnose(self.path)
            if cause is not None:
                message = str(cause)
        raise BrokerLockError(f"{self.url}: could not {action}: {message}") from None

    def close(self) -> None:
        pool, self._pool = self._pool, Pool()
        if pool.pid == os.getpid():
            pool.close_idle()  # (those lent at the moment are closed when given back)


#: How long the removal of kept rows waits for SQLite's write lock: bounded, since it
#: may run inside the garbage collector in a thread whose own transaction holds that
#: lock (rare: then the rows stay); long enough for a store busy with other processes.
RECLAIM_PATIENCE = 2.0


def reclaim_rows(path: str, names: List[str]) -> None:
    """Delete the kept rows of ``names`` that are still free and unwaited (sql.RECLAIM),
    in one transaction on a connection of its own (see embedded.deferred): never a
    pooled one, which may be in use up the stack, nor one that creates the file."""
    uri = pathlib.Path(path).as_uri() + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, timeout=RECLAIM_PATIENCE, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql.RECLAIM, [(name,) for name in names])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
