"""Hearing at once that a presence connection has gone.

A server store frees every lease of a process the moment that process's presence
connection ends (``redis.presence``, ``postgres.presence``): the server cannot tell a
dead process from a killed connection (``CLIENT KILL``, ``pg_terminate_backend``, a
proxy that cuts idle connections). Without a watch the holder would learn it only at
its next renewal or release, while someone else already holds its lock. So a daemon
thread sleeps in ``select()`` on the presence socket, which carries no traffic of
ours: when it becomes readable (end of file, an error the server sends before
closing), the presence's probe decides, and if the connection has gone every hold
taken under it hears of it through :class:`Listeners`.

The window: from the kill to the holder's ``on_lost`` is the time for the server's
FIN to arrive and one probe, milliseconds on a LAN. A connection that dies silently
(a host or network gone, no FIN) is noticed by TCP keepalive or the next renewal.
"""

from __future__ import annotations

import functools
import itertools
import select
import socket
import threading
from typing import Callable, Dict, Optional

from .._log import log

OnGone = Callable[[str], None]


def _nothing() -> None:
    pass


class Listeners:
    """The holds taken under one presence connection, waiting to hear it has gone.

    Once :meth:`fire` has run, :meth:`add` calls the newcomer at once: a lease written
    under a connection that has gone was free for the taking from that moment.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._calls: Dict[int, OnGone] = {}
        self._keys = itertools.count()
        self.why: Optional[str] = None

    def add(self, on_gone: OnGone) -> Callable[[], None]:
        """Call ``on_gone(why)`` once the connection has gone; returns the un-watch."""
        with self._mutex:
            why = self.why
            if why is None:
                key = next(self._keys)
                self._calls[key] = on_gone
                return functools.partial(self._remove, key)
        on_gone(why)
        return _nothing

    def _remove(self, key: int) -> None:
        with self._mutex:
            self._calls.pop(key, None)

    def fire(self, why: str) -> None:
        with self._mutex:
            if self.why is not None:
                return
            self.why = why
            calls = list(self._calls.values())
            self._calls.clear()
        for call in calls:  # outside the mutex: a call may take other locks
            try:
                call(why)
            except Exception:
                log.exception("reporting a lost presence connection failed")


def watch_socket(fileno: int, probe: Callable[[], Optional[bool]], what: str) -> Callable[[], None]:
    """Watch the connection socket ``fileno`` from a daemon thread.

    Each time it becomes readable, ``probe()`` (called in that thread) says whether the
    connection lives (``True``: look again), has gone (``False``) or is no longer the
    one to watch (``None``); on anything but ``True`` the thread ends. Returns the stop
    function, which must be called before the connection is closed, so that the thread
    never selects on a number that has gone to another file.
    """
    stop_r, stop_w = socket.socketpair()  # a socket, not a pipe: select() on Windows

    def run() -> None:
        stop = stop_r.fileno()
        try:
            while True:
                ready, _, _ = select.select([fileno, stop], [], [])
                if stop in ready or probe() is not True:
                    return
        except (OSError, ValueError) as exc:  # the connection was closed under us
            log.debug("watching %s ended: %s", what, exc)
        finally:
            stop_r.close()

    threading.Thread(target=run, name=f"brokerlock-watch {what}", daemon=True).start()

    def stop() -> None:
        try:
            stop_w.send(b"x")
        except OSError:
            pass  # the thread has ended and closed its end
        stop_w.close()

    return stop
