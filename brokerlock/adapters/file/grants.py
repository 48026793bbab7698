"""A lock file's release granting the lock to the head of its queue, and the ring that
tells that waiter, which an interrupt must not be able to lose.

A release (or a waiter leaving) grants the lock under the record's flock and rings the
granted waiter's bell after letting the flock go. The grant is noted in the adapter's
``unrung`` notes (``EmbeddedStore._unrung``) before the record is written, and the note
dropped once the ring is done: an interrupt landing anywhere in between leaves the note,
and the release or departure that runs again finds its lease gone, sees the note and,
if the record still shows that grant, rings it then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..embedded.store import grant_news
from .record import Record, leased, stamp_text

if TYPE_CHECKING:
    from ..embedded.bells import Bells
    from ..embedded.witness import Witness

#: A queue entry: ``[token, witness, until, bell, ttl, host, pid, thread]``, all that
#: a release needs to grant the lock to the waiter.
ENTRY_SIZE = 8
#: What a release rings (``ring``): the granted waiter's bell, the news of its grant,
#: its witness mark, and the queue behind it.
Grant = Tuple[Optional[str], bytes, Optional[str], List[List[Any]]]


def hand_over(record: Record, now: float) -> Tuple[Record, Optional[Grant]]:
    """``record`` with its lease cleared and, if a waiter heads the queue, granted to
    that waiter; and the :data:`Grant` to ring it with (``ring``).

    Granting here, under the flock the release holds anyway, spares the woken waiter
    a read-modify-write of its own: its bell tells it the lease it now has (see
    ``EmbeddedStore._granted``). The record stays the truth; the bell is only the news.

    The head's liveness is not tested here but after the flock is let go and the
    head rung (``ring``): a test is a system call (a round trip to wineserver under
    Wine) that every hand-over would wait for while holding the record. A grant to a
    waiter that had died is a dead holder's lease like any other: ``ring`` then
    wakes the first live waiter behind it, which takes the lock from the dead.
    """
    queue = [
        e
        for e in record.get("queue") or []
        if isinstance(e, list) and len(e) == ENTRY_SIZE and e[2] > now
    ]
    if not queue:
        return {**record, "token": None, "witness": None}, None
    token, witness, _until, bell, ttl, host, pid, thread = queue[0]
    new = leased(record, record["name"], now, token, witness, ttl, host, pid, thread, queue[1:])
    news = grant_news(token, new["fence"], new["acquired_at"], new["expires_at"], stamp_text)
    return new, (bell, news, witness, queue[1:])


def ring(bells: Bells, witness: Witness, grant: Optional[Grant]) -> None:
    """Ring the waiter a release granted the lock to; if it had died, wake the first
    live waiter behind it (see ``hand_over``)."""
    if grant is None:
        return
    bell, news, mark, behind = grant
    if bell:
        bells.ring(bell, news)
    if witness.is_alive(mark):
        return
    for entry in behind:
        if witness.is_alive(entry[1]):
            bells.ring(entry[3])
            return


def note_grant(unrung: Dict[str, Any], name: str, new: Record, grant: Optional[Grant]) -> None:
    """Note ``grant`` under the record's flock, before ``new`` is written, until it is
    rung (``rang``)."""
    if grant is not None:
        unrung[name] = (new.get("token"), new.get("fence"), grant)


def unrung_grant(unrung: Dict[str, Any], name: str, record: Optional[Record]) -> Optional[Grant]:
    """The grant of ours noted for ``name`` if the record still shows it: an interrupt
    cut its ring short. A note the record does not bear out was never written, or is
    over (the waiter has released since): it goes."""
    noted = unrung.get(name)
    if noted is None:
        return None
    token, fence, grant = noted
    if record is not None and record.get("token") == token and record.get("fence") == fence:
        return grant  # type: ignore[no-any-return]
    rang(unrung, name, grant)
    return None


def rang(unrung: Dict[str, Any], name: str, grant: Optional[Grant]) -> None:
    """``grant`` was rung: its note goes (a newer note for the name stays)."""
    noted = unrung.get(name)
    if noted is not None and noted[2] is grant:
        unrung.pop(name, None)
