"""Lock-file store: one small JSON record per lock name in a private directory.

File names are a hash of the lock name, so no name (``a/b``, ``..``, ``/etc/passwd``)
can address a file outside the directory, and ``a/b`` and ``a_b`` stay distinct; the
readable name is kept inside the record. Each record is read and changed under a
``flock`` held for microseconds, never for the life of a hold: the lease, not the
kernel lock, decides who holds, so that a ttl can take a lock from a holder that
overran it. The holder's liveness is proved by its witness byte (see ``embedded.witness``),
which frees a killed holder's lock at once. Waiters sleep in inotify until a record
is written or a process that used the store exits. A record freed while nobody waits
is kept free for the name's next cycle and removed later by the adapter that freed it
(see ``embedded.deferred``), its fence kept in the store's floor (see
``record.HighWater``): the directory holds the names in use and a few recently freed.

``flock`` is unreliable on NFS and other network file systems: use Redis or
PostgreSQL for locks shared between hosts.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..._log import log
from ..._platform import HAVE_FILE_LOCKS
from ...errors import BrokerLockError
from ..base import Lease, Request
from ..embedded.clock import BOOT_ID, new_pin, parse_pin, pin_text
from ..embedded.files import O_CLOEXEC, O_NOFOLLOW, KeptFiles, ensure_private_dir, open_private
from ..embedded.locking import NO_FLOCK, lock_briefly, lock_file, read_at, unlock_file, write_at
from ..embedded.store import EmbeddedStore
from .grants import ENTRY_SIZE, hand_over, note_grant, rang, ring, unrung_grant
from .reclaim import SUFFIX as _SUFFIX
from .reclaim import file_name
from .reclaim import links_and_size as _links_and_size
from .reclaim import read_raw as _read_raw
from .reclaim import read_record as _read_record
from .reclaim import reclaim_records as _reclaim_records
from .reclaim import remove as _remove
from .record import HighWater, Record, decode, encode, leased, stamp
from .waiting import QueuePlace

#: How long a waiter's place without a witness mark lasts unless renewed (see
#: ``embedded.store.entry_life``).
QUEUE_ENTRY_LIFE = 6.0

#: Each thread keeps its last few records open (see ``KeptFiles``).
_RECORDS = KeptFiles(8, lambda path: open_private(path, os.O_RDWR))
#: And the fence file of the store it used last (see ``HighWater``).
_MARKS = KeptFiles(1, lambda path: open_private(path, os.O_RDWR))


class FileAdapter(EmbeddedStore):
    """Locks of the processes of one host, one small file per lock name in a directory.

    ``directory`` is created ``0700`` if missing; a directory owned by another user, or
    world-writable without the sticky bit, is refused. File names are hashes of the lock
    names, which are kept inside the files. Records are locked with ``flock`` (POSIX) or
    ``LockFileEx`` (Windows) for microseconds at a time. Leases are
    counted on the host's boot clock, so wall-clock steps move none (see the clocks
    page); ``clock`` replaces that clock, for tests.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, clock: Optional[Callable[[], float]] = None
    ) -> None:
        if not HAVE_FILE_LOCKS:
            raise BrokerLockError(NO_FLOCK)
        directory = os.fspath(directory)
        if not isinstance(directory, str) or not directory:
            raise ValueError(f"FileAdapter needs a directory path, not {directory!r}")
        self.directory = ensure_private_dir(directory)
        self.url = "file://" + self.directory
        self._store_id = "file://" + os.path.realpath(self.directory)
        super().__init__(
            os.path.join(self.directory, "witness"), os.path.join(self.directory, "bells"), clock
        )
        self._paths: Dict[str, str] = {}
        self._written: Dict[str, Tuple[bytes, Record]] = {}
        self._high_water = HighWater(os.path.join(self.directory, "fence"), _MARKS)

    def _read_pin(self) -> float:
        """The store's clock for this boot, in the file ``clock`` (see ``embedded.clock``)."""
        path = os.path.join(self.directory, "clock")
        fd = open_private(path, os.O_RDWR)
        try:
            lock_briefly(fd, path)
            pin = parse_pin(read_at(fd, 256, 0).decode("ascii", "replace"))
            if pin is None or pin[0] != BOOT_ID:
                pin = new_pin()
                data = pin_text(*pin).encode("ascii")
                write_at(fd, data, 0)
                os.ftruncate(fd, len(data))
            return pin[1]
        except OSError as exc:
            raise BrokerLockError(f"{self.url}: could not read the store's clock in {path}: {exc}") from None
        finally:
            os.close(fd)  # (the flock goes with it)

    # -- one record under its flock ----------------------------------------------
    def _path(self, name: str) -> str:
        path = self._paths.get(name)
        if path is None:
            if len(self._paths) > 4096:
                self._paths.clear()
            path = self._paths[name] = os.path.join(self.directory, file_name(name))
        return path

    def _update(
        self, name: str, action: str, change: Callable[[Optional[Record]], Tuple[Any, Optional[Record]]]
    ) -> Any:
        """Run ``change(record) -> (result, new record or None)`` under the file's flock."""
        path = self._path(name)
        fd = _RECORDS.get(path)
        kept_free = False
        try:
            while True:
                lock_briefly(fd, path)
                links, size = _links_and_size(fd)
                if links:
                    break
                # Removed or replaced since this thread opened it: the file now at the
                # path is the one everybody else locks.
                _RECORDS.drop(path)
                fd = -1  # closed: its number may be another thread's before ours is back
                fd = _RECORDS.get(path)
            raw = _read_raw(fd, size)
            size = len(raw)
            known = self._written.get(path)
            # (A memo of decode(): the bytes this adapter last wrote here, and the record
            # they decode to. Most often they are what is read, in a cycle of the name.)
            record = known[1] if known is not None and known[0] == raw else decode(raw, path, name)
            if record is None or record.get("damaged"):
                # No record (a new name, or one whose record went when it was last
                # freed) or a damaged one: a free record whose fence is the store's
                # floor, so that the next lease's fence is above every removed one.
                record = {"name": name, "token": None, **(record or {}), "fence": self._high_water.read()}
            result, new = change(record)
            if new is None and size == 0:
                # An empty file nobody wrote (a look at a name without a record): it
                # goes at once, under its flock; anyone who opened it meanwhile finds
                # it unlinked once they have the flock, and opens the path anew (above).
                if _remove(path):
                    unlock_file(fd)
                    _RECORDS.drop(path)
                    return result
            if new is not None:
                # Free with nobody waiting: the record is kept (written free, its fence
                # in it) and removed later, when this adapter forgets the name (see
                # embedded.deferred); the next cycle of the name rewrites it in place.
                kept_free = not new.get("token") and not new.get("queue")
                # Pad over a longer old record instead of truncating: one write, not two;
                # readers decode the first JSON value and ignore the blanks after it.
                data = encode(new).ljust(size)
                write_at(fd, data, 0)
                if len(self._written) > 4096:
                    self._written.clear()
                self._written[path] = (data, new)  # (change() never alters a record it is given)
            unlock_file(fd)
        except OSError as exc:
            _forget(fd, path)
            raise BrokerLockError(f"{self.url}: could not {action} {name!r}: {exc}") from None
        except BaseException:
            _forget(fd, path)
            raise
        if kept_free:
            self._kept_free(name)  # (after the flock: a removal takes another record's)
        return result

    def _reclaimer(self) -> Callable[[List[str]], None]:
        # (Called before __init__ sets _high_water: the floor's path is spelled out.)
        return functools.partial(_reclaim_records, self.directory, os.path.join(self.directory, "fence"))

    def _reclaim(self, names: List[str]) -> None:
        # Names pushed out by a release: not inside the garbage collector, and no flock
        # of this thread held (see _update), so the thread's kept floor descriptor serves.
        try:
            _reclaim_records(self.directory, self._high_water.path, names, self._high_water)
        except Exception as exc:  # (the release succeeded: the records stay, free)
            log.debug("%s: could not remove %d free records: %r", self.url, len(names), exc)

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

    def _queue(self, record: Optional[Record], now: float) -> List[List[Any]]:
        """The record's waiters ``[token, witness, until, bell, ttl, host, pid, thread]``
        in arrival order, without those whose place ran out, nor those ahead of the
        first live one whose process died. Liveness is tested only up to the head (a
        syscall per entry): those behind it are tested when their turn comes."""
        if record is None:
            return []
        queue = [
            e
            for e in record.get("queue") or []
            if isinstance(e, list) and len(e) == ENTRY_SIZE and e[2] > now
        ]
        while queue and not self._witness.is_alive(queue[0][1]):
            del queue[0]
        return queue

    def _take(
        self, record: Optional[Record], request: Request, now: float, queue: List[List[Any]]
    ) -> Tuple[Lease, Record]:
        """The record after ``request`` took the lock; ``queue`` is the live queue, as the
        caller already found it."""
        new = leased(
            record, request.name, now, request.token, self._witness.mine(), request.ttl,
            request.host, request.pid, request.thread,
            [e for e in queue if e[0] != request.token],
        )
        return self._lease(new), new

    # -- the contract -----------------------------------------------------------
    def try_acquire(self, request: Request) -> Optional[Lease]:
        def change(record: Optional[Record]) -> Tuple[Optional[Lease], Optional[Record]]:
            now = self._clock()
            # A newcomer never overtakes a waiter: free means no holder and no queue.
            if self._holds(record, now) or self._queue(record, now):
                return None, None
            return self._take(record, request, now, [])

        return self._update(request.name, "acquire", change)  # type: ignore[no-any-return]

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        """FIFO: a waiter queues in the record and takes the lock only at the queue's head.

        The head is woken by its bell, rung by whoever frees its way (a release, a
        departure, a break); a holder's death closes the witness file, which wakes
        every waiter. An entry carries a deadline that its waiter refreshes, so a
        waiter that vanished without a witness stalls the queue for at most
        ``entry_life``.
        """
        bells = self._bells_made
        if timeout == 0 or bells is None or not bells.armed():
            lease = self.try_acquire(request)
            if lease is not None or timeout == 0:
                return lease
        # else: a thread whose last wait here found the lock taken (Bells.armed) skips
        # the newcomer's try: its first look takes the lock if free or queues at once,
        # one update of the record instead of two (each a turn at the record's flock,
        # which the holder's release may have to wait for).
        deadline = None if timeout is None else time.monotonic() + timeout
        name, token = request.name, request.token
        witness = self._witness.mine()  # also creates the witness file the waiter watches
        bell = self._bells.make()
        place = QueuePlace(self, request, witness, bell, QUEUE_ENTRY_LIFE)
        taken: Optional[Lease] = None
        try:
            taken = self._bells.wait_turn(
                bell, deadline, self._clock, place.step, lambda news: self._granted(request, news),
                steady=self._pinned,
            )
            return taken
        finally:
            if taken is None:
                self._leave(name, token)

    def _leave(self, name: str, token: str) -> None:
        """Take a waiter that gives up out of the queue. A release may have granted it the
        lock in the meantime: then the lock goes on to the next waiter."""

        def change(record: Optional[Record]) -> Tuple[Any, Optional[Record]]:
            if record is None:
                return None, None
            now = self._clock()
            # (A damaged record may hold anything: only our own well-formed entry goes.)
            queue = [e for e in record.get("queue") or [] if isinstance(e, list) and e]
            if record.get("token") != token and not any(e[0] == token for e in queue):
                return unrung_grant(self._unrung, name, record), None  # (run again: see _unrung)
            new = {**record, "queue": [e for e in queue if e[0] != token]}
            if record.get("token") != token and self._holds(new, now):
                return None, new
            new, news = hand_over(new, now)
            note_grant(self._unrung, name, new, news)
            return news, new

        grant = self._update(name, "leave the queue of", change)
        if grant is not None:  # (self._bells loads the bells: not for a lone name)
            ring(self._bells, self._witness, grant)
            rang(self._unrung, name, grant)

    def abandon(self, name: str, token: str) -> None:
        self._leave(name, token)  # by token: the queue place and any lease of ours

    def _free(self, name: str, action: str, may: Callable[[Record], Any]) -> Any:
        """Clear the lease if ``may(record)`` says so and hand the lock to the next waiter.

        ``may`` returns ``None`` to leave the record alone, else the caller's result.
        """

        def change(record: Optional[Record]) -> Tuple[Tuple[Any, Any], Optional[Record]]:
            result = None if record is None else may(record)
            if result is None:
                return (None, unrung_grant(self._unrung, name, record)), None  # (see _unrung)
            assert record is not None
            new, news = hand_over(record, self._clock())
            note_grant(self._unrung, name, new, news)
            return (result, news), new

        result, news = self._update(name, action, change)
        if news is not None:  # (self._bells loads the bells: not for a lone name)
            ring(self._bells, self._witness, news)
            rang(self._unrung, name, news)
        return result

    def release(self, name: str, token: str) -> bool:
        def may(record: Record) -> Optional[bool]:
            if record.get("token") != token:
                return None
            expires = record.get("expires_at")
            return expires is None or expires > self._clock()

        return bool(self._free(name, "release", may))

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        def change(record: Optional[Record]) -> Tuple[Optional[Lease], Optional[Record]]:
            now = self._clock()
            if record is None or record.get("token") != token or not self._holds(record, now):
                return None, None
            new = {**record, "expires_at": None if ttl is None else stamp(now + ttl)}
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
                fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
            except OSError:
                continue  # removed or replaced under us: not a lock of ours
            try:
                lock_file(fd, shared=True)
                record, _size = _read_record(fd, path, None)
            finally:
                os.close(fd)
            if record is not None and not record.get("damaged") and self._holds(record, now):
                leases.append(self._lease(record))
        return sorted(leases, key=lambda lease: lease.name)

    def force_release(self, name: str) -> bool:
        return bool(
            self._free(name, "break", lambda record: True if self._holds(record, self._clock()) else None)
        )


def _forget(fd: int, path: str) -> None:
    """Unlock and close a record after a failure (``fd`` -1: already closed). Unlocked
    first: a copy of the descriptor that a child forked meanwhile inherited would keep
    the flock alive."""
    if fd >= 0:
        try:
            unlock_file(fd)
        except (OSError, BrokerLockError):
            pass
    _RECORDS.drop(path)
