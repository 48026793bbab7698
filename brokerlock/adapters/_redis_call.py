"""Running the Redis store's scripts (and waiters' BLPOP) the lean way, on clients the
adapter made itself.

Why not ``Script.__call__``: redis-py's general command path (its packer, which checks
and encodes every argument, the retry wrapper, its metrics hooks) costs more client CPU
than the server spends running our scripts, and every acquire and release is one
script, every wake-up one BLPOP. The command is packed here and sent on a connection
of the client's own pool, whose parser reads the reply. Only for clients made from a
URL, whose settings we chose (no decoding, one immediate retry on a dropped
connection); a client handed to the adapter keeps redis-py's path and its settings.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, List, Sequence

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
    """Calls scripts through the pool of ``client``, as redis-py would, minus its cost."""

    def __init__(self, client: redis.Redis) -> None:
        import redis as driver

        self._client = client
        self._pool = client.connection_pool
        self._errors = driver.exceptions
        # redis-py before 5.3 needs the command's name; later versions warn about it.
        wants = inspect.signature(type(self._pool).get_connection).parameters.get("command_name")
        self._named = wants is not None and wants.default is inspect.Parameter.empty

    def __call__(self, script: Script, keys: List[str], args: List[Any]) -> Any:
        """``EVALSHA`` of ``script``, loading it again if the server forgot it (a
        restart, ``SCRIPT FLUSH``)."""
        try:
            return self.command([b"EVALSHA", script.sha, len(keys), *keys, *args])
        except self._errors.NoScriptError:
            script.sha = self._client.script_load(script.script)
            return self.command([b"EVALSHA", script.sha, len(keys), *keys, *args])

    def command(self, words: Sequence[Any]) -> Any:
        """Send one command on a pooled connection; its reply, as redis-py parses it."""
        packed = pack(words)
        for attempt in (1, 2):
            # Any: redis-py's Connection methods are not annotated.
            conn: Any = (
                self._pool.get_connection(words[0]) if self._named else self._pool.get_connection()
            )
            try:
                conn.send_packed_command([packed])
                return conn.read_response()
            except self._errors.ResponseError:
                raise  # the server answered: the connection is fine
            except self._errors.ConnectionError:
                # A pooled connection that died while idle gets one retry on a new one,
                # as the client's Retry does; every command we send is safe to repeat.
                conn.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                conn.disconnect()  # a reply may be on its way: never reuse this one
                raise
            finally:
                self._pool.release(conn)
        raise AssertionError("unreachable")
