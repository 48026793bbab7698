"""The lock-file store's record format and its kept descriptors.

The record is written by hand (``_file_record``) for speed; it must stay the JSON
that every version of the store reads. Each thread keeps its records open
(``KeptFiles``); a record removed or replaced under it, or a fork, must never let a
stale descriptor decide who holds a lock.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, List

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stores import forks_with_threads, needs_flock, needs_fork

from brokerlock import BrokerLock, FileAdapter, LockLost
from brokerlock.adapters.base import Request
from brokerlock.adapters.embedded.files import KeptFiles
from brokerlock.adapters.embedded.store import grant_news
from brokerlock.adapters.file.adapter import _RECORDS
from brokerlock.adapters.file.record import encode, leased, stamp, stamp_text

if sys.platform != "win32":  # only the fork tests use it, and they are POSIX only
    import fcntl

#: Windows refuses to delete a file (or its directory) that a handle holds open, unless
#: the handle allowed it (FILE_SHARE_DELETE, which os.open never asks for).
no_unlink_while_open = pytest.mark.skipif(
    sys.platform == "win32",
    reason="Windows refuses to delete a file that is held open: the case cannot arise there",
)

texts = st.text(max_size=20)
stamps = st.floats(min_value=0, max_value=4e9, allow_nan=False).map(stamp)
ttls = st.none() | st.floats(min_value=1e-3, max_value=1e6, allow_nan=False)
entries = st.tuples(
    texts, st.none() | texts, stamps, st.none() | texts, ttls, texts, st.integers(0, 2**31), texts
).map(list)


@given(
    name=texts, token=st.none() | texts, fence=st.integers(0, 2**63),
    acquired=stamps, expires=st.none() | stamps, host=texts, pid=st.integers(0, 2**31),
    thread=texts, witness=st.none() | texts, queue=st.lists(entries, max_size=3),
)
def test_a_record_reads_back_as_the_json_module_reads_it(
    name: str, token: Any, fence: int, acquired: float, expires: Any, host: str, pid: int,
    thread: str, witness: Any, queue: List[Any],
) -> None:
    record = {
        "name": name, "token": token, "fence": fence, "acquired_at": acquired,
        "expires_at": expires, "host": host, "pid": pid, "thread": thread,
        "witness": witness, "queue": queue,
    }
    assert json.loads(encode(record)) == record


@pytest.mark.parametrize(
    "record",
    [
        {"name": "x", "fence": 3, "token": None, "damaged": True},  # not the usual keys
        {"name": "x", "token": "t", "fence": 1, "acquired_at": 1.5, "expires_at": float("inf"),
         "host": "h", "pid": True, "thread": ["odd"], "witness": 7, "queue": [["short"], "junk"]},
    ],
)
def test_an_unusual_record_is_written_by_the_json_module(record: Any) -> None:
    assert json.loads(encode(record)) == record


def test_a_grant_carries_the_stamps_of_the_record_exactly() -> None:
    new = leased(None, "x", 1795815820.4796512, "tok", None, 60.0, "h", 1, "t", [])
    text = grant_news("tok", new["fence"], new["acquired_at"], new["expires_at"], stamp_text).decode()
    _token, _fence, acquired, expires = text[1:-1].split(",")
    assert float(acquired) == new["acquired_at"] == json.loads(encode(new))["acquired_at"]
    assert float(expires) == new["expires_at"] == json.loads(encode(new))["expires_at"]


@needs_flock
@no_unlink_while_open
def test_a_record_replaced_under_a_kept_descriptor_is_not_trusted(tmp_path: Path) -> None:
    """Someone deletes the lock file while this thread keeps it open: the file now at
    the path decides, as it would for a process that opens it anew."""
    adapter = FileAdapter(tmp_path)
    first = BrokerLock(adapter).item("job", ttl="60s")
    first.acquire()
    os.unlink(adapter._path("job"))
    taken = threading.Event()

    def other() -> None:
        BrokerLock(adapter).item("job", ttl="60s").acquire()
        taken.set()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)
    assert taken.is_set()
    with pytest.raises(LockLost):
        first.release()  # its record went with the old file
    holder = adapter.get("job")
    assert holder is not None and holder.thread == thread.name


@needs_fork
@forks_with_threads
def test_a_forked_child_never_uses_its_parents_kept_descriptor(tmp_path: Path) -> None:
    """A descriptor inherited through fork shares its flock with the parent: the child
    must open its own, which the parent's flock then keeps out."""
    kept = KeptFiles(4, lambda path: os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    path = str(tmp_path / "record")
    fd = kept.get(path)
    fcntl.flock(fd, fcntl.LOCK_EX)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        status = 3
        try:
            child_fd = kept.get(path)
            try:
                fcntl.flock(child_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                status = 1  # got in beside the parent
            except BlockingIOError:
                status = 0
        finally:
            os._exit(status)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert kept.get(path) == fd  # the parent's own stays kept


def test_a_thread_keeps_only_its_last_few_records(tmp_path: Path) -> None:
    opened: List[int] = []

    def opener(path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        opened.append(fd)
        return fd

    kept = KeptFiles(2, opener)
    paths = [str(tmp_path / f"r{i}") for i in range(3)]
    for path in paths:
        kept.get(path)
    with pytest.raises(OSError):
        os.fstat(opened[0])  # the oldest was closed to make room
    assert kept.get(paths[2]) == opened[2] and len(opened) == 3


def test_threads_do_not_share_kept_records(tmp_path: Path) -> None:
    """A flock belongs to the open file description: one shared by two threads would
    let both into a record at once."""
    path = str(tmp_path / "x.lock")
    mine = _RECORDS.get(path)
    theirs: List[int] = []
    thread = threading.Thread(target=lambda: theirs.append(_RECORDS.get(path)))
    thread.start()
    thread.join()
    assert theirs and theirs[0] != mine


def test_many_threads_keep_few_descriptors(tmp_path: Path) -> None:
    """Beyond one each, threads together keep at most the budget: a server with
    hundreds of threads must not run out of descriptors for our convenience."""
    kept = KeptFiles(8, lambda path: os.open(path, os.O_RDWR | os.O_CREAT, 0o600), budget=4)
    done = threading.Barrier(11)
    counts: List[int] = []

    def work(me: int) -> None:
        for i in range(3):
            kept.get(str(tmp_path / f"t{me}-{i}"))
        done.wait()  # all threads alive, holding what they kept
        counts.append(len(kept._tally))
        done.wait()

    threads = [threading.Thread(target=work, args=(me,)) for me in range(10)]
    for thread in threads:
        thread.start()
    done.wait()
    done.wait()
    for thread in threads:
        thread.join()
    assert counts and max(counts) <= 10 + 4  # one each, and the budget's few more
    assert len(kept._tally) == 0  # the threads' descriptors went with them


def test_entries_equal_in_python_but_not_in_json_are_written_apart() -> None:
    """Written entries are remembered by content: 1, 1.0 and True are equal keys to
    Python, and must still come back as what they were."""
    base = leased(None, "x", 1795815820.25, "tok", None, 60.0, "h", 1, "t", [])
    for ttl in (60, 60.0, True):
        record = {**base, "queue": [["w", None, 1795815826.5, "b", ttl, "h", 2, "t"]]}
        back = json.loads(encode(record))["queue"][0][4]
        assert back == ttl and type(back) is type(ttl)


@needs_fork
@forks_with_threads
def test_a_failed_update_leaves_no_flock_to_a_child_forked_meanwhile(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A child forked while a thread updates a record inherits its descriptor, flock
    included. Closing ours is not enough to free the record then: an update that fails
    must unlock it, or the record stays locked until that child exits."""
    import signal

    from brokerlock.adapters.file import adapter as file_module

    adapter = FileAdapter(tmp_path)
    children: List[int] = []

    def fork_then_fail(record: Any) -> bytes:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child only keeps its inherited copies
            signal.pause()
            os._exit(0)
        children.append(pid)
        raise RuntimeError("the update fails")

    monkeypatch.setattr(file_module, "encode", fork_then_fail)
    try:
        with pytest.raises(RuntimeError):
            adapter.try_acquire(Request.make("job", "t" * 32, 60.0))
        assert children
        fd = os.open(adapter._path("job"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if still held
        finally:
            os.close(fd)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@needs_flock
@no_unlink_while_open
def test_a_record_that_cannot_be_reopened_never_unlocks_the_closed_number(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The lock directory is removed under a holder: its kept record has no name left,
    is closed, and opening it anew fails. The closed descriptor's number may already be
    another thread's record, locked: the failure must not unlock it."""
    import shutil

    from brokerlock import BrokerLockError
    from brokerlock.adapters.file import adapter as file_module

    adapter = FileAdapter(tmp_path / "locks")
    item = BrokerLock(adapter).item("job", ttl="60s")
    item.acquire()
    kept = _RECORDS.get(adapter._path("job"))
    unlocked: List[int] = []
    real_unlock = file_module.unlock_file

    def unlock(fd: int) -> None:
        unlocked.append(fd)
        real_unlock(fd)

    monkeypatch.setattr(file_module, "unlock_file", unlock)
    shutil.rmtree(tmp_path / "locks")
    with pytest.raises(BrokerLockError):
        item.release()
    assert kept not in unlocked
