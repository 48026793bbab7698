"""Liveness of Redis lock holders and waiters: one presence connection per process.

The connection subscribes to a channel of its own, with a random 128-bit name, for the
life of the process, and the process writes that name into every lease it holds and
every place it takes in a queue. The server drops the subscription the moment the
connection closes (the process died, its host vanished, the server restarted), so a
script tells a dead holder or waiter from a live one with ``PUBSUB NUMSUB``, without
trusting PIDs or clocks: the Redis twin of ``postgres.presence``. Nobody ever
publishes on the channel, so the connection costs nothing while it sits there.
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from ..._log import log
from ..watch import Listeners, OnGone, watch_socket

#: How long to wait for the server to confirm the subscription.
SUBSCRIBE_TIMEOUT = 5.0


class RedisPresence:
    """This process's presence on one server: a subscribed connection of its own."""

    def __init__(self, driver: Any, client: Any) -> None:
        pool = client.connection_pool
        # A pool of its own: closing the adapter's client (which disconnects its pool)
        # must not end the presence of leases that outlive the adapter.
        self._pool_args: Tuple[Any, Dict[str, Any]] = (pool.connection_class, dict(pool.connection_kwargs))
        self._driver = driver
        self._mutex = threading.Lock()
        self._pubsub: Any = None
        self._pid = -1
        self.channel = ""
        # The holds taken under the current connection, and the stop of its watch.
        self._listeners = Listeners()
        self._stop_watch: Callable[[], None] = lambda: None
        self._retired: Optional[Listeners] = None  # to be told, outside the mutex
        self.server = ""

    def current(self) -> str:
        try:
            with self._mutex:
                if self._pid != os.getpid() or self._pubsub is None:
                    self._establish()
                return self.channel
        finally:
            self._tell_retired()

    def _tell_retired(self) -> None:
        with self._mutex:
            retired, self._retired = self._retired, None
        if retired is not None:
            retired.fire(f"this process's presence connection to Redis at {self.server} failed")

    def watch(self, on_gone: OnGone) -> Callable[[], None]:
        """Call ``on_gone(why)`` once the connection that leases are now written under
        has gone (at once if it already has); returns the un-watch."""
        with self._mutex:
            listeners = self._listeners
            if self._pubsub is None or self._pid != os.getpid():
                listeners = Listeners()  # it has gone, and perhaps failed to come back
                listeners.why = f"this process's presence connection to Redis at {self.server} failed"
        return listeners.add(on_gone)

    def _probe(self, pubsub: Any, sock: Any) -> Optional[bool]:
        """In the watch thread: the presence socket became readable."""
        with self._mutex:
            if self._pubsub is not pubsub:
                return None  # replaced or closed by us
            try:
                # Nobody reads this connection after SUBSCRIBE, so what arrives (a
                # PUBLISH on our channel) can be dropped; only the end of it matters.
                if sock.recv(65536):
                    return True
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                pass
            listeners = self._listeners
            # current() opens a new connection (a new channel) for the next acquire.
            self._pubsub = None
        listeners.fire(f"Redis at {self.server} closed this process's presence connection "
                       "(CLIENT KILL, a restart, a proxy), which frees its locks at once")
        try:
            pubsub.close()
        except Exception as exc:
            log.debug("closing the dead presence connection: %s", exc)
        return False

    def renew(self, stale: str) -> None:
        """Replace a subscription that is gone (a restart, a dropped connection)."""
        try:
            with self._mutex:
                if self.channel == stale or self._pid != os.getpid():
                    self._establish()
        finally:
            self._tell_retired()

    def _establish(self) -> None:
        if self._pid == os.getpid():
            # Stopped before the close: the thread must not select on a reused number.
            self._stop_watch()
            self._retired = self._listeners
        if self._pubsub is not None and self._pid == os.getpid():
            # A new channel, never the old one: leases written under the old one were
            # free for the taking while it lapsed, so they must stay dead.
            try:
                self._pubsub.close()
            except Exception as exc:  # a dead connection may fail to close
                log.debug("closing the old presence connection: %s", exc)
        # A fork child's copies are the parent's: never close them, never stop the
        # parent's watch, never call the parent's listeners.
        self._pubsub, self._stop_watch, self._listeners = None, lambda: None, Listeners()
        connection_class, kwargs = self._pool_args
        pool = self._driver.ConnectionPool(connection_class=connection_class, **kwargs)
        pubsub = self._driver.Redis(connection_pool=pool).pubsub()
        channel = "brokerlock:presence:" + secrets.token_hex(16)
        try:
            pubsub.subscribe(channel)
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
            # Wait for the confirmation: a lease must never name a channel the server
            # does not yet count as subscribed.
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._driver.exceptions.TimeoutError("no reply to SUBSCRIBE")
                message = pubsub.get_message(timeout=left)
                if message is not None and message.get("type") in ("subscribe", b"subscribe"):
                    break
        except BaseException:
            pubsub.close()
            raise
        self._pubsub, self._pid, self.channel = pubsub, os.getpid(), channel
        sock = pubsub.connection._sock
        self._stop_watch = watch_socket(
            sock.fileno(), functools.partial(self._probe, pubsub, sock), f"Redis presence {self.server}"
        )
        log.debug("presence connection subscribed to %s", channel)


_presences: Dict[str, RedisPresence] = {}
_presences_mutex = threading.Lock()


def presence_for(server: str, driver: Any, client: Any) -> RedisPresence:
    """The one presence of this process on ``server`` (host:port, or a socket path
    with the user), shared by every adapter and never closed before exit."""
    with _presences_mutex:
        presence: Optional[RedisPresence] = _presences.get(server)
        if presence is None:
            presence = _presences[server] = RedisPresence(driver, client)
            presence.server = server.strip()
        return presence
