"""The PostgreSQL store's sessions: a small pool, and a lean way to run hot statements.

Why not ``conn.execute`` for the statements of every acquire and release: psycopg's
general path (a cursor, adapters for each parameter and column, a wait loop in Python)
costs about as much client CPU per statement as the server spends running it. Our hot
statements are fixed and few, so each is prepared once per session under a name of its
own and run with libpq directly (``PGconn.exec_prepared``, which releases the GIL),
with text parameters and text results that the caller parses. A statement blocks the
calling thread, like any driver call, until the server answers or the connection's TCP
timeouts (``CONNECT_DEFAULTS``) give up on it.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Set, Tuple, TypeVar

from ..._log import log
from ...errors import BrokerLockError

if TYPE_CHECKING:
    import psycopg
    from psycopg import pq


T = TypeVar("T")

#: duplicate_prepared_statement, invalid_sql_statement_name: what our prepared
#: statements meet behind a pooler in transaction mode.
_POOLED_STATEMENTS = ("42P05", "26000")

_PLACEHOLDER = re.compile(rb"%\((\w+)\)s")


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


def load_driver() -> Any:
    """psycopg, imported only when a PostgreSQL store is opened (it costs a CLI ~100 ms),
    or an error that says what to install."""
    try:
        import psycopg
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "psycopg":
            raise BrokerLockError(
                "PostgresAdapter needs the psycopg package: pip install brokerlock[postgres]"
            ) from None
        # psycopg is there but cannot load libpq, PostgreSQL's client library; its
        # message (a list of attempts) is the cause, in one line.
        why = "; ".join(line.strip("- ").strip() for line in str(exc).splitlines() if line.strip())
        raise BrokerLockError(
            "PostgresAdapter: psycopg cannot load libpq, the PostgreSQL client library "
            f"({why}): install it (Debian/Ubuntu: apt-get install libpq5; Fedora: dnf "
            "install libpq), or pip install 'psycopg[binary]', which bundles it"
        ) from None
    return psycopg


class Prepared:
    """One statement in libpq's ``$n`` form, with the names of its parameters in order."""

    def __init__(self, key: str, text: bytes) -> None:
        keys: List[str] = []

        def number(match: re.Match[bytes]) -> bytes:
            name = match.group(1).decode()
            if name not in keys:
                keys.append(name)
            return b"$%d" % (keys.index(name) + 1)

        self.text = _PLACEHOLDER.sub(number, text)
        self.keys = tuple(keys)
        # Named after its text: adapters of other tables share no name by mistake.
        self.name = f"brokerlock_{key}_{hashlib.sha1(self.text).hexdigest()[:12]}".encode()


def _encode(value: Any) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return str(value).encode()


class Pool:
    """The idle sessions of one adapter (none inherited through fork), and ``run``."""

    #: Idle sessions kept for reuse; more are closed when handed back.
    MAX_IDLE = 8

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], server: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self._connect = connect
        self.server = server
        self._idle: List[psycopg.Connection[Any]] = []
        self._mutex = threading.Lock()
        self._pid = os.getpid()
        # The statements each session has prepared, forgotten with the session.
        self._prepared: weakref.WeakKeyDictionary[psycopg.Connection[Any], Set[bytes]] = (
            weakref.WeakKeyDictionary()
        )

    def _take(self) -> Tuple[psycopg.Connection[Any], bool]:
        """An idle session (``False``) or a new one (``True``)."""
        with self._mutex:
            if self._pid != os.getpid():
                # Inherited across fork(): the parent's sessions, never to be used here.
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), False
        return self._connect(), True

    def _give(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed:
            return
        with self._mutex:
            if self._pid == os.getpid() and len(self._idle) < self.MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def error(self, action: str, exc: BaseException) -> BrokerLockError:
        message = str(exc).strip() or type(exc).__name__
        if getattr(exc, "sqlstate", None) in _POOLED_STATEMENTS and "brokerlock_" in message:
            # Our named statements met in a session that did not prepare them, or
            # missing from one that did: the session is not ours from one call to the next.
            from .presence import TRANSACTION_POOLING

            message = f"{message.splitlines()[0]} ({TRANSACTION_POOLING})"
        return BrokerLockError(f"PostgreSQL at {self.server}: could not {action}: {message}")

    def run(self, action: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        errors = self._psycopg
        for attempt in (1, 2):
            try:
                conn, fresh = self._take()
            except errors.Error as exc:
                raise self.error(action, exc) from None
            try:
                result = fn(conn)
            except errors.Error as exc:
                broken = conn.closed
                if broken:
                    conn.close()
                else:
                    self._give(conn)
                # A pooled session that died while idle (a server restart) gets one
                # retry on a new one; every statement is safe to repeat.
                if broken and not fresh and attempt == 1:
                    log.debug("%s: reconnecting after %s", self.server, exc)
                    continue
                raise self.error(action, exc) from None
            self._give(conn)
            return result
        raise AssertionError("unreachable")

    def rows(self, action: str, statement: Prepared, params: Mapping[str, Any]) -> pq.abc.PGresult:
        """Run ``statement`` in a pooled session: its result, in text."""
        values = [_encode(params[key]) for key in statement.keys]
        return self.run(action, lambda conn: self._execute(conn, statement, values))

    def _execute(
        self, conn: psycopg.Connection[Any], statement: Prepared, values: List[Optional[bytes]]
    ) -> pq.abc.PGresult:
        pgconn = conn.pgconn
        ok = (self._psycopg.pq.ExecStatus.TUPLES_OK, self._psycopg.pq.ExecStatus.COMMAND_OK)
        prepared = self._prepared.get(conn)
        if prepared is None:
            prepared = self._prepared[conn] = set()
        if statement.name not in prepared:
            result = pgconn.prepare(statement.name, statement.text)
            if result.status not in ok:
                raise self._failure(conn, result)
            prepared.add(statement.name)
        # None is SQL NULL to libpq; psycopg's stubs leave it out.
        result = pgconn.exec_prepared(statement.name, values)  # type: ignore[arg-type]
        if result.status not in ok:
            raise self._failure(conn, result)
        return result

    def _failure(self, conn: psycopg.Connection[Any], result: pq.abc.PGresult) -> Exception:
        if conn.closed:
            return self._psycopg.OperationalError(
                (conn.pgconn.error_message or b"the connection was lost").decode(errors="replace")
            )
        return self._psycopg.errors.error_from_result(result)

    def close(self) -> None:
        with self._mutex:
            idle, self._idle = self._idle, []
            mine = self._pid == os.getpid()
        for conn in idle if mine else []:
            conn.close()


# Readers of one text-format cell: NULL is None.
def text(result: pq.abc.PGresult, column: int, row: int = 0) -> Optional[str]:
    value = result.get_value(row, column)
    return None if value is None else bytes(value).decode()


def number(result: pq.abc.PGresult, column: int, row: int = 0) -> Optional[float]:
    value = result.get_value(row, column)
    return None if value is None else float(value)


def flag(result: pq.abc.PGresult, column: int, row: int = 0) -> bool:
    return result.get_value(row, column) == b"t"

