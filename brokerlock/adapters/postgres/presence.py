"""Liveness of PostgreSQL lock holders: one presence session per process and server.

The session holds a session-level advisory lock on a random 63-bit key for the life of
the process, and the process writes that key into every row it holds or waits in. The
server releases the advisory lock the moment the session ends (the process died, its
host vanished, the server restarted), so anyone can tell a dead holder from a live one
in ``pg_locks``, without trusting PIDs or clocks. It is ``embedded.witness`` for a server.
"""

from __future__ import annotations

import os
import secrets
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from ..._log import log

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
