"""Bells that ring through a FIFO: push wake-ups on every POSIX system (macOS above all).

inotify is Linux only; kqueue, its BSD counterpart, cannot be run on the Linux
machines that test this project. A named pipe (FIFO) per bell works everywhere POSIX
does, and here as well, so the tests prove the path macOS takes
(``BROKERLOCK_WAKEUP=fifo`` forces it on Linux). The waiter sleeps in ``poll()`` on
its FIFO's read end; a ring writes one byte into it.

Each waiter keeps a write end of its own FIFO open too: without one, the read end
reports end-of-file (readable at once, for ever) after the first ringer closes its
write end, and a waiter would spin. A ringer opens the write end without blocking;
with nobody reading (the waiter is gone) that fails with ENXIO, and a full pipe
(EAGAIN) has a wake-up pending already: both are fine to ignore.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from typing import Optional, Tuple

from ..base import Waiter
from .files import O_CLOEXEC, O_NOFOLLOW, KeptFiles
from .wakeup import _poller

_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)  # (never used on Windows, which lacks it)
#: Beside each bell file (which carries the news of a ring) lies its FIFO.
SUFFIX = ".fifo"


def make_fifo(path: str) -> Tuple[int, int]:
    """Create the FIFO at ``path`` (0600) and open it: ``(read end, write end)``."""
    if sys.platform == "win32":  # (never chosen there: Windows rings named events)
        raise OSError(f"no FIFOs on {sys.platform}")
    os.mkfifo(path, 0o600)
    read_fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)
    try:
        if not stat.S_ISFIFO(os.fstat(read_fd).st_mode):  # (replaced in between)
            raise OSError(f"{path} is not the FIFO just made")
        write_fd = os.open(path, os.O_WRONLY | _O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)
    except BaseException:
        os.close(read_fd)
        raise
    return read_fd, write_fd


def _open_writer(path: str) -> int:
    fd = os.open(path, os.O_WRONLY | _O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a FIFO")
    return fd


#: FIFOs this thread rang lately, kept open (as ``bells._RUNG_BELLS``).
_RUNG = KeptFiles(16, _open_writer)


def ring_fifo(path: str) -> None:
    """Wake the waiter reading the FIFO at ``path``, if it still reads."""
    try:
        fd = _RUNG.get(path)
    except OSError:  # gone, or nobody reading it (ENXIO)
        return
    try:
        os.write(fd, b"\1")
    except BlockingIOError:
        pass  # full: the waiter has many wake-ups pending already
    except OSError:  # EPIPE: its reader died
        _RUNG.drop(path)


class FifoWaiter(Waiter):
    """Sleeps in ``poll()`` on the read end of its thread's FIFO."""

    def __init__(self, read_fd: int) -> None:
        self._fd = read_fd
        self._poll = _poller(read_fd)
        self._drain()  # rings meant for an earlier wait of this thread

    def wait(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        ms = None if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000) + 1
        if self._poll(ms):
            self._drain()

    def _drain(self) -> None:
        try:
            while True:  # (no loop with a condition inside a ``try``: see sqlite.pool.take)
                if len(os.read(self._fd, 4096)) < 4096:
                    break
        except BlockingIOError:
            pass

    def close(self) -> None:
        pass  # the descriptors are the thread's bell's, kept for its next wait
