"""What crosses the wire to Redis: replies turned into leases, and values into arguments.

Times travel as integer microseconds of the server's clock, as text; a lease is a
hash (see ``redis.adapter``'s key layout) or, pushed to a waiter by a release,
``"fence acquired expires"``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional, Sequence

from ..._log import log
from ..base import Lease, Request


def text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def seconds(micros: Any) -> Optional[float]:
    """Seconds from the server's microseconds (``None``, or empty: no time)."""
    value = text(micros) if micros is not None else ""
    return int(value) / 1e6 if value else None


def ttl_ms(ttl: Optional[float]) -> str:
    # Rounded up, so a lease never ends before the ttl asked for; PX needs >= 1.
    return "" if ttl is None else str(max(1, math.ceil(ttl * 1000 - 1e-6)))


def glob_escape(value: str) -> str:
    """``value`` matched literally by a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in value)


def fields(flat: Sequence[Any]) -> Dict[str, Any]:
    """A hash from HGETALL's flat reply."""
    return {text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def lease_of(hash_: Dict[str, Any]) -> Optional[Lease]:
    """The lease a lock's hash holds; ``None`` for an empty one (free, or expired)."""
    if not hash_.get("token"):
        return None
    acquired = seconds(hash_.get("acquired_us"))
    return Lease(
        name=text(hash_["name"]),
        token=text(hash_["token"]),
        fence=int(text(hash_["fence"])),
        acquired_at=acquired if acquired is not None else 0.0,
        expires_at=seconds(hash_.get("expires_us")),
        host=text(hash_.get("host", "")),
        pid=int(text(hash_.get("pid", "0")) or 0),
        thread=text(hash_.get("thread", "")),
    )


def granted(request: Request, pushed: str, server_offset: float) -> Optional[Lease]:
    """The lease a release pushed to us (``"fence acquired expires"``), unless it ran
    out before we read it: by the server's clock at our last script plus what passed
    here since (at most the server's time now, whatever the clocks' skew). A waiter
    stopped between the push and its reading must not walk in with it, the lock may be
    another's by now: the script, next, queues it again."""
    fence, acquired, expires = pushed.split(" ")
    until = seconds(expires)
    if until is not None and until <= server_offset + time.monotonic():
        log.debug("a grant of %r ran out before we read it", request.name)
        return None
    return Lease(
        request.name, request.token, int(fence), seconds(acquired) or 0.0,
        until, request.host, request.pid, request.thread,
    )
