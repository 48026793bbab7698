"""What this operating system offers, decided once at import.

``BROKERLOCK_PORTABLE=1`` turns the OS-specific fast paths off (inotify and FIFO
wake-ups, the kernel-lock liveness witness), so that the fallback a platform without
them would take (polling, the lease alone) can be exercised on Linux.
"""

from __future__ import annotations

import os
import sys

PORTABLE = os.environ.get("BROKERLOCK_PORTABLE", "").strip().lower() in {"1", "true", "yes", "on"}

try:
    import fcntl  # noqa: F401  (only probed here)

    HAVE_FCNTL = True
except ImportError:  # Windows
    HAVE_FCNTL = False

if sys.platform == "win32":
    try:
        import msvcrt  # noqa: F401  (get_osfhandle: LockFileEx needs the handle)

        HAVE_LOCKFILEEX = True
    except ImportError:  # only where a test pretends to be Windows
        HAVE_LOCKFILEEX = False
else:
    HAVE_LOCKFILEEX = False

#: Kernel file locks (flock on POSIX, LockFileEx on Windows): the lock-file store and
#: the liveness witness are built on them.
HAVE_FILE_LOCKS = HAVE_FCNTL or HAVE_LOCKFILEEX
_FORCED = os.environ.get("BROKERLOCK_WAKEUP", "").strip().lower()
if _FORCED not in ("", "fifo"):
    raise ValueError(f"BROKERLOCK_WAKEUP must be 'fifo' or unset, not {_FORCED!r}")
#: How a waiter of an embedded store is woken when its turn comes: "inotify" (Linux),
#: "fifo" (other POSIX systems, or forced by ``BROKERLOCK_WAKEUP=fifo`` to test it on
#: Linux), "event" (Windows named events), or None: it polls (``BROKERLOCK_PORTABLE``).
WAKEUP = None
if not PORTABLE:
    if sys.platform == "win32":
        WAKEUP = "event" if HAVE_LOCKFILEEX else None  # (both need a real Windows)
    elif _FORCED == "fifo" or not sys.platform.startswith("linux"):
        WAKEUP = "fifo" if hasattr(os, "mkfifo") else None
    else:
        WAKEUP = "inotify"
HAVE_INOTIFY = WAKEUP == "inotify"
HAVE_WITNESS = HAVE_FILE_LOCKS and not PORTABLE
