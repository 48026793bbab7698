"""Liveness without trusting PIDs: a kernel lock that lives exactly as long as a process.

Each process that holds locks in a store takes a POSIX write lock on one randomly
chosen byte of the store's witness file and keeps it until it exits; the offset is
written into every lease it holds. Anyone can test the byte with a non-blocking lock
attempt: if the attempt succeeds, the holder is gone and so is its claim, at once,
without waiting for the ttl. PIDs are never trusted (they are reused and differ
between namespaces).

POSIX record locks are chosen on purpose for their usual trap: they belong to the
process, so a ``fork()`` child never inherits its parent's witness and cannot keep a
dead parent's locks alive. The other trap, that closing any descriptor of the file
drops all the process's locks on it, is avoided by keeping exactly one descriptor
per file per process (the registry below), never closed before exit.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import threading
from typing import Dict, Optional

from ..._platform import HAVE_WITNESS, WAKEUP
from .files import open_private

_RANDOM = random.SystemRandom()

# The byte-lock primitives, split by platform in a way mypy follows. Where there are no
# POSIX record locks (Windows, or fcntl hidden) HAVE_WITNESS is False and neither
# function is ever called: every holder counts as alive and its lease alone decides.
if sys.platform == "win32":
    # Windows: LockFileEx byte locks, dropped by the OS when their process ends (see
    # witness_windows). A Windows process is never forked, so the fork trap is moot.
    from .witness_windows import _try_lock_byte, _unlock_byte

else:
    if HAVE_WITNESS:
        import fcntl

    def _try_lock_byte(fd: int, offset: int) -> bool:
        """Take the write lock on byte ``offset`` without waiting; False if another
        process holds it."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def _unlock_byte(fd: int, offset: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)



class Witness:
    def __init__(self, path: str, liveness_dir: Optional[str] = None) -> None:
        self.path = path
        #: Where this process announces its life to waiters that no inotify tells of
        #: deaths (``embedded.liveness``): the store's bells directory.
        self.liveness_dir = liveness_dir
        self._mutex = threading.Lock()
        self._pid = -1
        self._fd = -1
        self._ident = ""

    def mine(self) -> Optional[str]:
        """This process's mark, ``"dev:inode:offset"``, taking its byte on first use.

        The file's identity is part of the mark so that a checker that reached the
        store by another path (a second hard link, another mount) never tests a byte
        of a different file and wrongly declares a live holder dead.
        """
        if not HAVE_WITNESS:
            return None
        if self._pid == os.getpid():
            return self._ident
        with self._mutex:
            if self._pid != os.getpid():
                self._claim()
            return self._ident

    def _claim(self) -> None:
        if self._fd >= 0:
            # Inherited across fork: the parent's lock did not come with it, and
            # closing our copy cannot drop the parent's lock (it is the parent's).
            os.close(self._fd)
            self._fd = -1
        fd = open_private(self.path, os.O_RDWR)  # (a BrokerLockError naming file and cause)
        for _ in range(16):
            offset = _RANDOM.randrange(1, 1 << 62)
            try:
                if not _try_lock_byte(fd, offset):
                    continue
            except OSError:
                os.close(fd)
                raise
            info = os.fstat(fd)
            self._fd, self._pid = fd, os.getpid()
            self._ident = f"{info.st_dev}:{info.st_ino}:{offset}"
            if WAKEUP == "fifo" and self.liveness_dir is not None:
                from .liveness import announce

                announce(self.liveness_dir, offset, self)
            return
        os.close(fd)
        raise OSError(errno.EAGAIN, "no free witness offset", self.path)

    def is_alive(self, mark: Optional[str]) -> bool:
        """Whether the process that left ``mark`` still runs.

        A holder without a mark, or with a mark in another file, counts as alive: its
        lease decides.
        """
        if not mark or not HAVE_WITNESS:
            return True
        mine = self.mine()
        if mark == mine or mine is None:
            return True
        file_id, _, offset_text = mark.rpartition(":")
        if file_id != mine.rpartition(":")[0] or not offset_text.isdigit():
            return True
        offset = int(offset_text)
        if not _try_lock_byte(self._fd, offset):
            return True
        _unlock_byte(self._fd, offset)
        return False


_registry: Dict[str, Witness] = {}
_registry_mutex = threading.Lock()


def witness_for(path: str, liveness_dir: Optional[str] = None) -> Witness:
    """The one :class:`Witness` of this process for the file at ``path``; its
    ``liveness_dir``, if given, is the store's bells directory."""
    key = os.path.realpath(path)
    with _registry_mutex:
        witness = _registry.get(key)
        if witness is None:
            witness = _registry[key] = Witness(path, liveness_dir)
        elif witness.liveness_dir is None:
            witness.liveness_dir = liveness_dir
        return witness


def _after_fork_in_child() -> None:
    # The child has one thread: a mutex another thread of the parent held at the fork
    # would stay locked for ever. The witnesses themselves re-claim by pid check.
    global _registry_mutex
    _registry_mutex = threading.Lock()
    for witness in _registry.values():
        witness._mutex = threading.Lock()
        # Closed at once, not at the child's first use of the store: the parent's death
        # wakes the waiters by closing the witness file (its last descriptor), and a child
        # that kept a copy open would leave them asleep until their safety net. Safe for
        # the parent: its byte lock is the parent's own (POSIX record locks belong to a
        # process), which a child's close can neither drop nor keep alive.
        if witness._fd >= 0:
            try:
                os.close(witness._fd)
            except OSError:
                pass
            witness._fd = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
