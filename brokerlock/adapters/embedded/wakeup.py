"""The inotify primitives under the bells (see ``embedded.bells``), Linux only.

Waiting by sleeping makes every hand-over slow (filelock polls every 50 ms); inotify
lets the kernel wake a waiter within microseconds of a write to the file it watches,
and a waiter blocked in ``poll()`` burns no CPU.
"""

from __future__ import annotations

import os
import select
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence

from ..._log import log
from ..._platform import HAVE_INOTIFY
from ..base import Waiter

IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_TO = 0x80
IN_DELETE = 0x200

#: A file's content changed, or the file was replaced or removed.
MODIFIED = IN_MODIFY | IN_MOVED_TO | IN_DELETE
#: A process closed the file after opening it for writing (also when it died).
CLOSED = IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")

_libc: Any = None
_libc_loaded = False


def libc() -> Any:
    """The C library with inotify, loaded on first use (ctypes costs a cron job ~1 ms
    of start-up, and an uncontended lock never waits); ``None`` where there is none."""
    global _libc, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        if HAVE_INOTIFY:
            import ctypes

            try:
                # dlopen(NULL): the running program with its libc, glibc or musl alike,
                # without ctypes.util.find_library (which would start a subprocess).
                lib = ctypes.CDLL(None, use_errno=True)
                lib.inotify_init1.argtypes = [ctypes.c_int]
                lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
                _libc = lib
            except (OSError, AttributeError):  # pragma: no cover - exotic libc
                _libc = None
    return _libc


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
            data = os.read(self._fd, 4096)
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


class SharedInotifyWaiter(InotifyWaiter):
    """An inotify waiter on the thread's long-lived instance.

    Closing an inotify descriptor waits for an RCU grace period in the kernel, several
    milliseconds: far longer than a whole hand-over. So each thread keeps one instance
    and only adds and drops watches on it; the bell's watch goes away by itself when
    the bell is removed.
    """

    def __init__(self, fd: int, wanted: Dict[int, Dict[bytes, int]]) -> None:
        super().__init__(fd, wanted)
        self._drain()  # events left over from an earlier wait of this thread

    def close(self) -> None:
        self._fd = -1  # the descriptor is the thread's, kept for its next wait


class _Descriptor:
    """Owns one inotify descriptor; closes it when its thread's state is dropped."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pid = fd, os.getpid()

    def __del__(self) -> None:
        if self.pid == os.getpid():  # never close a descriptor inherited through fork
            try:
                os.close(self.fd)
            except OSError:
                pass


_instance = threading.local()


def thread_inotify() -> int:
    """This thread's inotify descriptor, made on first use (and anew after fork)."""
    held: Optional[_Descriptor] = getattr(_instance, "held", None)
    if held is None or held.pid != os.getpid():
        fd = libc().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            import ctypes  # (loaded already, by libc())

            log.debug("inotify unavailable (errno %d); polling instead", ctypes.get_errno())
            return -1
        _instance.held = held = _Descriptor(fd)
    return held.fd
