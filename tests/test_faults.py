"""Store faults while locks are held: deleted, replaced, corrupted, read-only, full, gone.

What every test demands: a clear ``BrokerLockError`` or ``LockLost`` (never a driver's
exception, never a hang past the timeout), never two holders that both keep being told
their lease is intact, and a store that works again once the fault is repaired.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest
from actor import Actor
from stores import needs_witness

from brokerlock import BrokerLock, BrokerLockError, LockLost, LockTimeout, SQLiteAdapter
from brokerlock.adapters.file.adapter import file_name

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX file modes, signals, mounts and fcntl stores"
)

#: No call may take longer than this (seconds) after a fault, whatever its timeout.
PROMPT = 5.0


def bounded(fn: Callable[[], Any], limit: float = PROMPT) -> Tuple[str, Any]:
    """Run ``fn``: ``("ok", value)`` or ``("lost"|"error", exc)``; fail on any other
    exception and on a call that takes longer than ``limit``."""
    started = time.monotonic()
    try:
        result: Tuple[str, Any] = ("ok", fn())
    except LockLost as exc:
        result = ("lost", exc)
    except BrokerLockError as exc:
        result = ("error", exc)
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"took {elapsed:.1f}s after the fault"
    return result


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 1 MiB tmpfs of our own, to fill up (root only; skipped elsewhere)."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC test covers the rest")
    mountpoint = Path(tempfile.mkdtemp(prefix="brokerlock-full-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        os.rmdir(mountpoint)
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        os.rmdir(mountpoint)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; the filler to delete."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by ``nobody``, for stores that user keeps (root ignores modes)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root, to act as the user nobody")
    import pwd

    try:
        info = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    path = Path(tempfile.mkdtemp(prefix="brokerlock-nobody-"))
    os.chown(path, info.pw_uid, info.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _hold(url: str, name: str = "job", ttl: str = "30s") -> Any:
    item = BrokerLock.from_url(url).item(name, ttl=ttl, timeout="1s")
    item.acquire()
    return item


def _not_two_holders(first: Any, second_got: bool) -> None:
    """If a second client got the lock, the first must not be told its lease is intact."""
    outcome, _ = bounded(first.extend)
    if second_got:
        assert outcome in ("lost", "error"), "two holders: the first one extended after the second acquired"


# -- SQLite ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
def test_sqlite_database_deleted_or_replaced_while_held(fault: str, tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    url = f"sqlite:///{path}"
    first = _hold(url)
    first_fence = first.fence
    if fault == "deleted":
        for leftover in tmp_path.glob("locks.sqlite3*"):
            # (the bells directory too: on the FIFO path a holder's liveness FIFO is in it)
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
    else:
        SQLiteAdapter(tmp_path / "other.sqlite3").close()
        # A database is replaced together with its WAL: SQLite would replay the old WAL
        # into the new file (the old lease would come back), whatever we do.
        for leftover in (tmp_path / "locks.sqlite3-wal", tmp_path / "locks.sqlite3-shm"):
            leftover.unlink()
        os.replace(tmp_path / "other.sqlite3", path)
    second = BrokerLock.from_url(url).item("job", ttl="30s", timeout="1s")
    outcome, _ = bounded(second.try_acquire)
    got = outcome == "ok" and second.acquired
    # The old holder must learn it lost the lock, not extend a lease in a ghost file.
    first_outcome, _ = bounded(first.extend)
    assert not (got and first_outcome == "ok"), "two holders after the database was " + fault
    if got:  # fences keep growing in a store made anew (floored by the clock in µs)
        assert second.fence is not None and first_fence is not None and second.fence > first_fence
    # Repaired (the store is simply the new file): everything works.
    if got:
        second.release()
    again = BrokerLock.from_url(url).item("job", ttl="30s", timeout="1s")
    assert bounded(again.acquire)[0] == "ok"


def test_sqlite_database_corrupted_while_held(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite3"
    url = f"sqlite:///{path}"
    first = _hold(url)
    saved = {p: p.read_bytes() for p in (path, tmp_path / "locks.sqlite3-wal")}
    for p in saved:  # garbage over the database and its WAL, sizes kept
        p.write_bytes(os.urandom(len(saved[p])) if saved[p] else b"")
    outcome, exc = bounded(lambda: BrokerLock.from_url(url).item("job", timeout="1s").try_acquire())
    assert outcome == "error", "a corrupted database must be reported, not used"
    assert str(path) in str(exc)
    # The holder's own connection may go on from its cache or fail; never a raw error.
    bounded(first.extend)
    # Repaired as an operator would: connections closed, the original bytes back.
    del exc  # its traceback keeps the failed client's connection open
    first._lock.close()
    gc.collect()
    for p, data in saved.items():
        p.write_bytes(data)
    for shm in tmp_path.glob("*-shm"):
        shm.unlink()
    other = BrokerLock.from_url(url)
    assert bounded(other.item("job", timeout=0).try_acquire) == ("ok", None), "the holder holds it"
    assert bounded(lambda: other.item("else", timeout="1s").acquire().fence)[0] == "ok"


def test_sqlite_database_made_read_only(nobody_dir: Path) -> None:
    """As nobody (root ignores file modes): the database turns 0400 while a lock is held."""
    url = f"sqlite:///{nobody_dir}/db/locks.sqlite3"
    with Actor(url, user="nobody") as holder, Actor(url, user="nobody") as other:
        assert holder.do("acquire job 30s 1s")[0] == "ok"
        db = nobody_dir / "db" / "locks.sqlite3"
        db.chmod(0o400)
        started = time.monotonic()
        status, message = other.do("acquire new 30s 1s")
        assert status == "err" and message.startswith("BrokerLockError"), message
        assert "readonly" in message or "read-only" in message or "ermission denied" in message, message
        status, message = other.do("try job 30s")
        assert (status, message) == ("ok", "None") or message.startswith("BrokerLockError"), message
        assert time.monotonic() - started < 2 * PROMPT
        db.chmod(0o600)  # repaired
        assert other.do("try job 30s") == ("ok", "None"), "the holder still holds it"
        assert holder.do("extend job") == ("ok", "None")
        assert holder.do("release job") == ("ok", "None")
        assert other.do("acquire job 30s 1s")[0] == "ok"


def test_sqlite_disk_full(tiny_fs: Path) -> None:
    url = f"sqlite:///{tiny_fs}/store/locks.sqlite3"
    first = _hold(url)
    other = BrokerLock.from_url(url)
    filler = fill(tiny_fs)
    errors: List[BaseException] = []
    for n in range(2000):  # new rows grow the WAL until a write finds no room
        item = other.item(f"name-{n}-" + "x" * 500, timeout=0)
        outcome, value = bounded(item.try_acquire)
        if outcome == "error":
            errors.append(value)
            break
    assert errors, "the full disk was never noticed"
    assert "full" in str(errors[0]) or "space" in str(errors[0]), errors[0]
    outcome, value = bounded(other.item("job", timeout=0).try_acquire)
    assert outcome == "error" or value is None, "two holders on a full disk"
    filler.unlink()  # repaired
    assert bounded(first.extend)[0] == "ok"
    assert bounded(other.item("job", timeout=0).try_acquire) == ("ok", None)
    first.release()
    assert bounded(lambda: other.item("job", timeout="1s").acquire().fence)[0] == "ok"


# -- lock files -----------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["directory", "record"])
def test_file_store_removed_while_held(fault: str, tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    url = f"file://{directory}"
    first = _hold(url)
    if fault == "directory":
        shutil.rmtree(directory)
        # Not recreated yet: the holder hears about it, promptly and clearly.
        outcome, exc = bounded(first.extend)
        assert outcome == "error" and str(directory) in str(exc), exc
    else:
        (directory / file_name("job")).unlink()
    # A newcomer recreates the store and may take the lock: the old holder must then
    # hear LockLost (or an error), never an intact lease.
    second = BrokerLock.from_url(url).item("job", ttl="30s", timeout="1s")
    got = bounded(second.try_acquire)[0] == "ok" and second.acquired
    assert got
    assert second.fence is not None and first.fence is not None and second.fence > first.fence
    _not_two_holders(first, got)
    assert bounded(first.release)[0] in ("ok", "lost")
    second.release()
    assert bounded(lambda: BrokerLock.from_url(url).item("job", timeout="1s").acquire().fence)[0] == "ok"


def test_file_directory_removed_under_a_waiter(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    url = f"file://{directory}"
    _hold(url, ttl="60s")
    waiter = BrokerLock.from_url(url).item("job", timeout="20s")
    result: List[Tuple[str, Any]] = []
    thread = threading.Thread(target=lambda: result.append(bounded(waiter.acquire, 25)))
    thread.start()
    time.sleep(0.3)
    for _ in range(50):  # the waiter may be creating a file in it at that very moment
        shutil.rmtree(directory, ignore_errors=True)
        if not directory.exists():
            break
    assert not directory.exists()
    thread.join(PROMPT)
    assert not thread.is_alive(), "a parked waiter hung after its store was removed"
    assert result and result[0][0] in ("error", "ok"), result


def test_file_record_corrupted_while_held(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    url = f"file://{directory}"
    first = _hold(url)
    (directory / file_name("job")).write_bytes(b"\0{garbage")
    second = BrokerLock.from_url(url).item("job", ttl="30s", timeout="1s")
    assert bounded(second.try_acquire)[0] == "ok" and second.acquired
    # A damaged record is void; the fence that replaces it is above any it could have held.
    assert second.fence is not None and first.fence is not None and second.fence > first.fence
    _not_two_holders(first, True)
    second.release()
    assert bounded(lambda: BrokerLock.from_url(url).item("job", timeout="1s").acquire().fence)[0] == "ok"


@pytest.mark.parametrize("mode", [0o000, 0o500])
def test_file_directory_permissions_changed(mode: int, nobody_dir: Path) -> None:
    """As nobody: the lock directory loses its write (0500) or every (0000) permission."""
    directory = nobody_dir / "locks"
    url = f"file://{directory}"
    with Actor(url, user="nobody") as holder, Actor(url, user="nobody") as other:
        assert holder.do("acquire job 30s 1s")[0] == "ok"
        assert other.do("open")[0] == "ok"
        directory.chmod(mode)
        started = time.monotonic()
        status, message = other.do("acquire new 30s 1s")
        assert status == "err" and message.startswith("BrokerLockError"), message
        assert "ermission" in message, message
        status, message = other.do("try job 30s")
        assert (status, message) == ("ok", "None") or message.startswith("BrokerLockError"), message
        status, message = holder.do("extend job")
        assert status == "ok" or message.startswith("BrokerLockError"), message
        assert time.monotonic() - started < 3 * PROMPT
        directory.chmod(0o700)  # repaired
        assert other.do("try job 30s") == ("ok", "None"), "the holder still holds it"
        assert holder.do("release job") == ("ok", "None")
        assert other.do("acquire job 30s 1s")[0] == "ok"


def test_file_disk_full(tiny_fs: Path) -> None:
    url = f"file://{tiny_fs}/locks"
    first = _hold(url)
    other = BrokerLock.from_url(url)
    filler = fill(tiny_fs)
    outcome, exc = bounded(lambda: other.item("a new name", timeout=0).try_acquire())
    assert outcome == "error" and "No space left" in str(exc), (outcome, exc)
    outcome, value = bounded(other.item("job", timeout=0).try_acquire)
    assert outcome == "error" or value is None, "two holders on a full disk"
    filler.unlink()  # repaired
    assert bounded(lambda: other.item("a new name", timeout="1s").acquire().fence)[0] == "ok"
    assert bounded(first.extend)[0] == "ok"
    first.release()


def test_file_write_fails_with_enospc_injected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no tmpfs can be mounted: the adapter's write itself fails with ENOSPC."""
    url = f"file://{tmp_path}/locks"
    first = _hold(url)
    other = BrokerLock.from_url(url)
    real_pwrite = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    outcome, exc = bounded(lambda: other.item("another", timeout="1s").acquire())
    assert outcome == "error" and "No space left" in str(exc), (outcome, exc)
    assert bounded(other.item("job", timeout=0).try_acquire) == ("ok", None)
    outcome, _ = bounded(first.release)
    assert outcome == "error"  # could not write the release: the lease stays until its ttl
    monkeypatch.setattr(os, "pwrite", real_pwrite)  # repaired
    assert bounded(lambda: other.item("another", timeout="1s").acquire().fence)[0] == "ok"


# -- servers --------------------------------------------------------------------------


@pytest.fixture(params=["redis", "postgres"])
def server_url(request: pytest.FixtureRequest) -> Iterator[Tuple[Any, str]]:
    import uuid

    fresh = uuid.uuid4().hex[:12]
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?prefix=faults-{fresh}%3A"
    else:
        server = request.getfixturevalue("postgres_server")
        url = f"{server.dsn}?table=faults_{fresh}"
    try:
        yield server, url
    finally:
        if server.proc is None or server.proc.poll() is not None:
            server.start()  # never leave the session's server down for the next test


def _sigkill(server: Any) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.proc = None


def test_server_killed_mid_hold_and_mid_wait(server_url: Tuple[Any, str]) -> None:
    server, url = server_url
    holder = BrokerLock.from_url(url).item("job", ttl="30s", timeout="2s")
    holder.acquire()
    fence = holder.fence
    waiter = BrokerLock.from_url(url).item("job", ttl="30s", timeout="20s")
    result: List[Tuple[str, Any]] = []
    thread = threading.Thread(target=lambda: result.append(bounded(waiter.acquire, 25)))
    thread.start()
    time.sleep(0.3)
    _sigkill(server)
    outcome, exc = bounded(holder.extend, 15)
    # "lost" when the presence watch heard the server close the holder's connection
    # first (which frees its lease): named either way.
    assert outcome in ("error", "lost") and f":{server.port}" in str(exc), (outcome, exc)
    thread.join(20)
    assert not thread.is_alive(), "a parked waiter hung on a killed server"
    assert result[0][0] == "error", result
    server.start()
    newcomer = BrokerLock.from_url(url).item("job", ttl="30s", timeout="5s")
    assert bounded(newcomer.acquire, 10)[0] == "ok"
    assert newcomer.fence is not None and fence is not None and newcomer.fence > fence
    assert bounded(holder.extend)[0] in ("lost", "error"), "two holders after the restart"
    newcomer.release()


def test_server_killed_and_back_within_a_wait(server_url: Tuple[Any, str]) -> None:
    server, url = server_url
    holder = BrokerLock.from_url(url).item("job", ttl="30s", timeout="2s")
    holder.acquire()
    waiter = BrokerLock.from_url(url).item("job", ttl="30s", timeout="15s")
    result: List[Tuple[str, Any]] = []
    thread = threading.Thread(target=lambda: result.append(bounded(waiter.acquire, 25)))
    thread.start()
    time.sleep(0.3)
    _sigkill(server)
    server.start()
    thread.join(25)
    assert not thread.is_alive()
    outcome = result[0][0]
    assert outcome in ("ok", "error"), result
    holder_outcome = bounded(holder.extend)[0]
    if outcome == "ok":
        assert holder_outcome in ("lost", "error"), "two holders after the restart"
        waiter.release()
    # Whatever happened, the store works again.
    again = BrokerLock.from_url(url).item("job", ttl="30s", timeout="35s")
    assert bounded(again.acquire, 40)[0] == "ok"
    again.release()


# -- wall-clock jumps ------------------------------------------------------------------


class JumpyClock:
    """The host's wall clock plus an offset that a test moves, as an NTP step or an
    operator's ``date -s`` would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(params=["memory", "sqlite", "file"])
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> Tuple[JumpyClock, Callable[[], BrokerLock]]:
    """A clock and a factory of clients of one store that all read it (one host)."""
    from brokerlock import FileAdapter, MemoryAdapter

    clock = JumpyClock()
    if request.param == "memory":
        shared = MemoryAdapter(clock=clock)
        return clock, lambda: BrokerLock(shared)
    if request.param == "sqlite":
        return clock, lambda: BrokerLock(SQLiteAdapter(tmp_path / "locks.sqlite3", clock=clock))
    return clock, lambda: BrokerLock(FileAdapter(tmp_path / "locks", clock=clock))


def test_clock_jump_forward_moves_expiry_by_the_jump(clocked: Tuple[JumpyClock, Any]) -> None:
    """README "Clocks": a jump moves every lease's expiry by its size, no more."""
    clock, client = clocked
    holder = client().item("job", ttl="10s", timeout=0)
    holder.acquire()
    other = client().item("job", ttl="10s", timeout=0)
    clock.offset = 8.0  # 8 s of a 10 s lease gone at once: still held
    assert other.try_acquire() is None
    holder.extend()  # a live holder renews from the new now
    clock.offset = 16.0
    assert other.try_acquire() is None, "the extension counts from the jumped clock"
    clock.offset = 19.0  # past the renewed lease: free, and the holder is told
    assert other.try_acquire() is other
    with pytest.raises(LockLost):
        holder.release()
    other.release()


def test_clock_jump_backward_extends_by_the_jump_only(clocked: Tuple[JumpyClock, Any]) -> None:
    clock, client = clocked
    holder = client().item("job", ttl="10s", timeout=0)
    holder.acquire()
    other = client().item("job", ttl="10s", timeout=0)
    clock.offset = -3600.0  # an hour back: the lease now has 3610 s to run
    assert other.try_acquire() is None
    clock.offset = -3600.0 + 3609.0  # an hour and 9 s later: still held
    assert other.try_acquire() is None
    clock.offset = -3600.0 + 3611.0  # the jump's size and the ttl, not a second more
    assert other.try_acquire() is other
    with pytest.raises(LockLost):
        holder.extend()
    other.release()


def test_waiter_timeout_ignores_the_wall_clock(clocked: Tuple[JumpyClock, Any]) -> None:
    """Waits are measured on the monotonic clock: a jump back neither times a waiter
    out early nor makes it wait past its timeout."""
    clock, client = clocked
    holder = client().item("job", ttl="1s", timeout=0)
    holder.acquire()
    clock.offset = -3600.0
    waiter = client().item("job", ttl="10s", timeout="1.5s")
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        waiter.acquire()
    assert 1.4 < time.monotonic() - started < PROMPT


@pytest.mark.parametrize(
    "clocked",
    [
        "memory",
        "sqlite",
        "file",
    ],
    indirect=True,
)
def test_parked_waiter_follows_a_clock_correction(clocked: Tuple[JumpyClock, Any]) -> None:
    """The clock jumps an hour back, a waiter parks, the clock is corrected: the 1 s
    lease is then over by any reading, and the waiter must get the lock promptly."""
    clock, client = clocked
    holder = client().item("job", ttl="1s", timeout=0)
    holder.acquire()
    clock.offset = -3600.0
    waiter = client().item("job", ttl="10s", timeout="8s")
    result: List[Tuple[str, Any]] = []
    thread = threading.Thread(target=lambda: result.append(bounded(waiter.acquire, 15)), daemon=True)
    thread.start()
    try:
        time.sleep(0.4)
        assert not result, "the jump back lengthened the lease by its size: still held"
        clock.offset = 0.0
        thread.join(PROMPT)
        assert result and result[0][0] == "ok", f"no lock {PROMPT}s after the correction: {result}"
    finally:
        client().item("job", timeout=0).try_acquire()  # wakes a sleeping memory waiter
        thread.join(15)


@pytest.mark.parametrize(
    "store", ["sqlite", "file"]
)
def test_waiter_paused_past_its_queue_entry_still_gets_the_lock(store: str, tmp_path: Path) -> None:
    """A waiter SIGSTOPped longer than its queue entry lives, while others prune it and
    the holder releases: once resumed it must still get the free lock, promptly."""
    url = f"sqlite:///{tmp_path}/locks.sqlite3" if store == "sqlite" else f"file://{tmp_path}/locks"
    life = 1.0
    code = f"""
import sys, time
import brokerlock.adapters.{store}.adapter as adapter
from brokerlock import BrokerLock
# A short queue-entry life, so the test pauses for 2 s rather than QUEUE_ENTRY_LIFE.
adapter.QUEUE_ENTRY_LIFE = min(getattr(adapter, "QUEUE_ENTRY_LIFE", {life}), {life})
import brokerlock.adapters.embedded.store as store
store.WITNESSED_ENTRY_LIFE = {life}
item = BrokerLock.from_url({url!r}).item("job", ttl="10s", timeout="8s")
print("parking", flush=True)
try:
    item.acquire()
    print("ok", flush=True)
except Exception as exc:
    print(type(exc).__name__, flush=True)
"""
    with Actor(url) as holder, Actor(url) as other:
        assert holder.do("acquire job 60s 1s")[0] == "ok"
        waiter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert waiter.stdout is not None and waiter.stdout.readline() == "parking\n"
            time.sleep(0.5)
            waiter.send_signal(signal.SIGSTOP)
            time.sleep(life + 1.0)
            assert other.do("try job 60s") == ("ok", "None")  # held; prunes stale waiters
            assert holder.do("release job") == ("ok", "None")
            waiter.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            line = waiter.stdout.readline().strip()
            assert line == "ok", f"the resumed waiter ended with {line!r}"
            assert time.monotonic() - resumed < PROMPT
        finally:
            waiter.kill()
            waiter.wait()


@needs_witness
@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_dead_holder_is_freed_at_once_whatever_the_clock(store: str, tmp_path: Path) -> None:
    """A holder killed while the contender's wall clock is an hour behind: its lease
    seems to have an hour left, but the dead holder frees it at once."""
    from brokerlock import FileAdapter

    clock = JumpyClock()
    clock.offset = -3600.0
    if store == "sqlite":
        url = f"sqlite:///{tmp_path}/locks.sqlite3"
        mine = SQLiteAdapter(tmp_path / "locks.sqlite3", clock=clock)
    else:
        url = f"file://{tmp_path}/locks"
        mine = FileAdapter(tmp_path / "locks", clock=clock)
    item = BrokerLock(mine).item("job", ttl="60s", timeout="5s")
    with Actor(url) as holder:
        status, message = holder.do("acquire job 60s 1s")
        assert status == "ok", message
        assert item.try_acquire() is None
    # The actor is killed on leaving the block.
    assert bounded(item.acquire)[0] == "ok"
    item.release()


def test_sqlite_writer_stopped_mid_transaction_does_not_stretch_a_timeout(tmp_path: Path) -> None:
    """A process that holds SQLite's write lock (stopped mid-transaction) makes the store
    busy: a wait still ends at its timeout, and a one-shot try reports the busy store."""
    import sqlite3

    url = f"sqlite:///{tmp_path}/locks.sqlite3"
    BrokerLock.from_url(url).item("warm-up").try_acquire()  # creates the schema
    wedge = sqlite3.connect(str(tmp_path / "locks.sqlite3"), isolation_level=None)
    wedge.execute("BEGIN IMMEDIATE")  # the write lock, held like a stopped writer would
    try:
        item = BrokerLock.from_url(url).item("job", timeout="300ms")
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            item.acquire()
        assert time.monotonic() - started < 2
        started = time.monotonic()
        with pytest.raises(BrokerLockError, match="locked"):
            BrokerLock.from_url(url).item("job").try_acquire()
        assert time.monotonic() - started < 3
    finally:
        wedge.execute("ROLLBACK")
        wedge.close()
    assert BrokerLock.from_url(url).item("job", timeout="1s").try_acquire() is not None
