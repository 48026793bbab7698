"""Safe creation of the files and directories that embedded stores keep.

Lock files live in directories other users may be able to write to (``/tmp``, a shared
``/var/lock``): nothing is opened through a symlink, everything is created 0600/0700,
and a directory another user controls is refused with an explanation.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from typing import Callable, Dict

from .._platform import HAVE_FCNTL
from ..errors import BrokerLockError

#: 0 where the platform has no such flag (Windows): never ``os.O_NOFOLLOW`` directly.
O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
#: Windows only: no newline translation, no Ctrl-Z end of file.
O_BINARY: int = getattr(os, "O_BINARY", 0)

#: Why the lock-file store cannot work here, for the error that says so.
NO_FLOCK = (
    f"FileAdapter needs flock(), which {sys.platform} does not have; "
    "use SQLiteAdapter on this platform"
)

# Whole-file kernel locks and positioned I/O, split by platform in a way mypy follows:
# adapters call these, never fcntl.flock or os.pread, so they type-check on Windows.
if sys.platform == "win32":

    def lock_file(fd: int, *, shared: bool = False, blocking: bool = True) -> bool:
        raise BrokerLockError(NO_FLOCK)

    def unlock_file(fd: int) -> None:
        raise BrokerLockError(NO_FLOCK)

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


def ensure_private_dir(path: str, *, create: bool = True) -> str:
    """Create ``path`` (0700) if missing and check that it is ours to lock in."""
    path = os.path.abspath(path)
    if create and not os.path.isdir(path):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise BrokerLockError(f"cannot create lock directory {path}: {exc.strerror}") from None
    check_dir(path)
    return path


def check_dir(path: str) -> None:
    """Refuse a directory that another user could use to plant files in our way."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise BrokerLockError(f"lock directory {path} is not usable: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise BrokerLockError(f"{path} is not a directory")
    if not hasattr(os, "geteuid"):
        return
    uid = os.geteuid()
    if info.st_uid not in (uid, 0):
        raise BrokerLockError(
            f"lock directory {path} belongs to uid {info.st_uid}, not to us (uid {uid}): "
            "another user could replace our lock files; use a directory of our own"
        )
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise BrokerLockError(
            f"lock directory {path} is world-writable without the sticky bit: anyone could "
            "delete or replace our lock files; use a private directory (mode 0700)"
        )


def open_private(path: str, flags: int) -> int:
    """Open (creating 0600) without following a symlink at ``path``."""
    try:
        return os.open(path, flags | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_BINARY, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise BrokerLockError(
                f"refusing to open {path}: it is a symbolic link, which a lock file never is"
            ) from None
        raise BrokerLockError(f"cannot open {path}: {exc.strerror}") from None


# -- descriptors kept open between operations -------------------------------------------
#: Bumped in a child after fork: descriptors opened before it share their open file
#: description (and so their flock) with the parent, and must never be used again.
_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class _Kept:
    __slots__ = ("fd", "generation")

    def __init__(self, fd: int) -> None:
        self.fd, self.generation = fd, _generation

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class KeptFiles(threading.local):
    """The calling thread's open descriptors by path, at most ``keep`` of them.

    Opening and closing a file costs more than the read and write a lock operation
    does on it, and all of it lies on the path of a hand-over. Kept per thread, not
    per process: a flock belongs to an open file description, so two threads sharing
    one descriptor would both get in.
    """

    def __init__(self, keep: int, opener: Callable[[str], int]) -> None:
        self._keep, self._opener = keep, opener
        self._open: Dict[str, _Kept] = {}

    def get(self, path: str) -> int:
        kept = self._open.get(path)
        if kept is not None and kept.generation == _generation:
            return kept.fd
        fd = self._opener(path)
        if kept is None and len(self._open) >= self._keep:
            del self._open[next(iter(self._open))]  # the oldest; closed by _Kept
        self._open[path] = _Kept(fd)
        return fd

    def drop(self, path: str) -> None:
        """Close the descriptor of ``path``, if one is kept."""
        self._open.pop(path, None)
