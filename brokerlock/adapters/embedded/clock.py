"""The embedded stores' clock: the host's boot clock, pinned to the wall clock once per boot.

An embedded store lives on one host, so its leases need no calendar: they are counted
on the host's boot clock (``CLOCK_BOOTTIME``: one for every process on the host, it
never steps, and it goes on while the machine sleeps, as a lease's ttl should). A step
of the wall clock (``date -s``, NTP fixing a clock that was wrong at boot) then neither
ends a lease early nor stretches it.

The stamps in the store stay seconds since the epoch all the same: the first process of
a boot to use a store pins ``offset = wall clock - boot clock`` there, with the boot's
identity, and every process of that boot reads the store's time as ``offset + boot
clock``. So records stay readable by versions that count on the wall clock, and they
agree with them as long as the wall clock does not step. The next boot pins anew; the
leases of an earlier boot belong to processes that are gone, which their witness shows
(see ``embedded.witness``).

Where there is no boot identity (other systems than Linux), the wall clock is used, as
before: a step of it moves every lease by its size.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Tuple

#: Seconds on the host's boot clock: shared by all its processes, never stepped.
boot_clock: Callable[[], float] = time.monotonic
#: Whether ``boot_clock`` is Linux's CLOCK_BOOTTIME, the one a boot identity goes with.
_HAVE_BOOTTIME = False
if sys.platform.startswith("linux") and hasattr(time, "CLOCK_BOOTTIME"):
    _BOOTTIME = time.CLOCK_BOOTTIME
    _HAVE_BOOTTIME = True

    def boot_clock() -> float:
        return time.clock_gettime(_BOOTTIME)


def _read_boot_id() -> str:
    """The identity of this boot of the host (Linux), ``""`` where it is unknown."""
    if not _HAVE_BOOTTIME:
        return ""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""


BOOT_ID = _read_boot_id()


def new_pin() -> Tuple[str, float]:
    """This boot's identity and the offset that turns its boot clock into the wall
    clock of this moment."""
    return BOOT_ID, time.time() - boot_clock()


def pin_text(boot: str, offset: float) -> str:
    return f"{boot} {offset!r}"


def parse_pin(text: str) -> Optional[Tuple[str, float]]:
    """A pin as ``pin_text`` wrote it; ``None`` for anything else."""
    boot, _, offset = text.strip().partition(" ")
    try:
        return (boot, float(offset)) if boot else None
    except ValueError:
        return None
