"""The Redis store's commands, sent the lean way on clients the adapter made itself.

Why not ``Script.__call__`` and ``Redis.blpop``: redis-py's general command path (its
packer, which checks and encodes every argument, the retry wrapper, its metrics hooks)
costs more client CPU than the server spends on our scripts, and every acquire and
release is one script, every wake-up one ``BLPOP``. The command is packed here and sent
on a connection of the client's own pool, whose parser reads the reply.

What keeps a reply with its caller (a reply read by the wrong call could hand out the
lock twice):

* A connection is this thread's alone from ``get_connection`` to ``release``, and
  carries exactly one command and one reply in between.
* It goes back to the pool as it came only when its reply was read whole: the call
  returned, or the server answered with an error. Any other way out (a timeout, a
  dropped connection, a parse error, an exception raised into the thread) disconnects
  it first, so a reply still on its way dies with the socket. redis-py's own pool
  does not check a connection for unread data when it hands it out (8.x skips the
  check while maintenance notifications are "auto"), so this is the only guard.
* ``BLPOP`` blocks on the server for less than the socket's timeout (the adapter caps
  it at half), so the client never gives up on a reply the server still sends.

Only for clients made from a URL, whose settings we chose (raw bytes, one retry on a
dropped connection); a client handed to the adapter keeps redis-py's path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Sequence

from ..._log import log

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script



def pack(words: Sequence[Any]) -> bytes:
    """One command in RESP: every word as a bulk string."""
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word if isinstance(word, bytes) else str(word).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Caller:
    """Sends commands through the pool of ``client``, as redis-py would, minus its cost."""

    def __init__(self, client: redis.Redis) -> None:
        import redis as driver

        self._client = client
        self._pool = client.connection_pool
        self._response_error = driver.exceptions.ResponseError
        self._no_script = driver.exceptions.NoScriptError
        self._connection_error = driver.exceptions.ConnectionError

    def script(self, script: Script, keys: List[str], args: List[Any]) -> Any:
        """``EVALSHA`` of ``script``, loading it again if the server forgot it (a
        restart, ``SCRIPT FLUSH``)."""
        try:
            return self.command([b"EVALSHA", script.sha, len(keys), *keys, *args])
        except self._no_script:
            script.sha = self._client.script_load(script.script)
            return self.command([b"EVALSHA", script.sha, len(keys), *keys, *args])

    def command(self, words: Sequence[Any]) -> Any:
        """Send one command on a pooled connection; its reply, as redis-py parses it."""
        packed = [pack(words)]
        for attempt in (1, 2):
            # Any: redis-py's Connection methods are not annotated.
            conn: Any = self._pool.get_connection()
            clean = False
            try:
                conn.send_packed_command(packed)
                reply = conn.read_response()
                clean = True
                return reply
            except self._response_error:
                clean = True  # the server's answer, read whole: the connection is fine
                raise
            except self._connection_error as exc:
                # A pooled connection that died while idle gets one retry on a new one,
                # as the client's Retry does; every command we send is safe to repeat.
                if attempt == 2:
                    raise
                log.debug("Redis connection dropped, retrying once: %s", exc)
            finally:
                if not clean:
                    # A reply may still be on its way: it must never reach another call.
                    conn.disconnect()
                self._pool.release(conn)
        raise AssertionError("unreachable")
