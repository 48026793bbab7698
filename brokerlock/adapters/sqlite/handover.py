"""The SQLite store's queue as a release sees it, and the release itself: granting the
lock to the first live waiter in the statement that frees it, and ringing that waiter.

A mixin of ``SQLiteAdapter`` (``sqlite.adapter``): it uses the adapter's connections
(``sqlite.conn``) and what every embedded store has (``embedded.store``: the witness,
the bells, the notes of grants not yet rung).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Dict, List, Optional, Tuple

from ..base import clock_fence
from ..embedded.store import EmbeddedStore, grant_news
from . import sql
from .conn import SQLiteConnections


class HandOver(SQLiteConnections, EmbeddedStore):
    """The queue's head and holder as a release reads them, and the release."""

    def _head(
        self, conn: sqlite3.Connection, name: str, now: float
    ) -> Tuple[Optional[Tuple[str, Optional[str]]], List[Tuple[int, Optional[str]]]]:
        """The ``(token, bell)`` of the first live waiter, and the ``(ticket, bell)`` of
        the dead ones before it. Liveness is tested only up to the head: those behind
        it are looked at when their turn comes."""
        dead: List[Tuple[int, Optional[str]]] = []
        for ticket, token, witness, until, bell in conn.execute(
            "SELECT ticket, token, witness, until, bell FROM brokerlock_waiters "
            "WHERE name = ? ORDER BY ticket",
            (name,),
        ):
            if until > now and self._witness.is_alive(witness):
                return (token, bell), dead
            dead.append((ticket, bell))
        return None, dead

    def _delete_waiters(self, conn: sqlite3.Connection, dead: List[Tuple[int, Optional[str]]]) -> None:
        if dead:
            conn.executemany("DELETE FROM brokerlock_waiters WHERE ticket = ?", [(t,) for t, _ in dead])
            for _, bell in dead:
                if bell:
                    self._bells.discard(bell)

    def _prune(self, conn: sqlite3.Connection, name: str, now: float) -> bool:
        """Drop waiters that died or vanished; whether there were any."""
        _head, dead = self._head(conn, name, now)
        self._delete_waiters(conn, dead)
        return bool(dead)

    def _holder(self, conn: sqlite3.Connection, name: str, now: float) -> Tuple[bool, Optional[float]]:
        """Whether a live holder has ``name``, and when its lease runs out."""
        row = conn.execute(
            "SELECT token, expires_at, witness FROM brokerlock_locks WHERE name = ?", (name,)
        ).fetchone()
        busy = (
            row is not None
            and row[0] is not None
            and (row[1] is None or row[1] > now)
            and self._witness.is_alive(row[2])
        )
        return busy, (row[1] if busy else None)

    def _next_bell(self, conn: sqlite3.Connection, name: str, *, freed: bool = False) -> Optional[str]:
        """The bell of the waiter whose turn it now is, if the lock is free (as it is
        when the caller has just ``freed`` it)."""
        now = self._clock()
        head, _dead = self._head(conn, name, now)
        if head is None or (not freed and self._holder(conn, name, now)[0]):
            return None
        return head[1]

    def _free(self, name: str, token: str, action: str) -> Optional[Tuple[Any, ...]]:
        """End ``token``'s lease of ``name`` and hand the lock to the next waiter.

        One statement grants the lock to the head of the queue, or clears it when nobody
        waits, and the head's bell carries the news of the grant: the woken waiter then
        has nothing left to do. A lease that is not the caller's, or ran out while
        others wait, goes the careful way: cleared, then granted, step by step.
        """
        params = {"name": name, "token": token, "now": self._clock()}

        def hand_over(conn: sqlite3.Connection, head: Optional[str]) -> Tuple[Optional[str], bytes]:
            if head is None:
                return None, b""
            bell, witness, waiter = head.split(" ", 2)
            if not self._witness.is_alive(witness or None):
                return self._next_bell(conn, name, freed=True), b"\1"
            grant = {**params, "head": waiter, "clock_fence": clock_fence()}
            row = conn.execute(sql.GRANT, grant).fetchone()
            if row is None:  # it left, or a waiter of an older version: it looks itself
                return bell or None, b"\1"
            return bell or None, grant_news(waiter, row[0], row[1], row[2])

        # Noted before the statements that may grant the lock, dropped after their ring
        # (see EmbeddedStore._unrung): a note left by an earlier call means an interrupt
        # cut its ring short, and if our lease is gone now, the waiter the store shows
        # is rung here.
        noted = self._unrung.get(name)
        self._unrung[name] = mark = object()
        released = self._release(name, {**params, "clock_fence": clock_fence()}, action)
        if released is not None:
            if released[1] is None:  # freed, granted to nobody: the row is kept free
                self._kept_free(name)
            self._rang(name, mark)
            return released
        row = self._run(
            f"{action} {name!r}", lambda conn: conn.execute(sql.FREE_LEASE, params).fetchone()
        )
        if row is None or row[1] is None:
            if row is not None:
                self._kept_free(name)
            elif noted is not None:
                self._ring_holder(name, action)
            self._rang(name, mark)
            return row  # type: ignore[no-any-return]
        head = row[1]
        # A step of its own: retrying the release itself would find the lease cleared.
        bell, news = self._run(f"{action} {name!r}", lambda conn: hand_over(conn, head))
        if bell:
            self._bells.ring(bell, news)
        self._rang(name, mark)
        return row  # type: ignore[no-any-return]

    def _rang(self, name: str, mark: object) -> None:
        if self._unrung.get(name) is mark:
            self._unrung.pop(name, None)

    def _ring_holder(self, name: str, action: str) -> None:
        """Ring the waiter the store shows holding ``name`` (with the news of its lease),
        or, the lock free or its holder dead, the head of the queue: after a grant of
        ours whose ring an interrupt cut short. (A holder granted by ``sql.GRANT`` has no
        bell in the row: it finds its grant at its safety net, as before.)"""

        def look(conn: sqlite3.Connection) -> Tuple[Optional[str], bytes]:
            row = conn.execute(
                "SELECT token, fence, acquired_at, expires_at, witness, bell FROM brokerlock_locks "
                "WHERE name = ?", (name,),
            ).fetchone()
            if row is not None and row[0] is not None and self._witness.is_alive(row[4]):
                return row[5], grant_news(row[0], row[1], row[2], row[3])
            return self._next_bell(conn, name, freed=True), b"\1"

        bell, news = self._run(f"{action} {name!r}", look)
        if bell:
            self._bells.ring(bell, news)

    def _release(self, name: str, params: Dict[str, Any], action: str) -> Optional[Tuple[Any, ...]]:
        """The common release in one statement (sql.RELEASE): the row, if it matched."""
        try:  # without the retry machinery
            row, same_file = self._execute_then_look(sql.RELEASE, params)
        except (sqlite3.Error, OSError):  # busy (the statement did nothing) or a fault:
            row = self._run(  # retried or reported there
                f"{action} {name!r}", lambda conn: conn.execute(sql.RELEASE, params).fetchone()
            )
            same_file = True  # (_run looked at the file before the statement)
        if row is not None and not same_file:
            # The release ran in a file that is no longer the store (deleted or replaced
            # under us): the lease it cleared was nobody's to rely on, and a newcomer may
            # hold the lock in the new file. The caller hears LockLost (the careful way
            # finds no lease of its own there); a waiter it granted in the ghost file is
            # woken without news, to look in the new file.
            if row[1] is not None and row[5]:
                self._bells.ring(row[5])
            return None
        if row is None or row[1] is None:
            return row  # type: ignore[no-any-return]  # (None: the careful way)
        expires_at, waiter, fence, acquired_at, witness, bell = row
        if self._witness.is_alive(witness):
            if bell:
                self._bells.ring(bell, grant_news(waiter, fence, acquired_at, expires_at))
            return row  # type: ignore[no-any-return]
        # Granted to a waiter that had died: the next one finds its lease dead and takes it.
        bell = self._run(f"{action} {name!r}", lambda conn: self._next_bell(conn, name, freed=True))
        if bell:
            self._bells.ring(bell)
        return row  # type: ignore[no-any-return]
