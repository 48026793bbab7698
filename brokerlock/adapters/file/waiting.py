"""A waiter's place in the queue of a lock file, as one object with its state.

The state a waiter carries between its looks at the record is when its place must be
renewed and which bell to ring for a head it found behind dead waiters. The place is
left by token (``FileAdapter._leave``), so whichever step an interrupt cuts short,
the one cleanup finds what is ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

from ..._platform import WAKEUP
from ..base import Lease, Request
from ..embedded.store import Renewal, entry_life
from .record import Record

if TYPE_CHECKING:
    from ..embedded.liveness import Watch
    from .adapter import FileAdapter

#: What a step tells ``Bells.wait_turn``: the lease if taken, when the current lease
#: expires, a bell to ring, and whose death to watch (``embedded.liveness``).
Step = Tuple[Optional[Lease], Optional[float], Optional[str], "Watch"]
#: Whether a waiter needs to know whom to watch: only where no inotify tells it of
#: every death in the store.
_WATCHES = WAKEUP in ("fifo", "event")


class QueuePlace:
    def __init__(
        self, store: FileAdapter, request: Request, witness: Optional[str],
        bell: Optional[str], life: float,
    ) -> None:
        self.store = store
        self.request = request
        self.witness = witness
        self.bell = bell
        #: When our place must be renewed, lest others drop it.
        self.renewal = Renewal(entry_life(witness, life))
        #: The bell of a new head to ring after this step (dead waiters were dropped).
        self.wake: Optional[str] = None
        #: Whose death the waiter must hear of, as the step found them.
        self.watch: Watch = None

    def step(self) -> Step:
        """One read-modify-write of the record under its flock."""
        self.wake = None
        self.watch = None
        outcome = self.store._update(self.request.name, "acquire", self._join_or_take)
        if isinstance(outcome, Lease):
            return outcome, None, self.wake, None
        return None, outcome, self.wake, self.watch

    def _join_or_take(self, record: Optional[Record]) -> Tuple[Any, Optional[Record]]:
        store, request = self.store, self.request
        token = request.token
        now = store._clock()
        free = not store._holds(record, now)
        if record is not None and record.get("token") == token and not free:
            return store._lease(record), None  # granted by a release; its news was lost
        queue = store._queue(record, now)
        if free and (not queue or queue[0][0] == token):
            return store._take(record, request, now, queue)
        changed = record is None or len(queue) != len(record.get("queue") or [])
        if changed and free and queue:
            self.wake = queue[0][3]  # dead waiters were dropped: tell the new head
        place = next((i for i, e in enumerate(queue) if e[0] == token), None)
        if place is None or self.renewal.due(now):
            entry = [
                token, self.witness, now + self.renewal.life, self.bell,
                request.ttl, request.host, request.pid, request.thread,
            ]
            if place is None:
                queue.append(entry)
            else:
                queue[place] = entry  # a refresh keeps the place in line
            self.renewal.done(now)  # (written when the record is: a failed write raises)
            changed = True
        if _WATCHES:
            # The holder, and the waiters ahead of us nearest first: the one that takes
            # over from the holder is among them (``liveness``). Their pids are those of
            # their processes (``Request.pid``): Windows watches a process by its pid.
            held = None if free or record is None else (record.get("witness"), record.get("pid"))
            ahead = queue[: place if place is not None else len(queue) - 1]
            self.watch = held, [(e[1], e[6]) for e in reversed(ahead)]
        if not changed:
            return expiry(record), None
        base = record if record is not None else {"name": request.name, "fence": 0, "token": None}
        return expiry(record), {**base, "queue": queue}


def expiry(record: Optional[Record]) -> Optional[float]:
    """When the current lease runs out, if there is one: a waiter must look again then."""
    if record is None or not record.get("token"):
        return None
    expires = record.get("expires_at")
    return float(expires) if expires is not None else None
