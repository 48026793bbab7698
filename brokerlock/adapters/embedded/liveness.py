"""News of a process's death, pushed to the waiters where no inotify watches the
witness file (the FIFO wake-ups of macOS, the named events of Windows).

On Linux, inotify on the witness file tells a waiter at once that some process closed
it, and every process's exit closes it. Elsewhere nothing pushes a death, and a waiter
would have to look at its holder's witness byte several times a second. Instead:

- POSIX (``WAKEUP == "fifo"``): a process that takes a witness byte at ``offset`` also
  makes a FIFO ``live.<offset>`` in the store's bells directory and keeps its write end
  open for its life (``announce``). A waiter finds the FIFO by the offset in the
  holder's witness mark, opens its read end without blocking and polls it beside its
  bell's FIFO: when the last writer closes, that is when the process ends however it
  ends, ``poll()`` reports POLLHUP. Nobody ever writes into it.
- Windows (``WAKEUP == "event"``): the waiter also waits on the holder's process handle
  (``OpenProcess(SYNCHRONIZE)`` by the pid in the lease), signalled when it ends.

Either way the push is only a hint: after any wake the waiter looks at the store and
the witness byte, which are the truth. A push that cannot be had (no mark, no FIFO, a
holder of an older version, a pid reused by another process) costs only its speed: the
waiter then looks again every ``bells.DEATH_NET``.

Whom a waiter watches: the holder, and the nearest live waiter ahead of it in the
queue (``Watch``). When the holder dies, the head wakes and takes the lock; when a
waiter ahead dies, the one behind it wakes and moves up; and since the holder of
tomorrow is a waiter ahead today, a grant never leaves anyone watching the wrong
process. Each waiter keeps at most two such descriptors in its poll set. (A lock
file's look lists the whole queue, so a dead waiter ahead is passed over for the next
one; SQLite's look reads only the nearest, and a dead one there leaves the waiter to
the net until the queue drops it.)
"""

from __future__ import annotations

import atexit
import errno
import os
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence, Tuple

from ..._log import log
from .files import O_CLOEXEC, O_NOFOLLOW, ensure_private_dir, is_shared_dir

if TYPE_CHECKING:
    from .witness import Witness

#: A process a waiter may watch: its witness mark, and its pid (used on Windows only,
#: where a process handle is the push; a pid alone is never trusted for liveness).
Peer = Tuple[Optional[str], Optional[int]]
#: What a queued waiter's look tells it to watch: the holder (``None``: the lock is not
#: held by a live holder) and the waiters ahead of it, nearest first (empty: it heads
#: the queue). ``None`` instead of a pair: the look could not tell (the waiter then
#: falls back to the net).
Watch = Optional[Tuple[Optional[Peer], Sequence[Peer]]]

_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
PREFIX = "live."

# -- a process's own FIFOs ---------------------------------------------------------------

#: This process's liveness FIFOs: path -> write end. Never closed before exit: closing
#: is the news of our death.
_own: Dict[str, int] = {}
_own_pid = -1
_own_mutex = threading.Lock()


def _offset_of(mark: Optional[str]) -> Optional[str]:
    offset = None if not mark else mark.rpartition(":")[2]
    return offset if offset and offset.isdigit() else None


def announce(directory: str, offset: int, witness: Witness) -> None:
    """Make this process's liveness FIFO for witness byte ``offset`` in ``directory``
    (the store's bells) and keep its write end open; first remove the FIFOs of
    processes that died (their bytes are free), so that the directory does not grow.

    Best effort: a process without a FIFO is only watched by its waiters' net."""
    global _own_pid
    if sys.platform == "win32":  # (never called there: Windows watches process handles)
        return
    try:
        if os.path.islink(directory):
            log.debug("no liveness FIFO: %s is a symbolic link", directory)
            return
        ensure_private_dir(directory)
        sweep(directory, witness)
        path = os.path.join(directory, f"{PREFIX}{offset}")
        _make(path, directory)
        try:
            writer = _open_writer(path)
        except OSError:
            # Never left without its writer: a waiter would take it for watched, and
            # no hang-up would ever come.
            os.unlink(path)
            raise
    except Exception as exc:  # (BrokerLockError from the directory's checks, OSError)
        log.debug("no liveness FIFO in %s (%s); waiters will look for our death", directory, exc)
        return
    with _own_mutex:
        if _own_pid != os.getpid():
            _own.clear()
            _own_pid = os.getpid()
        _own[path] = writer
        _hook()


def _open_writer(path: str) -> int:
    # A writer cannot open a FIFO without blocking while nobody reads it (ENXIO), and
    # O_RDWR on a FIFO is undefined by POSIX: so a reader for a moment.
    reader = os.open(path, os.O_RDONLY | _O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)
    try:
        if not stat.S_ISFIFO(os.fstat(reader).st_mode):
            raise OSError(errno.EINVAL, "not the FIFO just made", path)
        return os.open(path, os.O_WRONLY | _O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)
    finally:
        os.close(reader)


def _make(path: str, directory: str) -> None:
    """The FIFO at ``path``: 0600, or 0660 in a group-shared directory, where the
    group's waiters must open it; there it appears with that mode (made under a
    temporary name, named after our pid so that ``Bells._sweep`` removes it if we die
    first, then renamed into place)."""
    if sys.platform == "win32":  # (never called there)
        raise OSError(errno.ENOSYS, "no FIFOs on Windows", path)
    if not is_shared_dir(directory):
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            # Left by a dead process that had the same byte (its lock is ours now).
            os.unlink(path)
            os.mkfifo(path, 0o600)
        return
    temporary = os.path.join(directory, f"{os.getpid()}.{os.urandom(4).hex()}.live-tmp")
    os.mkfifo(temporary, 0o600)
    try:
        os.chmod(temporary, 0o660)
        os.replace(temporary, path)  # (replacing a dead process's FIFO of our byte)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


_hooked = False


def _hook() -> None:
    """Register the exit and fork hooks, once: only a process that made a FIFO needs
    them (importing this module costs nothing)."""
    global _hooked
    if not _hooked:
        _hooked = True
        atexit.register(_remove_own)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)


def _remove_own() -> None:
    # At a clean exit: nobody needs our FIFOs any more. (A killed process leaves them to
    # the next sweep.)
    if _own_pid == os.getpid():
        for path in list(_own):
            try:
                os.unlink(path)
            except OSError:
                pass


def _after_fork_in_child() -> None:
    # A fork child would keep our write ends open, and with them the parent's death a
    # secret from its waiters until the child exits. Our witness byte does not pass to
    # the child (POSIX record locks belong to a process) and neither does this: the
    # child closes its copies at once (a fork that execs closes them by O_CLOEXEC).
    global _own_mutex
    _own_mutex = threading.Lock()
    for fd in _own.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _own.clear()




def sweep(directory: str, witness: Witness) -> None:
    """Remove the liveness FIFOs of processes that died: those whose byte is free."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    mine = witness.mine()
    if mine is None:
        return
    file_id = mine.rpartition(":")[0]
    for name in names:
        if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
            continue
        try:
            if not witness.is_alive(f"{file_id}:{name[len(PREFIX):]}"):
                os.unlink(os.path.join(directory, name))
        except OSError:
            pass


# -- a waiter's watches ------------------------------------------------------------------

#: How many watched peers a waiter keeps open between its waits (the next look is
#: likely to name the same holder and the same waiter ahead).
_KEEP = 8


#: What a waiter's watches tell it (``Watches.choose``).
WATCHED = "watched"  # every death that concerns it will be pushed: sleep to the net
UNWATCHED = "unwatched"  # not every one: look again every ``bells.DEATH_NET``
SETTLING = "settling"  # one was pushed but still looks alive: its exit is under way
DEAD = "dead"  # one is dead already: look again at once
#: How long a peer whose death was pushed may still look alive. A dying process drops
#: its witness byte and its FIFO (or, on Windows, becomes signalled) one after the
#: other, in an order no kernel promises, so the news may come a moment early; the
#: waiter then looks again every ``bells.SETTLE`` for this long. A peer that still
#: lives after it (a push no kernel should give) is left to the net.
SETTLE_TIME = 1.0
_WORST = {WATCHED: 0, UNWATCHED: 1, SETTLING: 2, DEAD: 3}


class Watches:
    """A waiting thread's open watches on the peers of one store: a FIFO's read end
    (POSIX) or a process handle (Windows) per peer, kept between waits.

    A watch that fired (its peer died, or seemed to) is closed and its peer never
    watched again by this thread: a watch that fired while its peer still lives would
    otherwise wake the waiter in a loop."""

    def __init__(self, directory: str, witness: Witness) -> None:
        self.directory = directory
        self.witness = witness
        self._open: Dict[Tuple[Optional[str], Optional[int]], int] = {}
        #: Peers whose watch fired: when (monotonic).
        self._spent: Dict[Tuple[Optional[str], Optional[int]], float] = {}
        #: What the last ``choose`` picked: descriptor or handle -> peer.
        self.chosen: Dict[int, Tuple[Optional[str], Optional[int]]] = {}
        #: Windows: what closes a process handle, taken when the first is opened (an
        #: import in ``_close`` could run at interpreter exit, where imports fail).
        self._close_handle: Callable[[int], None] = lambda handle: None

    def choose(self, watch: Watch) -> str:
        """Open (or keep) the watches ``watch`` asks for; then ``self.chosen`` holds
        them. Says how far the waiter may trust them: ``WATCHED``, ``UNWATCHED``,
        ``SETTLING`` or ``DEAD``."""
        self.chosen = {}
        if watch is None:
            return UNWATCHED
        holder, ahead = watch
        state = WATCHED
        if holder is not None:
            state = self._watch(holder)
            if state == DEAD:
                return DEAD
        if ahead:
            for peer in ahead:  # the nearest live one
                got = self._watch(peer)
                if got != DEAD:
                    state = max(state, got, key=_WORST.__getitem__)
                    break
                # (dead: whoever is behind it watches the next one)
            else:
                state = max(state, UNWATCHED, key=_WORST.__getitem__)  # the next look drops them
        return state

    def _watch(self, peer: Peer) -> str:
        """Watch ``peer``, if it can be watched."""
        fired = self._spent.get(peer)
        if fired is not None:
            if not self.witness.is_alive(peer[0]):
                return DEAD
            return SETTLING if time.monotonic() - fired < SETTLE_TIME else UNWATCHED
        if peer[0] is not None and peer[0] == self.witness.mine():
            return WATCHED  # ourselves (another thread holds): our death needs no news
        handle = self._open.pop(peer, None)
        if handle is not None:
            self._open[peer] = handle  # the most recently used: evicted last
        else:
            got = self._opened(peer)
            if got is None or got < 0:
                return DEAD if got is None else UNWATCHED
            while len(self._open) >= _KEEP:
                self._close(next(iter(self._open)))
            self._open[peer] = handle = got
        self.chosen[handle] = peer
        return WATCHED

    def _opened(self, peer: Peer) -> Optional[int]:
        """A new watch on ``peer``: its descriptor or handle, -1 if none can be had,
        None if the peer is dead already."""
        mark, pid = peer
        if sys.platform == "win32":
            if not isinstance(pid, int) or pid <= 0:  # (a damaged record)
                return -1
            from .wakeup_windows import close_event, open_process

            self._close_handle = close_event
            if not self._here(mark):
                return -1
            # (A process that has ended already is signalled at once: no look needed.)
            return open_process(pid)
        offset = _offset_of(mark)
        if offset is None or not self._here(mark):
            return -1
        path = os.path.join(self.directory, PREFIX + offset)
        try:
            fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)
        except OSError:
            return -1  # none made (an older version, a failure), or swept: the net
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
                return -1
            # A reader that finds no writer is not told of a hang-up on Linux (no writer
            # came and went since it opened) and at once elsewhere: either way the
            # byte, tested after the open, says whether the writer was there.
            if not self.witness.is_alive(mark):
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            return -1
        return fd

    def _here(self, mark: Optional[str]) -> bool:
        """Whether ``mark`` is a byte of our witness file (a mark of another file, one
        reached through a copy of the store, names nobody we can watch)."""
        mine = self.witness.mine()
        if not mark or mine is None:
            return False
        return mark.rpartition(":")[0] == mine.rpartition(":")[0]

    def fired(self, handles: Sequence[int]) -> None:
        """The watches ``handles`` fired: close them, and never watch their peers again."""
        if len(self._spent) > 256:  # (bounded: a forgotten peer is only watched again)
            self._spent.clear()
        for handle in handles:
            peer = self.chosen.pop(handle, None)
            if peer is not None:
                self._spent[peer] = time.monotonic()
                self._close(peer)

    def _close(self, peer: Tuple[Optional[str], Optional[int]]) -> None:
        handle = self._open.pop(peer, None)
        if handle is None:
            return
        if sys.platform == "win32":
            self._close_handle(handle)
        else:
            try:
                os.close(handle)
            except OSError:
                pass

    def close(self) -> None:
        for peer in list(self._open):
            self._close(peer)
        self.chosen = {}

