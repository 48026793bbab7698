"""Running the Redis store's scripts the lean way, on clients the adapter made itself.

Why not ``Script.__call__``: redis-py's general command path (its packer, which checks
and encodes every argument, the retry wrapper, its metrics hooks) costs more client CPU
than the server spends running our scripts, and every acquire and release is one
script. The ``EVALSHA`` command is packed here and sent on a connection of the client's
own pool, whose parser reads the reply. Only for clients made from a URL, whose settings
we chose (no decoding, one immediate retry on a dropped connection); a client handed to
the adapter keeps redis-py's path and its own settings.
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
        for attempt in (1, 2, 3):
            command = pack([b"EVALSHA", script.sha, len(keys), *keys, *args])
            # Any: redis-py's Connection methods are not annotated.
            conn: Any = (
                self._pool.get_connection("EVALSHA") if self._named else self._pool.get_connection()
            )
            try:
                conn.send_packed_command([command])
                return conn.read_response()
            except self._errors.NoScriptError:
                # The server forgot its scripts (a restart, SCRIPT FLUSH): load it again.
                if attempt == 3:
                    raise
                script.sha = self._client.script_load(script.script)
            except self._errors.ConnectionError:
                # A pooled connection that died while idle gets one retry on a new one,
                # as the client's Retry does; every script is safe to run twice.
                conn.disconnect()
                if attempt >= 2:
                    raise
            except BaseException:
                conn.disconnect()  # a reply may be on its way: never reuse this one
                raise
            finally:
                self._pool.release(conn)
        raise AssertionError("unreachable")
