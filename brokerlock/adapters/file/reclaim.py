"""Removing the records a lock-file store kept free (see ``embedded.deferred``), and
the plain file I/O that removal shares with the adapter: a record's file name, its
link count and size, reading it whole, unlinking it."""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Tuple

from ...errors import BrokerLockError
from ..embedded.files import O_BINARY, O_CLOEXEC, O_NOFOLLOW, open_private
from ..embedded.locking import lock_within, read_at
from .record import HighWater, Record, decode

SUFFIX = ".lock"
READ_SIZE = 65536


def file_name(name: str) -> str:
    """The file that holds ``name``'s record: a hash, so any name is harmless."""
    import hashlib  # here, not at the top: it costs a CLI on the SQLite store ~2 ms

    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:40] + SUFFIX


if sys.platform == "win32":

    def links_and_size(fd: int) -> Tuple[int, int]:
        # Windows refuses to delete or replace a file that a handle holds open without
        # FILE_SHARE_DELETE, which os.open never asks for: the record under our handle is
        # the one at the path. And fstat() costs milliseconds there (13 ms under Wine),
        # where seeking to the end gives the size in microseconds.
        return 1, os.lseek(fd, 0, os.SEEK_END)

else:

    def links_and_size(fd: int) -> Tuple[int, int]:
        info = os.fstat(fd)
        return info.st_nlink, info.st_size


def remove(path: str) -> bool:
    """Unlink a record; if that fails, it stays (free), as records did before."""
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def read_raw(fd: int, size: int = READ_SIZE) -> bytes:
    """The whole of a record file; ``size``, the length it is expected to have, sizes
    the read (a read buffer is allocated whole first)."""
    want = size + 64
    raw = read_at(fd, want, 0)
    while len(raw) == want:  # longer than expected
        more = read_at(fd, READ_SIZE, len(raw))
        if not more:
            break
        raw += more
        want = len(raw)
    return raw


def read_record(
    fd: int, path: str, name: Optional[str], size: int = READ_SIZE
) -> Tuple[Optional[Record], int]:
    """The record in ``fd`` and the file's length (see ``read_raw``)."""
    raw = read_raw(fd, size)
    return decode(raw, path, name), len(raw)


class _Opened:
    """The fence file opened once for one batch of removals, then closed (a
    ``KeptFiles`` for ``HighWater``): a removal may run inside the garbage collector,
    in a thread whose kept descriptor of that file is in use up the stack."""

    def __init__(self) -> None:
        self.fd = -1

    def get(self, path: str) -> int:
        if self.fd < 0:
            self.fd = open_private(path, os.O_RDWR)
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: How long a removal waits for a record's flock, which others hold for microseconds.
#: Bounded, not ``lock_briefly``'s patience: a removal may run inside the garbage
#: collector in a thread that holds that very flock (it then gives up, the record
#: stays), and one busy record must not stall a release or the interpreter's exit.
RECLAIM_PATIENCE = 0.05


def reclaim_records(
    directory: str, fence_path: str, names: List[str], high_water: Optional[HighWater] = None
) -> None:
    """Remove the records of ``names`` that are free with nobody waiting, as a release
    did before it kept them (see embedded.deferred): under the record's flock, its
    fence raised into the floor first, then unlinked. Whoever opened the file before
    the unlink finds it unlinked once it has the flock, and opens the path anew;
    whoever holds or waits for the name meanwhile keeps the record.

    Record descriptors are opened here and closed after, never this thread's kept
    ones: one of those may be in use up the stack (see ``_Opened``); a kept one of a
    removed record is found unlinked by its next use (``_update``). So is the floor's,
    unless the caller passes the adapter's ``high_water`` (only where no flock of the
    thread can be held: a release's eviction, not the garbage collector)."""
    floor = _Opened()
    if high_water is None:
        high_water = HighWater(fence_path, floor)
    try:
        for name in names:
            path = os.path.join(directory, file_name(name))
            try:
                fd = os.open(path, os.O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_BINARY)
            except OSError:
                continue  # removed already (by another process that freed it)
            try:
                if not lock_within(fd, RECLAIM_PATIENCE):
                    continue  # in use: its user keeps it, or frees it into its own set
                links, size = links_and_size(fd)
                if not links:
                    continue
                record, _size = read_record(fd, path, name, size)
                if record is None or record.get("damaged") or record.get("token") or record.get("queue"):
                    continue  # taken, waited for, or not ours to judge: it stays
                if high_water.raise_to(record["fence"], RECLAIM_PATIENCE):
                    remove(path)  # (only once the floor covers its fence)
            except (OSError, BrokerLockError):
                continue  # (it stays, free: as after a crash)
            finally:
                os.close(fd)  # (the flock goes with it)
    finally:
        floor.close()
