"""What this operating system offers, decided once at import.

``BROKERLOCK_PORTABLE=1`` turns the OS-specific fast paths off (inotify wake-ups, the
kernel-lock liveness witness), so that the fallback a platform without them takes can
be exercised on Linux.
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

HAVE_INOTIFY = sys.platform.startswith("linux") and not PORTABLE
HAVE_WITNESS = HAVE_FCNTL and not PORTABLE
