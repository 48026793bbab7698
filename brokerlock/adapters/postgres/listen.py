"""Wake-ups of parked PostgreSQL waiters: one listening session per thread.

A thread that waits for a lock for the first time opens a session of its own and
``LISTEN``s on a channel with a random name; it keeps both for its life, so a later
wait costs no ``LISTEN``/``UNLISTEN``. The thread's place in a queue names the channel
(its member is ``<token>:<channel id>``). The release that hands the lock to it
``NOTIFY``s that channel with ``<member>|<lease>``; a waiter that may take a free lock
is woken with the bare member. A notification for an earlier wait (another member) is
ignored. The session runs no other statements, so a notification that comes while an
attempt runs stays in its socket until the next wait.
"""

from __future__ import annotations

import math
import os
import secrets
import select
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..._log import log

if TYPE_CHECKING:
    import psycopg


#: Channels are this prefix + the listener's id.
CHANNEL_PREFIX = "brokerlock_"


def _readable(sock: int, timeout: float) -> bool:
    """Whether ``sock`` has data within ``timeout`` seconds (rounded up to the ms)."""
    if _poll is None:  # Windows
        return bool(select.select([sock], [], [], timeout)[0])
    poller = _poll()
    poller.register(sock, _POLLIN)
    return bool(poller.poll(math.ceil(timeout * 1000)))


_poll = getattr(select, "poll", None)
_POLLIN: int = getattr(select, "POLLIN", 1)  # (absent on Windows, where select() serves)


def _for(member: str, payload: str) -> bool:
    """Whether ``payload`` is meant for ``member``: the bare member, or a hand-over."""
    return payload.startswith(member) and payload[len(member):len(member) + 1] in ("", "|")


class Listener:
    """One thread's listening session: LISTENs on one channel for the thread's life."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self.id = secrets.token_hex(8)
        self.pid = os.getpid()
        self.conn: Optional[psycopg.Connection[Any]] = None
        self._open()

    def _open(self) -> None:
        conn = self._connect()
        try:
            conn.execute(f'LISTEN "{CHANNEL_PREFIX}{self.id}"')
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def member(self, token: str) -> str:
        """The queue member of a waiter with ``token`` that this listener wakes."""
        return f"{token}:{self.id}"

    def wait(self, member: str, timeout: float) -> Optional[str]:
        """Block until ``member`` is notified (its payload) or ``timeout`` seconds pass
        (``None``).

        A session that broke (a server restart) is opened anew on the same channel
        once, so the waiter keeps its place in the queue; if that fails, the error
        propagates.
        """
        if timeout <= 0:
            return None
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            if self.conn is None or self.conn.closed:
                self._open()
            assert self.conn is not None
            try:
                return self._wait(self.conn, member, deadline)
            except Exception:  # nothing to tell at interpreter exit
                conn, self.conn = self.conn, None
                conn.close()
                if attempt == 2:
                    raise
                log.debug("listening session broke; opening a new one")
        return None

    @staticmethod
    def _wait(conn: psycopg.Connection[Any], member: str, deadline: float) -> Optional[str]:
        # libpq directly, not Connection.notifies(): that spins on poll(0) through the
        # last millisecond before its timeout (a millisecond of CPU per wait) and
        # drops the rest of a batch when the caller stops early.
        pgconn = conn.pgconn
        found: Optional[str] = None
        while True:
            notify = pgconn.notifies()
            while notify is not None:
                payload = notify.extra.decode()
                if _for(member, payload) and (found is None or found == member):
                    found = payload  # a hand-over wins over a bare wake-up
                notify = pgconn.notifies()
            if found is not None:
                return found
            # Only notifications for earlier waits of this thread, if any: wait on.
            left = deadline - time.monotonic()
            if left <= 0 or not _readable(pgconn.socket, left):
                return None
            pgconn.consume_input()  # raises if the session broke

    def __del__(self) -> None:  # the thread that owned it ended
        try:
            self.close()
        except Exception:  # nothing to tell at interpreter exit
            pass

    def close(self) -> None:
        if self.conn is not None and self.pid == os.getpid():
            self.conn.close()
        self.conn = None


class Listeners:
    """The listeners of one adapter, one per thread (none inherited through fork)."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._local = threading.local()
        # Weak: a thread that ends drops its listener, whose session then closes.
        self._all: weakref.WeakSet[Listener] = weakref.WeakSet()
        self._mutex = threading.Lock()

    def mine(self) -> Listener:
        listener: Optional[Listener] = getattr(self._local, "listener", None)
        if listener is None or listener.pid != os.getpid():
            listener = self._local.listener = Listener(self._connect)
            with self._mutex:
                self._all.add(listener)
        return listener

    def existing(self) -> Optional[Listener]:
        """The calling thread's listener if it has one, without making one."""
        listener: Optional[Listener] = getattr(self._local, "listener", None)
        return listener if listener is not None and listener.pid == os.getpid() else None

    def close(self) -> None:
        with self._mutex:
            listeners, self._all = list(self._all), weakref.WeakSet()
        for listener in listeners:
            listener.close()
