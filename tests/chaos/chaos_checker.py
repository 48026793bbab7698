"""Proves mutual exclusion from the chaos journals, or names each counter-example.

The model: an acquisition X occupies the critical section from its ``E`` stamp until
its ``X`` stamp (taken while still holding, right before ``release()``); if its process
was killed before writing ``X``, until the kill, whose sending time the parent noted.
For every later acquisition Y (higher fence) that entered while X was still inside:

* X's lease must have ended before Y took the lock: ``X.expires_at <= Y.acquired_at``
  by the store's own stamps (X was paused or slowed past its ttl). Anything else is a
  violation: two holders at once.
* X's ``release()`` must then have said so (``LockLost``): a release that reports an
  intact lease after someone else acquired is a violation too.
* Its fence is lower than Y's by construction of the pair, so a resource that checks
  fences refuses X's late writes; an entry order that disagrees with the fence order
  is only possible in this excused case (counted as ``fence_inversions``).

Also a violation: a lower fence held only after a higher one had left (a fence went
back; unexcused unless the higher one's lease had ended, as above), a fence issued
twice, a holder that vanished without being killed, and any error or timeout a worker
reported.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional


@dataclass
class Acquisition:
    fence: int
    journal: str
    pid: int
    thread: int
    enter: int  # monotonic ns
    acquired_at: float  # store clock
    expires_at: Optional[float]  # store clock
    exit: Optional[int] = None  # monotonic ns
    outcome: Optional[str] = None  # "ok" | "lost" | None (killed before it knew)
    last: int = 0  # end of its time in the critical section, monotonic ns


@dataclass
class Report:
    acquisitions: int = 0
    released_ok: int = 0
    lost: int = 0
    killed_inside: int = 0
    excused_overlaps: int = 0  # earlier holders that a successor overlapped (after expiry)
    fence_inversions: int = 0
    timeouts: int = 0
    errors: int = 0
    violations: List[str] = field(default_factory=list)

    def summary(self) -> Dict[str, object]:
        return {
            "acquisitions": self.acquisitions,
            "released_ok": self.released_ok,
            "lost_leases": self.lost,
            "killed_inside_critical_section": self.killed_inside,
            "holders_overlapped_after_expiry": self.excused_overlaps,
            "fence_inversions_after_expiry": self.fence_inversions,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "violations": len(self.violations),
        }


def read_journals(directory: str) -> Dict[str, List[str]]:
    """Every journal file's complete lines (a line cut by a SIGKILL is dropped)."""
    journals = {}
    for entry in sorted(os.listdir(directory)):
        if entry.endswith(".log"):
            with open(os.path.join(directory, entry), "rb") as f:
                data = f.read().decode("utf-8", "replace")
            lines = data.split("\n")
            journals[entry] = lines[:-1]  # the last piece has no newline: incomplete or ""
    return journals


def check(journals: Dict[str, Iterable[str]], kills: Dict[str, int]) -> Report:
    """``journals``: name -> lines; ``kills``: journal name -> monotonic ns the SIGKILL was sent."""
    report = Report()
    by_fence: Dict[int, Acquisition] = {}
    for journal, lines in journals.items():
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "E":
                fence_s, pid, thread, enter, acquired_at, expires_at = rest.split(" ")
                fence = int(fence_s)
                acq = Acquisition(
                    fence, journal, int(pid), int(thread), int(enter), float(acquired_at),
                    ast.literal_eval(expires_at),
                )
                if fence in by_fence:
                    other = by_fence[fence]
                    report.violations.append(
                        f"fence {fence} issued twice: {other.journal} and {journal}"
                    )
                    continue
                by_fence[fence] = acq
            elif kind == "X":
                fence_s, exit_ns = rest.split(" ")
                by_fence[int(fence_s)].exit = int(exit_ns)
            elif kind == "R":
                fence_s, outcome = rest.split(" ")
                by_fence[int(fence_s)].outcome = outcome
            elif kind == "T":
                report.timeouts += 1
                report.violations.append(f"{journal}: timeout {rest}")
            elif kind == "F":
                report.errors += 1
                report.violations.append(f"{journal}: error {rest}")
            elif line:
                report.violations.append(f"{journal}: unreadable line {line!r}")

    order: List[Acquisition] = [by_fence[f] for f in sorted(by_fence)]
    report.acquisitions = len(order)
    for acq in order:
        if acq.outcome == "ok":
            report.released_ok += 1
        elif acq.outcome == "lost":
            report.lost += 1
        if acq.exit is not None:
            acq.last = acq.exit
        elif acq.journal in kills:
            # Still inside when its process was killed: inside until at least the kill.
            acq.last = max(acq.enter, kills[acq.journal])
            report.killed_inside += 1
        else:
            acq.last = acq.enter
            report.violations.append(
                f"fence {acq.fence} ({acq.journal}) entered and never left, yet was not killed"
            )

    # Sweep in fence order, keeping the earlier acquisitions that may still overlap a
    # later entry: the earliest entry of any later acquisition bounds what can.
    suffix_min: List[int] = [0] * (len(order) + 1)
    suffix_min[len(order)] = 1 << 62
    for i in range(len(order) - 1, -1, -1):
        suffix_min[i] = min(order[i].enter, suffix_min[i + 1])
    open_: List[Acquisition] = []
    overlapped = set()
    for i, later in enumerate(order):
        for earlier in open_:
            if earlier.last <= later.enter:
                continue
            if _judge(earlier, later, report):
                overlapped.add(earlier.fence)
        open_ = [a for a in open_ if a.last > suffix_min[i + 1]]
        if later.last > suffix_min[i + 1]:
            open_.append(later)
    report.excused_overlaps = len(overlapped)
    return report


def _judge(earlier: Acquisition, later: Acquisition, report: Report) -> bool:
    """``later`` entered while ``earlier`` was still inside: excused only by expiry.

    ``True`` when excused, else the violation is recorded.
    """
    expired = earlier.expires_at is not None and earlier.expires_at <= later.acquired_at
    if later.last <= earlier.enter:
        # Not an overlap: the lower fence was held only after the higher one had left.
        # Fences follow the order the lock was held in, so a fence went backwards.
        what = (
            f"fence {earlier.fence} ({earlier.journal}, entered {earlier.enter}) came after "
            f"fence {later.fence} ({later.journal}, left {later.last}): a fence went back"
        )
    else:
        what = (
            f"fence {earlier.fence} ({earlier.journal}, inside until {earlier.last}) overlaps "
            f"fence {later.fence} ({later.journal}, entered {later.enter})"
        )
    if not expired:
        report.violations.append(
            f"{what}: lease of {earlier.fence} ran to {earlier.expires_at!r}, "
            f"but {later.fence} acquired at {later.acquired_at!r} (releases said "
            f"{earlier.outcome} and {later.outcome})"
        )
        return False
    if earlier.outcome == "ok":
        report.violations.append(f"{what}: release of {earlier.fence} reported an intact lease")
        return False
    if later.enter < earlier.enter:
        report.fence_inversions += 1
    return True

