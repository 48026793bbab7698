"""The witness's byte locks on Windows (see ``witness`` for what they prove).

``LockFileEx`` locks belong to the handle and its process; when the process ends,
however it ends, Windows releases them. Microsoft documents that the release "depends
upon available system resources": in practice it happens as the process's handles
are closed, before a waiter that polls the byte could tell the difference.
"""

from __future__ import annotations

import errno
import sys

from ..._platform import HAVE_LOCKFILEEX

if sys.platform == "win32":
    if HAVE_LOCKFILEEX:  # (a test pretending to be Windows has no msvcrt)
        from .winlock import lock_range, unlock_range

    def _try_lock_byte(fd: int, offset: int) -> bool:
        """Take byte ``offset`` without waiting; False if another process holds it."""
        if not HAVE_LOCKFILEEX:
            raise OSError(errno.ENOSYS, "LockFileEx is not available here")
        return lock_range(fd, offset, blocking=False)

    def _unlock_byte(fd: int, offset: int) -> None:
        unlock_range(fd, offset)
