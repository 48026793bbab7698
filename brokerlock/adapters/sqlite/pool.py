"""The SQLite store's connections of one process: a few, shared by all its threads.

Why not a connection per thread: SQLite cannot truly close a connection's database
file while another connection of the process has the file open, because closing any
descriptor of a file drops all the process's POSIX locks on it. The descriptor goes
on a list instead and is closed only when the process's last connection to the file
closes (in WAL mode every open connection keeps a lock). A process whose threads come
and go, each with a connection of its own, so kept one descriptor per thread it ever
ran at once, for good. Here connections are never closed in passing: a thread borrows
one for each operation (microseconds: statements never wait for SQLite's locks, see
``sqlite.conn``) from a pool that never makes more than ``POOL_SIZE``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from typing import List, Optional

#: The most connections one adapter opens in a process. More would buy nothing: writers
#: take turns anyway, and a borrower keeps its connection for one statement or a few.
POOL_SIZE = 8
#: A borrower that finds no free slot for this long looks for slots that were lost (an
#: exception between the borrowing and the ``try`` that gives it back) and makes them anew.
REPLENISH_AFTER = 1.0


class Slot:
    """One place in the pool: its connection (``None`` until first needed, or after a
    fault) and the identity of the file that connection opened."""

    __slots__ = ("__weakref__", "conn", "dev", "ino")

    def __init__(self) -> None:
        self.conn: Optional[sqlite3.Connection] = None
        self.dev = self.ino = -1

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


class Pool:
    """``POOL_SIZE`` slots: a borrower takes one, and gives it back.

    Last in, first out: a process with one busy thread uses one connection, as it
    would without a pool. Belongs to one process: after fork() the child makes its
    own (the parent's connections are not for it to use: ``SQLiteConnections._borrow``).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._idle: List[Slot] = []
        self._all: weakref.WeakSet[Slot] = weakref.WeakSet()
        # An RLock: Condition.wait() takes it back in one C call, where a plain Lock's
        # restore is Python code that an interrupt can cut short (see memory.py).
        self._ready_lock = threading.RLock()
        self._ready = threading.Condition(self._ready_lock)
        self._waiting = 0
        #: The (dev, inode) of a database file last reported deleted or replaced, so that
        #: each of the pool's connections does not report it again.
        self.reported = (-1, -1)
        self._replenish()

    def take(self) -> Slot:
        """A free slot, waiting for one if all are lent."""
        try:
            return self._idle.pop()  # (atomic: no lock on the common path)
        except IndexError:
            pass
        with self._ready:
            self._waiting += 1
            try:
                # ``while True``, not ``while not self._idle``: CPython 3.13 leaves the
                # back edge of a loop with a condition outside the frame's handlers
                # (cpython#130279), so a KeyboardInterrupt there would skip this
                # ``finally`` and the ``with``, and keep the pool's lock from every thread.
                while True:
                    if self._idle:
                        return self._idle.pop()
                    if not self._ready.wait(REPLENISH_AFTER):
                        self._replenish()
            finally:
                # Condition.wait()'s own finally can still be cut short on CPython 3.9
                # and 3.10, which look for signals at almost every instruction: take the
                # lock back, or the ``with`` would raise instead of the interrupt.
                if not self._ready_lock._is_owned():  # type: ignore[attr-defined]
                    self._ready_lock.acquire()
                self._waiting -= 1

    def give_back(self, slot: Slot) -> None:
        self._idle.append(slot)
        # A taker counts itself waiting before it looks at the idle list, under the
        # condition's lock: it either sees this slot or is told of it.
        if self._waiting:
            with self._ready:
                self._ready.notify()

    def _replenish(self) -> None:
        # Slots lost on the way (dropped unreturned, their connection closed by the
        # garbage collector) have left the weak set: make up for them.
        for _ in range(POOL_SIZE - len(self._all)):
            slot = Slot()
            self._all.add(slot)
            self._idle.insert(0, slot)  # (under the ones that have a connection)

    def close_idle(self) -> None:
        """Close the connections of the slots not lent at the moment (taken out of the
        pool meanwhile: another thread must not borrow one that is being closed)."""
        taken = []
        while True:
            try:
                taken.append(self._idle.pop())
            except IndexError:
                break
        for slot in taken:
            slot.close()
            self.give_back(slot)
