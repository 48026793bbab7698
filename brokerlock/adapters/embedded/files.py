"""Safe creation of the files and directories that embedded stores keep.

Lock files live in directories other users may be able to write to (``/tmp``, a shared
``/var/lock``): nothing is opened through a symlink, everything is created 0600/0700,
and a directory another user controls is refused with an explanation. The exception is
a directory shared by a group (setgid, group rwx: see docs/shared-stores.rst): there
everything is made group read/write, so that jobs of several users can share a store.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import weakref
from typing import Callable, Dict, Optional, Set

from ...errors import BrokerLockError

#: 0 where the platform has no such flag (Windows): never ``os.O_NOFOLLOW`` directly.
O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
#: Windows only: no newline translation, no Ctrl-Z end of file.
O_BINARY: int = getattr(os, "O_BINARY", 0)


#: A directory shared by a group: setgid (what is created in it gets its group) and
#: group read/write/search. Its files are made group read/write (0660), its
#: directories 02770, whoever comes first; elsewhere 0600 and 0700.
SHARED_DIR_BITS = stat.S_ISGID | stat.S_IRWXG


def shared_group(info: os.stat_result) -> Optional[int]:
    """The group a directory with this ``stat`` is shared with, ``None`` if private."""
    if sys.platform == "win32" or info.st_mode & SHARED_DIR_BITS != SHARED_DIR_BITS:
        return None
    return info.st_gid


if sys.platform == "win32":  # (no groups, no modes: never a shared directory)

    def _in_group(gid: int) -> bool:
        return False

    def _group_read_write(fd: int, only_if_ours: bool = False) -> None:
        pass

else:

    def _in_group(gid: int) -> bool:
        return gid == os.getegid() or gid in os.getgroups()

    def _group_read_write(fd: int, only_if_ours: bool = False) -> None:
        """Mode 0660 past the umask; the group is the directory's (setgid)."""
        if not only_if_ours or os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o660)


def is_shared_dir(path: str) -> bool:
    """Whether what we create in directory ``path`` must be usable by its group."""
    try:
        return shared_group(os.stat(path)) is not None
    except OSError:
        return False


def io_error(what: str, path: str, exc: OSError) -> BrokerLockError:
    """One line for an ``OSError`` on ``path``: an I/O error reads as one, and a
    permission problem names the file (or, if it is missing, its directory), its owner
    and mode, and what to do."""
    if exc.errno == errno.EROFS:
        return BrokerLockError(
            f"cannot {what} {path}: the file system is read-only (I/O error); "
            "put the store on a writable file system"
        )
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return BrokerLockError(f"cannot {what} {path}: I/O error: {exc.strerror or exc}")
    target, subject = path, "owned by"
    if not os.path.lexists(path):
        target = os.path.dirname(path)
        subject = f"its directory {target} is owned by"
    try:
        info = os.lstat(target)
    except OSError as why:
        return BrokerLockError(f"cannot {what} {path}: permission denied ({target}: {why.strerror})")
    mode = stat.S_IMODE(info.st_mode)
    whose = f"{subject} uid {info.st_uid} (gid {info.st_gid}), mode {mode:04o}"
    directory = target if stat.S_ISDIR(info.st_mode) else os.path.dirname(target)
    if hasattr(os, "geteuid") and info.st_uid == os.geteuid():
        hint = f"it is ours but not writable: chmod u+rw{'x' if target == directory else ''} {target}"
    elif is_shared_dir(directory):
        hint = f"every user of this shared store must be in the group of {directory}"
        if target == path:
            hint += (
                ", and its files group read/write (one made before the directory was "
                f"shared: chmod g+rw {path})"
            )
    else:
        hint = (
            "a store is private to the user who made it; to share one between users, "
            "use a directory owned by a common group with the setgid bit "
            "(chgrp GROUP DIR; chmod 2770 DIR; see docs/shared-stores.rst)"
        )
    return BrokerLockError(f"cannot {what} {path}: permission denied, {whose}: {hint}")


def _temporary(path: str) -> str:
    """A name beside ``path`` that nobody else will pick (hidden, never a lock's)."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(6).hex()}.tmp")


def ensure_private_dir(path: str, *, create: bool = True) -> str:
    """Create ``path`` if missing (0700, or 02770 inside a group-shared directory) and
    check that it is ours to lock in."""
    path = os.path.abspath(path)
    if create and not os.path.isdir(path):
        parent = os.path.dirname(path)
        try:
            if os.path.isdir(parent) and is_shared_dir(parent):
                _make_shared_dir(path)
            else:
                os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise io_error("create lock directory", path, exc) from None
    check_dir(path)
    return path


def _make_shared_dir(path: str) -> None:
    """Make directory ``path`` 02770 as it appears: made under a temporary name, its
    mode set past the umask, then renamed into place, so that another user of the
    group never finds it with the umask's mode and refuses it."""
    temporary = _temporary(path)
    os.mkdir(temporary, 0o700)
    try:
        os.chmod(temporary, 0o2770)
        try:
            os.rename(temporary, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            # (Another process made it first: theirs is as good as ours.)
    finally:
        try:
            os.rmdir(temporary)
        except OSError:
            pass


def check_dir(path: str) -> None:
    """Refuse a directory that another user could use to plant files in our way; a
    group-shared one (setgid, group rwx) is fine for members of its group."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise BrokerLockError(f"lock directory {path} is not usable: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise BrokerLockError(f"{path} is not a directory")
    if not hasattr(os, "geteuid"):
        return
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise BrokerLockError(
            f"lock directory {path} is world-writable without the sticky bit: anyone could "
            "delete or replace our lock files; use a private directory (mode 0700), or one "
            "shared by a group (chgrp GROUP DIR; chmod 2770 DIR)"
        )
    uid = os.geteuid()
    if info.st_uid in (uid, 0):
        return
    group = shared_group(info)
    if group is not None and _in_group(group):
        return
    mode = stat.S_IMODE(info.st_mode)
    raise BrokerLockError(
        f"lock directory {path} belongs to uid {info.st_uid} (gid {info.st_gid}, mode "
        f"{mode:04o}), not to us (uid {uid}): another user could replace our lock files; "
        "use a directory of our own, or share one with a group we are in "
        "(chgrp GROUP DIR; chmod 2770 DIR; see docs/shared-stores.rst)"
    )


def open_private(path: str, flags: int) -> int:
    """Open (creating it if missing) without following a symlink at ``path``.

    Created 0600, or 0660 in a group-shared directory: such a file appears at ``path``
    with its final mode (made under a temporary name and linked into place), so that
    another user of the group never meets it with the umask's mode.
    """
    if is_shared_dir(os.path.dirname(path) or "."):
        return _open_shared(path, flags)
    try:
        return os.open(path, flags | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_BINARY, 0o600)
    except OSError as exc:
        raise _open_error(path, exc) from None


def _open_error(path: str, exc: OSError) -> BrokerLockError:
    if os.path.islink(path):
        return BrokerLockError(
            f"refusing to open {path}: it is a symbolic link, which a lock file never is"
        )
    if exc.errno == errno.EEXIST:
        return BrokerLockError(f"cannot create {path}: it exists already")
    return io_error("open", path, exc)


def _create_in_place(path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_CREAT, 0o660)
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        _group_read_write(fd, only_if_ours=True)
    except OSError:
        pass
    return fd


_NEW = os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_BINARY


def _open_shared(path: str, flags: int) -> int:
    exclusive = flags & os.O_EXCL
    flags = (flags & ~(os.O_CREAT | os.O_EXCL)) | O_NOFOLLOW | O_CLOEXEC | O_BINARY
    while True:
        if not exclusive:
            try:
                return os.open(path, flags)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _open_error(path, exc) from None
        temporary = _temporary(path)
        try:
            fd = os.open(temporary, _NEW | os.O_RDWR, 0o600)
        except OSError as exc:
            raise _open_error(path, exc) from None
        try:
            _group_read_write(fd)
            os.link(temporary, path)
            return fd
        except FileExistsError:
            os.close(fd)
            if exclusive:
                raise _open_error(path, FileExistsError(errno.EEXIST, "exists")) from None
            # Another process made it first: open theirs.
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise _open_error(path, exc) from None
            # No hard links on this file system: create in place, mode set at once.
            return _create_in_place(path, flags | (os.O_EXCL if exclusive else 0))
        finally:
            try:
                os.unlink(temporary)
            except OSError:
                pass


# -- descriptors kept open between operations -------------------------------------------
#: Bumped in a child after fork: descriptors opened before it share their open file
#: description (and so their flock) with the parent, and must never be used again.
_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1
    # And closed in the child at once (those of the parent's other threads went with
    # their thread states): a child that outlived its parent must not keep a record's
    # flock alive, taken by a parent killed during an update. Closing the child's copy
    # cannot drop a flock the parent holds: that ends with the description's last copy.
    for kept in list(_every_kept):
        kept._local = threading.local()


#: Every KeptFiles, for ``_forked``.
_every_kept: weakref.WeakSet[KeptFiles] = weakref.WeakSet()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class _Kept:
    __slots__ = ("fd", "generation", "tally")

    def __init__(self, fd: int, tally: Set[int]) -> None:
        self.fd, self.generation, self.tally = fd, _generation, tally
        tally.add(id(self))  # (set.add and discard are atomic: no lock in __del__)

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # (os.close bound early: at interpreter exit the module may be gone already.)
        self.tally.discard(id(self))
        try:
            _close(self.fd)
        except OSError:
            pass


class KeptFiles:
    """The calling thread's open descriptors by path: at most ``keep`` of them, and
    beyond one each, at most ``budget`` for all threads together.

    Opening and closing a file costs more than the read and write a lock operation
    does on it, and all of it lies on the path of a hand-over. Kept per thread, not
    per process: a flock belongs to an open file description, so two threads sharing
    one descriptor would both get in. The budget keeps a server with hundreds of
    threads from spending its descriptors (``ulimit -n``) on our convenience.
    """

    def __init__(self, keep: int, opener: Callable[[str], int], budget: int = 64) -> None:
        self._keep, self._opener, self._budget = keep, opener, budget
        self._local = threading.local()
        self._tally: Set[int] = set()  # id() of every kept descriptor, in all threads
        _every_kept.add(self)

    def _open(self) -> Dict[str, _Kept]:
        try:
            return self._local.open  # type: ignore[no-any-return]
        except AttributeError:
            mine: Dict[str, _Kept] = {}
            self._local.open = mine  # dropped, and its descriptors closed, with the thread
            return mine

    def get(self, path: str) -> int:
        mine = self._open()
        kept = mine.get(path)
        if kept is not None and kept.generation == _generation:
            return kept.fd
        fd = self._opener(path)
        if kept is None:
            while mine and (len(mine) >= self._keep or len(self._tally) >= self._budget):
                del mine[next(iter(mine))]  # the oldest; closed by _Kept
        mine[path] = _Kept(fd, self._tally)
        return fd

    def drop(self, path: str) -> None:
        """Close the descriptor of ``path``, if one is kept."""
        self._open().pop(path, None)
