"""Deferred reclamation: the records of recently freed names are kept a while.

A released name with nobody waiting needs no record (its fences are kept by the
store's floor), but removing the record on every release and making it anew on the
next acquire was most of an uncontended cycle: a file's ``open(O_CREAT)``, the floor's
read and raise and an ``unlink``; an ``INSERT`` and a ``DELETE`` in SQLite. So a
release writes the record free and keeps it; the store remembers the name in a small
set of recently freed names (:class:`Deferred`, one per adapter, least recently freed
first out), and removes the record later:

- when the name is pushed out of the set by newer ones (``EVICT_BATCH`` names at a
  time, in one transaction or with one opening of the floor: the store holds at most
  ``KEEP_FREED`` such records per adapter);
- when the adapter is closed, dropped, or the interpreter exits (``weakref.finalize``,
  which also runs at exit: a ``brokerlock run`` from cron leaves nothing).

A removal is exactly the one a release made before: under the record's lock (a
``flock``, SQLite's write transaction), only if the record is still free with no
queue, its fence raised into the store's floor first. So the safety argument is the
one it was: a record is never removed under a holder or a waiter, and a fence never
repeats or goes back. Whoever holds the record meanwhile simply keeps it (and
remembers it in its own set when it frees it). A record left by a process that was
killed stays until somebody next frees its name.
"""

from __future__ import annotations

import collections
from typing import Callable, List, Optional

from ..._log import log

#: Freed names whose records one adapter keeps for reuse. Large enough for a program
#: that cycles through a few dozen names; small enough that ``list`` and the store's
#: size do not notice (64 records of a few hundred bytes, or rows).
KEEP_FREED = 64
#: How many of the oldest names go at once when the set overflows: a one-off name's
#: cycle then pays an eighth of a removal's fixed costs.
EVICT_BATCH = 8


class Deferred:
    """The names whose free records an adapter kept, oldest first.

    ``reclaim(names)`` removes the records of ``names`` that are still free with no
    queue; it must not reference the adapter (it runs when the adapter is garbage,
    from ``weakref.finalize``), must bound any wait for a lock (it may run inside
    the garbage collector, in a thread that holds a record's lock) and must not raise
    for a record it cannot remove: that record stays, as it would after a crash.

    No mutex: each single operation on the ``OrderedDict`` is atomic under the GIL,
    none of them can fail for what another thread did in between, and a name that
    two threads evict at once is reclaimed twice, harmlessly.
    """

    def __init__(
        self, reclaim: Callable[[List[str]], None], size: Optional[int] = None, batch: Optional[int] = None
    ) -> None:
        self._names: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._reclaim = reclaim
        self.size = KEEP_FREED if size is None else size
        self.batch = max(1, min(self.size, EVICT_BATCH if batch is None else batch))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def freed(self, name: str) -> List[str]:
        """Remember that ``name``'s record was left free; the names it pushes out (the
        ``batch`` oldest, once the set holds more than ``size``), whose records the
        caller must now reclaim, outside any record's lock (lock order: one record at
        a time)."""
        names = self._names
        # (Not move_to_end(): another thread's flush or eviction may take the name out
        # in between, and a release must not fail with a KeyError.)
        names.pop(name, None)
        names[name] = None
        if len(names) <= self.size:
            return []
        out: List[str] = []
        for _ in range(self.batch):
            try:
                out.append(names.popitem(last=False)[0])
            except KeyError:  # (emptied by another thread meanwhile)
                break
        return out

    def flush(self) -> None:
        """Reclaim every remembered name (close, garbage collection, exit)."""
        names: List[str] = []
        while True:
            try:
                names.append(self._names.popitem(last=False)[0])
            except KeyError:
                break
        if names:
            self.reclaim(names)

    def reclaim(self, names: List[str]) -> None:
        """Remove the records of ``names`` that are still free with no queue; a failure
        leaves them (free) and is only logged: the release that kept them succeeded."""
        try:
            self._reclaim(names)
        except Exception as exc:  # (at exit, nobody could catch it)
            log.debug("could not remove %d free records: %s", len(names), exc)
