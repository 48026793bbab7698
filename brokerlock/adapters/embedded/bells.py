"""Doorbells: wake exactly the waiter whose turn it is, not the whole crowd.

Waking every waiter on every change of a lock (a thundering herd) costs each hand-over
one context switch and one look at the store per waiter; with eight processes that is
a hundred times the hand-over itself. Instead each waiter of an embedded store creates
a small file of its own, its bell, and sleeps in inotify on that file alone (and on the
store's witness file, whose closing announces the death of a process). Whoever makes it
the queue's head (a release, a departure, a break) writes one byte into its bell.

Where inotify is missing the bell still carries the news, and the wake-up takes
another way (``_platform.WAKEUP``): a FIFO beside the bell on other POSIX systems
(``wakeup_fifo``), a named event on Windows (``wakeup_windows``). Neither can tell of
a process's death as inotify on the witness file does: there a waiter also watches
the holder and the waiter ahead of it (``liveness``: their liveness FIFOs, or their
process handles), and looks again every ``DEATH_NET`` only where it cannot. Only with
``BROKERLOCK_PORTABLE=1`` are no bells made, and waiters poll with backoff.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional, Tuple

from ..._log import log
from ..._platform import WAKEUP
from ...errors import BrokerLockError
from ..base import BackoffWaiter, Lease, Waiter
from .files import O_CLOEXEC, O_NOFOLLOW, KeptFiles, ensure_private_dir, open_private
from .liveness import DEAD, SETTLING, UNWATCHED, WATCHED, Watch, Watches
from .liveness import sweep as sweep_liveness
from .locking import read_at, write_at
from .wakeup import CLOSED, MODIFIED, SharedInotifyWaiter, libc, thread_inotify
from .wakeup_fifo import SUFFIX as FIFO_SUFFIX
from .wakeup_fifo import FifoWaiter, make_fifo, ring_fifo
from .witness import Witness, witness_for

if sys.platform == "win32" and WAKEUP == "event":  # (not where a test pretends to be Windows)
    from .wakeup_windows import EventWaiter, close_event, make_event, pid_alive, ring_event

_IN_ATTRIB = 0x4
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
#: What wakes a waiter on its bell: a ring, and the bell's removal (a pruner that took
#: the waiter for dead, the store's directory removed). The waiter keeps its bell open,
#: so a removal never evicts the inode (no IN_DELETE_SELF): its link count changing
#: (IN_ATTRIB) is what tells. (A chmod of the bell only costs a spurious look.)
_RUNG = MODIFIED | _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF
#: Without a bell to ring, a waiter polls; this caps its sleep.
POLL_CAP = 0.1
#: A waiter looks again at least this often, whatever it was told: a lost ring, a wall
#: clock corrected forward past a lease's end (a store whose clock is not the boot
#: clock: ``embedded.clock``), a bell removed under its waiter (FIFOs, events) cost at
#: most this much. Every hand-over rings, so this is only a net.
SAFETY_NET = 4.0
#: The net is this many times longer where it has nothing but a lost ring to catch:
#: with inotify (the witness tells of every death, the bell of its own removal:
#: ``_RUNG``) on a store counted on the boot clock, which never steps. Each look wakes a
#: process whose caches went cold while it slept: 0.25-0.45 ms of CPU, as much as
#: queueing and taking the lock together; at 4 s, the one look of a 5 s wait made such
#: a waiter miss the target of 1 ms per 5 s (1.1-1.5 ms; 0.5-0.7 ms without it).
QUIET_NET = 1.5
#: Where no inotify watches the witness file (FIFO and event wake-ups), a waiter is
#: told of the death of its holder and of the waiter ahead of it by ``liveness``. Where
#: it cannot watch one of them (a holder of an older version, no FIFO, no process
#: handle), it looks again this often instead, and finds the dead one's byte free.
DEATH_NET = 2.0
#: How often a waiter looks while a death it was told of is still under way (see
#: ``liveness.SETTLE_TIME``).
SETTLE = 0.01


class _OwnBell:
    """A thread's bell in one store: kept for all its waits, removed with the thread.

    Its descriptor stays open for reading the news a ring brings (a grant).
    """

    def __init__(self, path: str, fd: int, witness: Witness) -> None:
        self.path, self.fd, self.pid = path, fd, os.getpid()
        self.name = os.path.basename(path)
        #: Whether the thread's last wait here found the lock taken at its first look
        #: (``Bells.armed``): then its next acquire most likely waits too.
        self.contended = False
        #: The thread's open watches on the deaths of others (``liveness``).
        self.watches = Watches(os.path.dirname(path), witness)
        #: The FIFO's two ends (``wakeup_fifo``), or the event's handle in ``read_fd``.
        self.read_fd = self.write_fd = self.event = -1
        try:
            if WAKEUP == "fifo":
                self.read_fd, self.write_fd = make_fifo(path + FIFO_SUFFIX)
            elif WAKEUP == "event" and sys.platform == "win32":
                self.event = make_event(self.name)
        except OSError:
            self._drop()
            raise

    def _drop(self) -> None:
        self.watches.close()
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        if sys.platform == "win32" and self.event >= 0:
            close_event(self.event)
        self.read_fd = self.write_fd = self.event = -1
        for path in (self.path + FIFO_SUFFIX, self.path):
            try:
                os.unlink(path)
            except OSError:
                pass
        os.close(self.fd)

    def __del__(self) -> None:
        if self.pid == os.getpid():
            try:
                self._drop()
            except Exception:  # (a destructor must not print; at exit modules are half gone)
                pass


_own = threading.local()


def _still_there(own: _OwnBell) -> bool:
    """Whether the thread's bell file is still there to be rung. A pruner may have taken a
    stalled waiter's bell for dead and removed it. Not looked at on Windows: our open
    handle (no FILE_SHARE_DELETE) keeps it from being removed, and the look would cost
    a round trip to wineserver under Wine on every wait."""
    return sys.platform == "win32" or os.path.exists(own.path)


def _open_bell(path: str) -> int:
    return os.open(path, os.O_WRONLY | O_NOFOLLOW | O_CLOEXEC)


#: Bells this thread rang lately, kept open: the next release is likely to ring them
#: again. A kept bell cannot turn into another waiter's: each is named once, at random,
#: and a bell removed and made anew gets a new name; ringing a removed one wakes nobody.
_RUNG_BELLS = KeptFiles(16, _open_bell)


class Bells:
    """The bells of one store, in a private directory beside it.

    A bell belongs to a thread and serves all its waits: making and removing a file
    per wait would put an unlink (tens of µs) on every hand-over. A ring meant for a
    wait that already ended only causes one spurious wake-up of the next wait.
    Bells of processes that died are removed by whoever finds them dead in a queue,
    and by the first process to use the store after them (``_sweep``).
    """

    def __init__(self, directory: str, witness_path: str) -> None:
        self.directory = directory
        self.witness_path = witness_path
        self.witness = witness_for(witness_path, directory)
        self._swept_by = -1

    def _path(self, bell: str) -> str:
        return os.path.join(self.directory, bell)

    def make(self) -> Optional[str]:
        """The calling thread's bell, or ``None`` where bells cannot wake anyone."""
        if WAKEUP is None or (WAKEUP == "inotify" and libc() is None):
            return None
        made = self.made()
        if made is not None:
            return made
        bells = getattr(_own, "bells", None)
        if bells is None:
            bells = _own.bells = {}
        if self._swept_by != os.getpid():
            if os.path.islink(self.directory):
                # Ours to create, never a link: someone wants our bells elsewhere.
                raise BrokerLockError(
                    f"refusing to use {self.directory}: it is a symbolic link, which the "
                    "directory of a store's bells never is"
                )
            ensure_private_dir(self.directory)
            self._sweep()
        name = f"{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}"
        try:
            fd = open_private(self._path(name), os.O_RDWR | os.O_EXCL)
        except BrokerLockError as exc:
            log.debug("no bell for a waiter (%s); it will poll", exc)
            return None
        try:
            bells[self.directory] = _OwnBell(self._path(name), fd, self.witness)
        except OSError as exc:
            log.debug("no %s for a waiter's bell (%s); it will poll", WAKEUP, exc)
            return None
        return name

    def made(self) -> Optional[str]:
        """The calling thread's bell here if it has one already (it waited here before),
        else ``None``: a thread that waits again may queue in its first look."""
        own = self._own()
        return None if own is None or not _still_there(own) else own.name

    def armed(self) -> bool:
        """Whether the calling thread's next acquire here should skip the newcomer's
        attempt and take or queue in its first look, one update of the store instead of
        two (under contention each update is a turn at the record's flock or SQLite's
        write lock, which the holder's release then waits for).

        A FIFO or a named event wakes its thread without any set-up per wait: armed as
        soon as the bell exists. An inotify waiter adds its watches before its first
        look, which an uncontended acquire would pay for nothing (~20-40 µs): armed only
        while the thread's last wait here found the lock taken (``_OwnBell.contended``).
        """
        own = self._own()
        if own is None or WAKEUP is None or (WAKEUP == "inotify" and not own.contended):
            return False
        return _still_there(own)

    def _own(self) -> Optional[_OwnBell]:
        own: Optional[_OwnBell] = getattr(_own, "bells", {}).get(self.directory)
        return None if own is None or own.pid != os.getpid() else own

    def news(self) -> bytes:
        """What the last ring of the calling thread's bell in this store said."""
        own = self._own()
        if own is None:
            return b""
        try:
            return read_at(own.fd, 256, 0)
        except OSError:
            return b""

    def _sweep(self) -> None:
        """Remove the bells of processes that no longer exist (cheap garbage collection;
        a reused PID only keeps an empty file a little longer)."""
        self._swept_by = os.getpid()
        if WAKEUP == "fifo":
            sweep_liveness(self.directory, self.witness)
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            pid = name.split(".", 1)[0]
            if not pid.isdigit():
                continue
            if sys.platform == "win32":  # (os.kill(pid, 0) would terminate it there)
                if not pid_alive(int(pid)):
                    self.discard(name)
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                self.discard(name)
            except OSError:
                pass  # alive, but another user's

    def waiter(self, bell: Optional[str]) -> Waiter:
        """Sleep until ``bell`` rings or a process of the store exits."""
        if WAKEUP in ("fifo", "event") and bell is not None:
            own: Optional[_OwnBell] = getattr(_own, "bells", {}).get(self.directory)
            if own is None or own.name != bell or own.pid != os.getpid():
                return BackoffWaiter(POLL_CAP)
            if sys.platform == "win32" and own.event >= 0:
                return EventWaiter(own.event, own.watches)
            if own.read_fd >= 0:
                return FifoWaiter(own.read_fd, own.watches)
            return BackoffWaiter(POLL_CAP)
        lib = libc()
        if bell is None or lib is None:
            return BackoffWaiter(POLL_CAP)
        fd = thread_inotify()
        if fd < 0:
            return BackoffWaiter(POLL_CAP)
        wanted = {}
        watches = [(self._path(bell), _RUNG)]
        if os.path.exists(self.witness_path):  # (none where there is no witness)
            watches.append((self.witness_path, CLOSED))
        for path, mask in watches:
            wd = lib.inotify_add_watch(fd, os.fsencode(path), mask)
            if wd < 0:
                return BackoffWaiter(POLL_CAP)
            wanted[wd] = {b"": mask}
        return SharedInotifyWaiter(fd, wanted)

    def wait_turn(
        self,
        bell: Optional[str],
        deadline: Optional[float],
        clock: Callable[[], float],
        step: Callable[[], Tuple[Optional[Lease], Optional[float], Optional[str], Watch]],
        granted: Optional[Callable[[bytes], Optional[Lease]]] = None,
        steady: bool = False,
    ) -> Optional[Lease]:
        """A queued waiter's loop: ``step()`` tries to take the lock and returns
        ``(lease or None, when the current lease expires or None, a bell to ring or
        None, whose death to watch: ``liveness.Watch``)``; between steps the waiter
        sleeps until its bell rings, a death it watches, the lease expires, the safety
        net or the monotonic ``deadline`` (``None``: never).

        A release may grant the lock to the waiter it wakes and say so in the ring:
        ``granted(news)`` turns that news into the waiter's lease, sparing it a step.
        ``steady``: ``clock`` is the store's boot clock, which never steps (``QUIET_NET``).
        """
        net = SAFETY_NET * QUIET_NET if steady and WAKEUP == "inotify" else SAFETY_NET
        with self.waiter(bell) as waiter:
            lease, expires, wake, watch = step()
            own = self._own() if bell is not None else None
            if own is not None and own.name == bell:
                own.contended = lease is None
            while True:
                self.ring(wake)
                if lease is not None:
                    return lease
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                bound = net
                if WAKEUP != "inotify":
                    # The push is a hint; after any wake the step looks at the truth.
                    watched = _watch(waiter, watch)
                    if watched == DEAD:  # someone it would watch is dead already
                        lease, expires, wake, watch = step()
                        continue
                    if watched != WATCHED:
                        bound = SETTLE if watched == SETTLING else DEATH_NET
                if expires is not None:
                    bound = min(bound, max(0.0, expires - clock()) + 0.001)
                waiter.wait(bound if remaining is None else min(bound, remaining))
                lease = None if granted is None or bell is None else granted(self.news())
                if lease is not None:
                    return lease
                lease, expires, wake, watch = step()

    def ring(self, bell: Optional[str], news: bytes = b"\1") -> None:
        """Wake the waiter of ``bell``, telling it ``news``; a bell that is gone has
        nobody left to wake."""
        if not bell:
            return
        path = self._path(bell)
        try:
            fd = _RUNG_BELLS.get(path)
        except OSError:
            return
        try:
            write_at(fd, news, 0)
        except OSError as exc:
            _RUNG_BELLS.drop(path)
            log.debug("could not ring bell %s: %s", bell, exc)
            return
        if WAKEUP == "fifo":
            ring_fifo(path + FIFO_SUFFIX)
        elif WAKEUP == "event" and sys.platform == "win32":
            ring_event(bell)

    def discard(self, bell: Optional[str]) -> None:
        """Remove the bell of a waiter that died."""
        if not bell or os.sep in bell or "/" in bell or bell.startswith("."):
            return
        for path in (self._path(bell) + FIFO_SUFFIX, self._path(bell)):
            try:
                os.unlink(path)
            except OSError:
                pass


def _watch(waiter: Waiter, watch: Watch) -> str:
    """Have ``waiter`` watch the deaths ``watch`` names: see ``Watches.choose``."""
    if isinstance(waiter, FifoWaiter):
        return waiter.watch(watch)
    if sys.platform == "win32" and WAKEUP == "event" and isinstance(waiter, EventWaiter):
        return waiter.watch(watch)
    return UNWATCHED
