"""Wake a waiter when a file it cares about changes: inotify on Linux, backoff elsewhere.

Waiting by sleeping makes every hand-over slow (filelock polls every 50 ms); inotify
lets the kernel wake a waiter within microseconds of the holder's write, and a waiter
blocked in ``poll()`` burns no CPU. Directories are watched rather than files, so a
file that is replaced or created after the watch is set still counts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import sys
import time
from typing import Callable, Dict, Mapping, Optional, Sequence

from ._platform import HAVE_INOTIFY
from .adapters.base import BackoffWaiter, Waiter

log = logging.getLogger("brokerlock")

IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE

#: A file's content changed, or the file was replaced or removed.
MODIFIED = IN_MODIFY | IN_MOVED_TO | IN_DELETE
#: A process closed the file after opening it for writing (also when it died).
CLOSED = IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")

_libc: Optional[ctypes.CDLL] = None
if HAVE_INOTIFY:
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _libc = None


#: Wait up to ``ms`` milliseconds (None: forever) for one descriptor to become readable;
#: a non-empty result means it did.
Poller = Callable[[Optional[int]], Sequence[object]]

if sys.platform != "win32" and hasattr(select, "poll"):

    def _poller(fd: int) -> Poller:
        # poll(), not select(): select() cannot watch a descriptor above FD_SETSIZE (1024).
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        return poll.poll

else:  # a platform without poll(); only reached if inotify is found there all the same

    def _poller(fd: int) -> Poller:
        def wait(ms: Optional[int]) -> Sequence[object]:
            ready, _, _ = select.select([fd], [], [], None if ms is None else ms / 1000)
            return ready

        return wait


class InotifyWaiter(Waiter):
    """Wakes when one of the watched files sees one of the events asked for it."""

    def __init__(self, fd: int, wanted: Dict[int, Dict[bytes, int]]) -> None:
        self._fd = fd
        self._wanted = wanted
        self._poll = _poller(fd)

    def wait(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ms = None if remaining is None else int(remaining * 1000) + 1
            if not self._poll(ms):
                return
            if self._drain():
                return
            if remaining is not None and remaining <= 0:
                return

    def _drain(self) -> bool:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return False
        hit = False
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            name = data[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            if mask & self._wanted.get(wd, {}).get(name, 0):
                hit = True
        return hit

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def file_waiter(events: Mapping[str, int], fallback_cap: float = 0.1) -> Waiter:
    """A waiter for ``{path: MODIFIED | CLOSED}``; a :class:`BackoffWaiter` where
    inotify is not to be had.

    Each path gets only the events asked for: waking on every close of a lock file
    would let waiters that open it to look wake each other forever.
    """
    if _libc is None:
        return BackoffWaiter(fallback_cap)
    fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        # Usually max_user_instances (128) is used up: degrade, do not fail the wait.
        log.debug("inotify unavailable (errno %d); polling instead", ctypes.get_errno())
        return BackoffWaiter(fallback_cap)
    wanted: Dict[int, Dict[bytes, int]] = {}
    by_dir: Dict[str, Dict[bytes, int]] = {}
    for path, mask in events.items():
        directory, base = os.path.split(os.path.abspath(path))
        names = by_dir.setdefault(directory, {})
        names[os.fsencode(base)] = names.get(os.fsencode(base), 0) | mask
    for directory, names in by_dir.items():
        wd = _libc.inotify_add_watch(fd, os.fsencode(directory), _MASK)
        if wd < 0:
            os.close(fd)
            log.debug("inotify_add_watch(%s) failed; polling instead", directory)
            return BackoffWaiter(fallback_cap)
        wanted.setdefault(wd, {}).update(names)
    return InotifyWaiter(fd, wanted)
