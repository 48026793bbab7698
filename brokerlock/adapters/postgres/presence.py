"""Liveness of PostgreSQL lock holders: one presence session per process and server.

The session holds a session-level advisory lock on a random 63-bit key for the life of
the process, and the process writes that key into every row it holds or waits in. The
server releases the advisory lock the moment the session ends (the process died, its
host vanished, the server restarted), so anyone can tell a dead holder from a live one
in ``pg_locks``, without trusting PIDs or clocks. It is ``embedded.witness`` for a server.
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from ..._log import log
from ..watch import Listeners, OnGone, watch_socket

if TYPE_CHECKING:
    import psycopg



class _Presence:
    """This process's presence session: holds one advisory key for the process's life."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._mutex = threading.Lock()
        self._conn: Optional[psycopg.Connection[Any]] = None
        self._pid = -1
        self.key = 0
        # The holds taken under the current session, and the stop of its watch.
        self._listeners = Listeners()
        self._stop_watch: Callable[[], None] = lambda: None
        self._retired: Optional[Listeners] = None  # to be told, outside the mutex
        self.server = "PostgreSQL"

    def current(self) -> int:
        try:
            with self._mutex:
                if self._pid != os.getpid() or self._conn is None or self._conn.closed:
                    self._establish()
                return self.key
        finally:
            self._tell_retired()

    def renew(self, stale: int) -> None:
        """Replace a session that is gone (its key no longer granted)."""
        try:
            with self._mutex:
                if self.key == stale or self._pid != os.getpid():
                    self._establish()
        finally:
            self._tell_retired()

    def watch(self, on_gone: OnGone) -> Callable[[], None]:
        """Call ``on_gone(why)`` once the session that leases are now written under
        has ended (at once if it already has); returns the un-watch."""
        with self._mutex:
            listeners = self._listeners
            if self._conn is None or self._pid != os.getpid():
                listeners = Listeners()  # it has gone, and perhaps failed to come back
                listeners.why = f"this process's presence session on {self.server} failed"
        return listeners.add(on_gone)

    def _tell_retired(self) -> None:
        with self._mutex:
            retired, self._retired = self._retired, None
        if retired is not None:
            retired.fire(f"this process's presence session on {self.server} failed")

    def _probe(self, conn: psycopg.Connection[Any]) -> Optional[bool]:
        """In the watch thread: the presence socket became readable (the server says
        something before it closes the session, or just closes it)."""
        with self._mutex:
            if self._conn is not conn:
                return None  # replaced or closed by us
            try:
                conn.execute("SELECT 1")  # also takes in a notice or a parameter change
                return True
            except Exception as exc:
                why = exc
            listeners = self._listeners
            self._conn = None  # current() opens a new session (a new key) for the next acquire
        listeners.fire(
            f"{self.server} ended this process's presence session (pg_terminate_backend, a "
            f"restart, a proxy: {str(why).strip()}), which frees its locks at once"
        )
        try:
            conn.close()
        except Exception as exc:
            log.debug("closing the dead presence session: %s", exc)
        return False

    def _establish(self) -> None:
        if self._pid == os.getpid():
            # Stopped before the close: the thread must not select on a reused number.
            self._stop_watch()
            self._retired = self._listeners
        if self._conn is not None and self._pid == os.getpid():
            # A new key, never the old one: leases written under the old key were
            # free for the taking while it lapsed, so they must stay dead.
            self._conn.close()
        # A fork child's copies are the parent's: never close them, never stop the
        # parent's watch, never call the parent's listeners.
        self._conn, self._stop_watch, self._listeners = None, lambda: None, Listeners()
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
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s::int8), pg_backend_pid()", (key,)
                ).fetchone()
                if row is not None and row[0]:
                    break
            if row[1] != conn.info.backend_pid:
                # Not the server process libpq was told of at connection: a pooler.
                _refuse_transaction_pooling(self._connect, int(row[1]), conn)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid, self.key = conn, os.getpid(), key
        self.server = f"PostgreSQL at {conn.info.host}:{conn.info.port}"
        self._stop_watch = watch_socket(
            conn.fileno(), functools.partial(self._probe, conn), f"PostgreSQL presence {conn.info.port}"
        )
        log.debug("presence session holds advisory key %d", key)


#: How long the pooler probe waits for an answer before it leaves the question open.
PROBE_PATIENCE = 5.0

#: What to say when a pooler shares server sessions between transactions.
TRANSACTION_POOLING = (
    "a connection pooler in transaction pooling mode (pgbouncer's pool_mode = transaction "
    "or statement) stands between brokerlock and PostgreSQL; brokerlock needs sessions of "
    "its own (session-level advisory locks, LISTEN, prepared statements), which such a "
    "pooler hands to other clients between transactions: connect brokerlock to PostgreSQL "
    "directly, or through a pool in session mode (pool_mode = session)"
)


def _refuse_transaction_pooling(
    connect: Callable[[], psycopg.Connection[Any]], backend: int, conn: psycopg.Connection[Any]
) -> None:
    """Behind a pooler, raise ``BrokerLockError`` if it shares server sessions between
    transactions: a second session of ours lands on the server process ``backend`` that
    our first one used, which is idle between its transactions now. In session mode
    that process stays ours as long as the first session lives."""
    import select

    from ...errors import BrokerLockError

    probe = connect()
    try:
        pgconn = probe.pgconn
        pgconn.send_query(b"SELECT pg_backend_pid()")
        deadline = time.monotonic() + PROBE_PATIENCE
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # (a session pool that is full, maybe): no verdict
                log.debug("pooler probe got no answer within %.0fs", PROBE_PATIENCE)
                return
            select.select([pgconn.socket], [], [], remaining)
        result = pgconn.get_result()
        value = None if result is None else result.get_value(0, 0)
    finally:
        probe.close()
    if value is not None and int(value) == backend:
        server = f"{conn.info.host}:{conn.info.port}"
        raise BrokerLockError(f"PostgreSQL at {server}: {TRANSACTION_POOLING}")
    log.debug("a connection pooler in session mode: fine")


_presences: Dict[str, _Presence] = {}
_presences_mutex = threading.Lock()


def presence_for(conninfo: str, connect: Callable[[], psycopg.Connection[Any]]) -> _Presence:
    """The one presence of this process on the server and database ``conninfo`` names.

    Shared by every adapter of the process and never closed before exit, so closing an
    adapter leaves the leases it took alive, as on every other store.
    """
    with _presences_mutex:
        presence = _presences.get(conninfo)
        if presence is None:
            presence = _presences[conninfo] = _Presence(connect)
        return presence
