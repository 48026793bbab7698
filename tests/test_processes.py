"""Real subprocesses against the embedded stores: exclusion, killed holders, fork."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from stores import file_url, needs_flock, needs_witness

from brokerlock import BrokerLock

WORKER = str(Path(__file__).with_name("worker.py"))


@pytest.fixture(params=["sqlite", pytest.param("file", marks=needs_flock)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/locks.sqlite3"
    return file_url(tmp_path / "locks")


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], limit: float = 20) -> None:
    """Wait until a worker has created ``path`` (its readiness signal) or died."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"worker exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "worker never became ready"
        time.sleep(0.005)


@pytest.fixture
def holder(url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, WORKER, "hold", url, "job", "60s", str(ready)])
    try:
        wait_for_file(ready, proc)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_four_processes_increment_exactly(url: str, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    with BrokerLock.from_url(url).item("counter").hold() as before:
        start = before.fence
    assert start is not None
    procs = [
        subprocess.Popen([sys.executable, WORKER, "increment", url, "counter", "250", str(counter)])
        for _ in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    assert counter.read_text() == "1000"
    # Every one of the 1000 acquisitions produced a new, greater fence.
    item = BrokerLock.from_url(url).item("counter")
    with item.hold():
        assert item.fence is not None and item.fence >= start + 1001


@needs_witness
def test_no_wake_up_is_lost_while_processes_take_turns(url: str) -> None:
    """Six processes take the lock in turn as fast as they can: every acquisition is a
    hand-over, woken by the release that makes the waiter the head of the queue. With
    the safety net off, a single lost wake-up leaves its waiter asleep until its 20 s
    timeout, and its process fails."""
    procs = [
        subprocess.Popen([sys.executable, WORKER, "churn", url, "turns", "300"]) for _ in range(6)
    ]
    try:
        for proc in procs:
            assert proc.wait(timeout=120) == 0, "a waiter slept through its turn"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@needs_witness
def test_killed_holder_frees_lock_at_once(
    url: str, holder: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    item = BrokerLock.from_url(url).item("job", ttl="60s", timeout="10s")
    assert item.try_acquire() is None
    started = time.monotonic()
    holder.kill()
    holders_fence = int((tmp_path / "ready").read_text())
    item.acquire()  # ttl is 60 s: only the death of the holder can free it
    assert time.monotonic() - started < 1.0
    assert item.fence is not None and item.fence > holders_fence
    item.release()


@needs_witness
def test_waiter_is_woken_by_holder_death(url: str, holder: subprocess.Popen[bytes]) -> None:
    """A waiter already parked when the holder dies is woken, not left to its safety net."""
    import threading

    item = BrokerLock.from_url(url).item("job", ttl="60s", timeout="20s")
    waited = []

    def wait() -> None:
        started = time.monotonic()
        item.acquire()
        waited.append(time.monotonic() - started)
        item.release()

    thread = threading.Thread(target=wait)
    thread.start()
    # Let it park in its wait; if it has not yet, the test still holds, the waiter
    # then finds the holder dead on its first look.
    time.sleep(0.2)
    killed = time.monotonic()
    holder.kill()
    thread.join(20)
    assert waited, "the waiter never got the lock"
    # Well under the 1 s safety-net recheck: the death itself woke the waiter.
    assert time.monotonic() - killed < 0.5


#: fork() is what the next two tests are about; they fork in a fresh interpreter, with
#: one thread, because threads that earlier tests left in this one (a renewer, a
#: parked waiter) make fork() unsafe, and Python 3.12+ warns about exactly that.
_FORKED_CHILD = """
import os, sys, threading
from brokerlock import BrokerLock
url = sys.argv[1]
item = BrokerLock.from_url(url).item("forked", ttl="60s")
item.acquire()
assert threading.active_count() == 1, threading.enumerate()
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the child: report what it sees, and try to free the parent's lock
    try:
        report = f"{item.acquired},{item.fence}"
        item.release()  # must be a no-op: the child holds nothing
        report += f",{item.is_reserved()}"
        os.write(write, report.encode())
    finally:
        os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
report = os.read(read, 100).decode()
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
assert report == "False,None,True", report
assert item.acquired and item.is_reserved()
item.release()  # the parent's hold is intact and its own to release
assert not item.is_reserved()
print("ok")
"""

_EXITED_CHILD = """
import os, sys, threading
from brokerlock import BrokerLock
url = sys.argv[1]
item = BrokerLock.from_url(url).item("parent", ttl="60s")
item.acquire()
assert threading.active_count() == 1, threading.enumerate()
pid = os.fork()
if pid == 0:
    child = BrokerLock.from_url(url).item("child-own", ttl="60s")
    child.acquire()  # the child takes a witness of its own, then exits
    os._exit(0)
os.waitpid(pid, 0)
assert BrokerLock.from_url(url).item("parent").is_reserved()
item.release()
print("ok")
"""


def _run_forking(script: str, url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", script, url],
        capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_forked_child_holds_nothing(url: str) -> None:
    _run_forking(_FORKED_CHILD, url)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_exited_child_does_not_free_parents_lock(url: str) -> None:
    """The child's exit must not drop the parent's liveness witness."""
    _run_forking(_EXITED_CHILD, url)


@pytest.mark.parametrize("_round", range(3))
def test_many_processes_open_a_new_database_at_once(tmp_path: Path, _round: int) -> None:
    """Creating the schema and switching to WAL race safely; no 'database is locked'
    and no lost POSIX locks ('disk I/O error') when adapters come and go."""
    script = (
        "import sys\n"
        "from brokerlock import BrokerLock, SQLiteAdapter\n"
        "for _ in range(10):\n"
        "    item = BrokerLock(SQLiteAdapter(sys.argv[1])).item('x', timeout='30s')\n"
        "    with item.hold():\n"
        "        pass\n"
    )
    db = str(tmp_path / "new.sqlite3")
    procs = [
        subprocess.Popen([sys.executable, "-c", script, db], stderr=subprocess.PIPE) for _ in range(6)
    ]
    errors = [proc.communicate(timeout=120)[1].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 6, errors
