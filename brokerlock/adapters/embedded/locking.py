"""Whole-file kernel locks and positioned I/O for the embedded stores, split by
platform in a way mypy follows: adapters call these, never ``fcntl.flock`` or
``os.pread``, so they type-check on Windows too. Each lock here is held for
microseconds at a time (a record's update, the floor's), never for a lease.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Callable

from ..._platform import HAVE_FCNTL, HAVE_LOCKFILEEX
from ...errors import BrokerLockError

#: Times a busy lock held for microseconds (a record's flock, SQLite's write lock) is
#: tried again at once, after yielding the CPU, before the retries back off with sleeps:
#: the shortest sleep lasts 50 µs or more (the kernel's timer slack).
YIELDS = 4
yield_cpu: Callable[[], None] = getattr(os, "sched_yield", lambda: time.sleep(0))
#: A record's flock is held for microseconds; a writer stopped inside it (SIGSTOP, a
#: debugger) must not hang everyone forever, so give up after this and say why.
MUTEX_PATIENCE = 30.0

#: Why the lock-file store cannot work here, for the error that says so.
NO_FLOCK = (
    f"FileAdapter needs flock() or LockFileEx(), which {sys.platform} does not have; "
    "use SQLiteAdapter on this platform"
)

# Whole-file kernel locks and positioned I/O, split by platform in a way mypy follows:
# adapters call these, never fcntl.flock or os.pread, so they type-check on Windows.
if sys.platform == "win32":
    if HAVE_LOCKFILEEX:  # (a test pretending to be Windows has no msvcrt)
        from .winlock import RECORD_LOCK_AT, lock_range, unlock_range

    def lock_file(fd: int, *, shared: bool = False, blocking: bool = True) -> bool:
        """Lock the open file (one byte past its data: see ``winlock``); with
        ``blocking=False``, False when another handle holds it."""
        if not HAVE_LOCKFILEEX:
            raise BrokerLockError(NO_FLOCK)
        return lock_range(fd, RECORD_LOCK_AT, shared=shared, blocking=blocking)

    def unlock_file(fd: int) -> None:
        if not HAVE_LOCKFILEEX:
            raise BrokerLockError(NO_FLOCK)
        unlock_range(fd, RECORD_LOCK_AT)

    def read_at(fd: int, size: int, offset: int) -> bytes:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)

    def write_at(fd: int, data: bytes, offset: int) -> int:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)

else:
    if HAVE_FCNTL:
        import fcntl

    def lock_file(fd: int, *, shared: bool = False, blocking: bool = True) -> bool:
        """``flock`` the open file; with ``blocking=False``, False when another holds it."""
        if not HAVE_FCNTL:
            raise BrokerLockError(NO_FLOCK)
        operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            operation |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, operation)
        except OSError as exc:
            if not blocking and exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def unlock_file(fd: int) -> None:
        if not HAVE_FCNTL:
            raise BrokerLockError(NO_FLOCK)
        fcntl.flock(fd, fcntl.LOCK_UN)

    def read_at(fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def write_at(fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)


def lock_briefly(fd: int, path: str) -> None:
    """Take the flock of a file that others hold for microseconds at a time, trying
    again politely; a holder stopped inside is reported after ``MUTEX_PATIENCE``."""
    if lock_file(fd, blocking=False):
        return
    for _ in range(YIELDS):
        yield_cpu()
        if lock_file(fd, blocking=False):
            return
    delay = 0.00005
    give_up = time.monotonic() + MUTEX_PATIENCE
    while not lock_file(fd, blocking=False):
        if time.monotonic() > give_up:
            raise BrokerLockError(
                f"lock file {path} has been busy for {MUTEX_PATIENCE:.0f}s: "
                "a process is stopped while updating it"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


def lock_within(fd: int, seconds: float) -> bool:
    """Take the flock of a file that others hold for microseconds at a time, giving up
    (False) after ``seconds``: for work that may be skipped, never waited for."""
    if lock_file(fd, blocking=False):
        return True
    give_up = time.monotonic() + seconds
    tries = 0
    while time.monotonic() < give_up:
        tries += 1
        if tries <= YIELDS:
            yield_cpu()
        else:
            time.sleep(0.0002)
        if lock_file(fd, blocking=False):
            return True
    return False
