"""Safe creation of the files and directories that embedded stores keep.

Lock files live in directories other users may be able to write to (``/tmp``, a shared
``/var/lock``): nothing is opened through a symlink, everything is created 0600/0700,
and a directory another user controls is refused with an explanation.
"""

from __future__ import annotations

import os
import stat

from ..errors import BrokerLockError

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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
        return os.open(path, flags | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise BrokerLockError(
                f"refusing to open {path}: it is a symbolic link, which a lock file never is"
            ) from None
        raise BrokerLockError(f"cannot open {path}: {exc.strerror}") from None
