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

import os
import secrets
import threading
import time
from typing import Any, Dict, Optional, Tuple

from ..._log import log

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

    def current(self) -> str:
        with self._mutex:
            if self._pid != os.getpid() or self._pubsub is None:
                self._establish()
            return self.channel

    def renew(self, stale: str) -> None:
        """Replace a subscription that is gone (a restart, a dropped connection)."""
        with self._mutex:
            if self.channel == stale or self._pid != os.getpid():
                self._establish()

    def _establish(self) -> None:
        if self._pubsub is not None and self._pid == os.getpid():
            # A new channel, never the old one: leases written under the old one were
            # free for the taking while it lapsed, so they must stay dead.
            try:
                self._pubsub.close()
            except Exception as exc:  # a dead connection may fail to close
                log.debug("closing the old presence connection: %s", exc)
        self._pubsub = None  # a fork child's copy is the parent's: never close it
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
        return presence
