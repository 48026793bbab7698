"""The lock file's record: plain JSON, written by hand.

The format is the one ``json.dumps`` gives (every version reads every other's), but
writing it with the json module cost a lock operation more than its system calls: a
fifth of a release went to printing float time stamps in their shortest round-trip
form (bignum arithmetic in ``dtoa``) and escaping the same ten keys every time. Here
the keys are literals and time stamps live on a microsecond grid, printed from
integers; anything unexpected in a record (a damaged one, one from another version)
goes through the json module as before.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from ..._log import log
from ...errors import BrokerLockError
from ..base import clock_fence
from ..embedded.locking import lock_file, lock_within, read_at, unlock_file, write_at

Record = Dict[str, Any]

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_DECODER = json.JSONDecoder()
_escape = json.encoder.encode_basestring_ascii
_FINITE_MIN, _FINITE_MAX = -1.7976931348623157e308, 1.7976931348623157e308
_KEYS = frozenset(
    ("name", "token", "fence", "acquired_at", "expires_at", "host", "pid", "thread", "witness", "queue")
)


def stamp(t: float) -> float:
    """``t`` on the microsecond grid: written and read back, it stays the same float."""
    return round(t * 1e6) / 1e6


def stamp_text(t: Optional[float]) -> str:
    """``t`` as JSON, exact for a ``stamp()``; ``None`` is ``null``."""
    if t is None:
        return "null"
    if type(t) is float or type(t) is int:
        try:
            whole, micro = divmod(round(t * 1e6), 1000000)
        except (OverflowError, ValueError):  # inf, nan: not a time we write
            return _ENCODE(t)
        return f"{whole}.{micro:06d}"
    return _ENCODE(t)


def _value(v: Any) -> str:
    if type(v) is str:
        return _escape(v)
    if v is None:
        return "null"
    if type(v) is int:
        return str(v)
    if type(v) is float and _FINITE_MIN <= v <= _FINITE_MAX:
        return repr(v)  # what the json module writes for a finite float, without its set-up
    return _ENCODE(v)


#: Queue entries already written, by content. A queued waiter's entry is rewritten
#: unchanged by every operation on its lock until the waiter refreshes it (seconds),
#: and a queue of eight cost a release more than all the rest of the record.
_ENTRY_TEXT: Dict[Tuple[Any, ...], str] = {}


def _entry(e: Any) -> str:
    if type(e) is not list or len(e) != 8:
        return _ENCODE(e)
    key = (*e, *map(type, e))  # (types too: 1 == 1.0 == True, but they print apart)
    try:
        text = _ENTRY_TEXT.get(key)
    except TypeError:  # an unhashable member: only a damaged record has one
        return _ENCODE(e)
    if text is None:
        token, witness, until, bell, ttl, host, pid, thread = e
        text = (
            f"[{_value(token)},{_value(witness)},{stamp_text(until)},{_value(bell)},"
            f"{_value(ttl)},{_value(host)},{_value(pid)},{_value(thread)}]"
        )
        if len(_ENTRY_TEXT) >= 1024:
            _ENTRY_TEXT.clear()
        _ENTRY_TEXT[key] = text
    return text


def encode(record: Record) -> bytes:
    """``record`` as the JSON text of a lock file."""
    queue = record.get("queue")
    if record.keys() != _KEYS or type(queue) is not list:
        return _ENCODE(record).encode("utf-8")
    return (
        f'{{"name":{_value(record["name"])},"token":{_value(record["token"])},'
        f'"fence":{_value(record["fence"])},"acquired_at":{stamp_text(record["acquired_at"])},'
        f'"expires_at":{stamp_text(record["expires_at"])},"host":{_value(record["host"])},'
        f'"pid":{_value(record["pid"])},"thread":{_value(record["thread"])},'
        f'"witness":{_value(record["witness"])},"queue":[{",".join(map(_entry, queue))}]}}'
    ).encode()


def decode(raw: bytes, path: str, name: Optional[str]) -> Optional[Record]:
    """The record in a lock file's bytes (``None``: no record yet), or a free one marked
    damaged if they hold none; ``name``, when given, must be the record's."""
    if not raw.strip():
        return None
    try:
        record, _end = _DECODER.raw_decode(raw.decode("utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("fence"), int):
            raise ValueError("not a lock record")
    except ValueError:
        log.warning("lock file %s is damaged; treating its lock as free", path)
        return {"name": name, "fence": 0, "token": None, "damaged": True}
    if name is not None and record.get("name") != name:
        raise BrokerLockError(f"lock file {path} holds the record of another name")
    return record


def leased(
    record: Optional[Record], name: str, now: float, token: str, witness: Optional[str],
    ttl: Optional[float], host: str, pid: int, thread: str, queue: List[List[Any]],
) -> Record:
    """The record of a new lease; its fence is above every earlier one (see clock_fence)."""
    return {
        "name": name,
        "token": token,
        "fence": max(record["fence"] + 1 if record else 0, clock_fence()),
        "acquired_at": stamp(now),
        "expires_at": None if ttl is None else stamp(now + ttl),
        "host": host,
        "pid": pid,
        "thread": thread,
        "witness": witness,
        "queue": queue,
    }



class HighWater:
    """The store's fence floor: the highest fence of any record it removed, in one
    small file beside the records.

    A released name's record is removed when nobody waits for it (later: see
    ``embedded.deferred``), taking its fence with it; a record made anew for the name
    starts above this mark, so no fence of a name ever repeats, even when the wall
    clock steps back. The mark is raised under
    its own flock *before* the record is unlinked, under the record's flock (taken
    first, always in that order): whoever makes the record anew can only do so after
    the unlink, and then reads a mark that covers it.
    """

    def __init__(self, path: str, files: Any) -> None:
        self.path = path
        self._files = files  # a KeptFiles of read-write descriptors

    def _value(self, fd: int) -> int:
        text = read_at(fd, 64, 0).strip()
        try:
            return int(text or b"0")
        except ValueError:
            log.warning("fence file %s is damaged; new fences follow the clock alone", self.path)
            return 0

    def read(self) -> int:
        fd = self._files.get(self.path)
        lock_file(fd, shared=True)
        try:
            return self._value(fd)
        finally:
            unlock_file(fd)

    def raise_to(self, fence: int, within: float) -> bool:
        """Raise the mark to ``fence``; False if its flock stayed busy for ``within``
        seconds (the caller then must not remove the record: see ``_reclaim_records``,
        which may run in a thread that holds this flock up the stack)."""
        fd = self._files.get(self.path)
        if not lock_within(fd, within):
            return False
        try:
            if fence > self._value(fd):
                # Fixed width: one write replaces the whole value.
                write_at(fd, b"%020d\n" % fence, 0)
        finally:
            unlock_file(fd)
        return True
