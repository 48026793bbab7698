"""Lock-file store: one small JSON record per lock name in a private directory.

File names are a hash of the lock name, so no name (``a/b``, ``..``, ``/etc/passwd``)
can address a file outside the directory, and ``a/b`` and ``a_b`` stay distinct; the
readable name is kept inside the record. Each record is read and changed under a
``flock`` held for microseconds, never for the life of a hold: the lease, not the
kernel lock, decides who holds, so that a ttl can take a lock from a holder that
overran it. The holder's liveness is proved by its witness byte (see ``_witness``),
which frees a killed holder's lock at once. Waiters sleep in inotify until a record
is written or a process that used the store exits.

``flock`` is unreliable on NFS and other network file systems: use Redis or
PostgreSQL for locks shared between hosts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._platform import HAVE_FCNTL
from .._wakeup import CLOSED, MODIFIED, file_waiter
from .._witness import witness_for
from ..errors import BrokerLockError
from ._files import ensure_private_dir, open_private
from .base import Adapter, Lease, Request, Waiter

if HAVE_FCNTL:
    import fcntl

log = logging.getLogger("brokerlock")

_SUFFIX = ".lock"
#: A record's flock is held for microseconds; a writer stopped inside it (SIGSTOP, a
#: debugger) must not hang everyone forever, so give up after this and say why.
MUTEX_PATIENCE = 30.0

Record = Dict[str, Any]


def file_name(name: str) -> str:
    """The file that holds ``name``'s record: a hash, so any name is harmless."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:40] + _SUFFIX


class FileAdapter(Adapter):
    def __init__(
        self, directory: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        if not HAVE_FCNTL:
            import sys

            raise BrokerLockError(
                f"FileAdapter needs flock(), which {sys.platform} does not have; "
                "use SQLiteAdapter on this platform"
            )
        directory = os.fspath(directory)
        if not isinstance(directory, str) or not directory:
            raise ValueError(f"FileAdapter needs a directory path, not {directory!r}")
        self.directory = ensure_private_dir(directory)
        self.url = "file://" + self.directory
        self._clock = clock
        self._witness = witness_for(os.path.join(self.directory, "witness"))

    def now(self) -> float:
        return self._clock()

    # -- one record under its flock ----------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.directory, file_name(name))

    def _update(
        self, name: str, action: str, change: Callable[[Optional[Record]], Tuple[Any, Optional[Record]]]
    ) -> Any:
        """Run ``change(record) -> (result, new record or None)`` under the file's flock."""
        path = self._path(name)
        fd = open_private(path, os.O_RDWR)
        try:
            _flock(fd, path)
            record = self._read(fd, path, name)
            result, new = change(record)
            if new is not None:
                data = json.dumps(new, separators=(",", ":")).encode("utf-8")
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            return result
        except OSError as exc:
            raise BrokerLockError(f"{self.url}: could not {action} {name!r}: {exc}") from None
        finally:
            os.close(fd)  # also drops the flock

    def _read(self, fd: int, path: str, name: Optional[str]) -> Optional[Record]:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        raw = os.pread(fd, size, 0)
        try:
            record, _end = json.JSONDecoder().raw_decode(raw.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("fence"), int):
                raise ValueError("not a lock record")
        except ValueError:
            log.warning("lock file %s is damaged; treating its lock as free", path)
            return {"name": name, "fence": _clock_fence(), "token": None, "damaged": True}
        if name is not None and record.get("name") != name:
            raise BrokerLockError(f"lock file {path} holds the record of another name")
        return record

    def _holds(self, record: Optional[Record], now: float) -> bool:
        """Whether ``record`` is a live lease: unexpired, its holder alive."""
        if record is None or not record.get("token"):
            return False
        expires = record.get("expires_at")
        if expires is not None and expires <= now:
            return False
        return self._witness.is_alive(record.get("witness"))

    @staticmethod
    def _lease(record: Record) -> Lease:
        return Lease(
            record["name"], record["token"], record["fence"], record["acquired_at"],
            record["expires_at"], record["host"], record["pid"], record["thread"],
        )

    # -- the contract -----------------------------------------------------------
    def try_acquire(self, request: Request) -> Optional[Lease]:
        def change(record: Optional[Record]) -> Tuple[Optional[Lease], Optional[Record]]:
            now = self._clock()
            if self._holds(record, now):
                return None, None
            new = {
                "name": request.name,
                "token": request.token,
                "fence": (record["fence"] if record else 0) + 1,
                "acquired_at": now,
                "expires_at": None if request.ttl is None else now + request.ttl,
                "host": request.host,
                "pid": request.pid,
                "thread": request.thread,
                "witness": self._witness.mine(),
            }
            return self._lease(new), new

        return self._update(request.name, "acquire", change)  # type: ignore[no-any-return]

    def release(self, name: str, token: str) -> bool:
        def change(record: Optional[Record]) -> Tuple[bool, Optional[Record]]:
            if record is None or record.get("token") != token:
                return False, None
            expires = record.get("expires_at")
            intact = expires is None or expires > self._clock()
            return intact, {**record, "token": None, "witness": None}

        return bool(self._update(name, "release", change))

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        def change(record: Optional[Record]) -> Tuple[Optional[Lease], Optional[Record]]:
            now = self._clock()
            if record is None or record.get("token") != token or not self._holds(record, now):
                return None, None
            new = {**record, "expires_at": None if ttl is None else now + ttl}
            return self._lease(new), new

        return self._update(name, "extend", change)  # type: ignore[no-any-return]

    def get(self, name: str) -> Optional[Lease]:
        path = self._path(name)
        if not os.path.exists(path):
            return None

        def look(record: Optional[Record]) -> Tuple[Optional[Lease], None]:
            if record is None or not self._holds(record, self._clock()):
                return None, None
            return self._lease(record), None

        return self._update(name, "read", look)  # type: ignore[no-any-return]

    def list(self) -> List[Lease]:
        try:
            entries = sorted(e for e in os.listdir(self.directory) if e.endswith(_SUFFIX))
        except OSError as exc:
            raise BrokerLockError(f"{self.url}: could not list the locks: {exc}") from None
        leases = []
        now = self._clock()
        for entry in entries:
            path = os.path.join(self.directory, entry)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # removed or replaced under us: not a lock of ours
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                record = self._read(fd, path, None)
            finally:
                os.close(fd)
            if record is not None and not record.get("damaged") and self._holds(record, now):
                leases.append(self._lease(record))
        return sorted(leases, key=lambda lease: lease.name)

    def force_release(self, name: str) -> bool:
        def change(record: Optional[Record]) -> Tuple[bool, Optional[Record]]:
            if not self._holds(record, self._clock()):
                return False, None
            assert record is not None
            return True, {**record, "token": None, "witness": None}

        return bool(self._update(name, "break", change))

    def waiter(self, name: str) -> Waiter:
        # A release writes the record; a holder that dies closes the witness file.
        return file_waiter({self._path(name): MODIFIED, self._witness.path: CLOSED})

    def _recheck_after(self, name: str, remaining: Optional[float]) -> Optional[float]:
        bound = super()._recheck_after(name, remaining)
        return 1.0 if bound is None else min(bound, 1.0)


def _flock(fd: int, path: str) -> None:
    """Take the record's flock, spinning politely; it is held for microseconds."""
    delay = 0.0
    give_up = time.monotonic() + MUTEX_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() > give_up:
            raise BrokerLockError(
                f"lock file {path} has been busy for {MUTEX_PATIENCE:.0f}s: "
                "a process is stopped while updating it"
            )
        time.sleep(delay)
        delay = min(max(delay * 2, 0.00005), 0.005)


def _clock_fence() -> int:
    """A fence for a damaged record: microseconds since the epoch, above any counter
    the record could have held, so fences still only grow."""
    return time.time_ns() // 1000
