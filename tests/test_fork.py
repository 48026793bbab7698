"""fork() and the embedded stores: a holder's children neither delay nor share its locks.

A child inherits its parent's descriptors. One of them, the store's witness file, is
what wakes the waiters when a holder dies (its closing); a child that kept it open
would leave them asleep until their safety net. Children started by multiprocessing
(the fork start method) must also use the store as processes of their own.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from stores import forks_with_threads, needs_flock, needs_witness

from brokerlock import BrokerLock

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only"),
    forks_with_threads,  # the point: children of a holder with the library's threads
]


@pytest.fixture(params=["sqlite", pytest.param("file", marks=needs_flock)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/locks.sqlite3"
    return f"file://{tmp_path}/locks"


# The holder takes the lock, forks a child that outlives it (as a multiprocessing worker
# or a daemonised helper would), and says so: "<fence> <child pid>" in the ready file.
_HOLDER = r"""
import os, sys, time
from brokerlock import BrokerLock
url, ready = sys.argv[1:]
item = BrokerLock.from_url(url).item("job", ttl="60s", timeout="10s")
item.acquire()
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
with open(ready + ".tmp", "w") as f:
    f.write(f"{item.fence} {child}")
os.rename(ready + ".tmp", ready)
time.sleep(120)
"""


@pytest.fixture
def holder_with_child(url: str, tmp_path: Path) -> Iterator[Tuple[subprocess.Popen[bytes], int, int]]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, url, str(ready)])
    child = 0
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, f"holder exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "holder never became ready"
            time.sleep(0.005)
        fence, child = map(int, ready.read_text().split())
        yield proc, fence, child
    finally:
        proc.kill()
        proc.wait()
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@needs_witness
def test_killed_holder_with_a_live_forked_child_wakes_its_waiter_at_once(
    url: str, holder_with_child: Tuple[subprocess.Popen[bytes], int, int]
) -> None:
    proc, holders_fence, child = holder_with_child
    item = BrokerLock.from_url(url).item("job", ttl="60s", timeout="20s")
    assert item.try_acquire() is None
    parked = threading.Event()
    waited: List[float] = []

    def wait() -> None:
        parked.set()
        item.acquire()  # ttl 60 s: only the holder's death can free it
        waited.append(time.monotonic())
        assert item.fence is not None and item.fence > holders_fence
        item.release()

    thread = threading.Thread(target=wait)
    thread.start()
    parked.wait()
    # Let the waiter park in its sleep; if it has not yet, it finds the holder dead on
    # its first look and the test still holds.
    time.sleep(0.2)
    killed = time.monotonic()
    proc.kill()
    thread.join(20)
    assert waited, "the waiter never got the lock"
    os.kill(child, 0)  # the child lived on all along
    # Well under the waiters' 1 s safety net: the death itself woke the waiter.
    assert waited[0] - killed < 0.5, f"woken after {waited[0] - killed:.3f}s"


def _worker(url: str, counter: str, rounds: int) -> List[int]:
    """A multiprocessing worker: increments under the lock, and must not hold, or be
    able to take, the lock its parent holds."""
    lock = BrokerLock.from_url(url)
    parents = lock.item("parent", ttl="60s", timeout=0)
    assert not parents.acquired and parents.try_acquire() is None
    item = lock.item("counter", ttl="30s", timeout="60s")
    fences = []
    for _ in range(rounds):
        with item.hold():
            with open(counter) as f:
                value = int(f.read() or 0)
            time.sleep(0)
            with open(counter, "w") as f:
                f.write(str(value + 1))
            assert item.fence is not None
            fences.append(item.fence)
    return fences


def test_multiprocessing_fork_workers_use_the_store_as_processes_of_their_own(
    url: str, tmp_path: Path
) -> None:
    lock = BrokerLock.from_url(url)
    # Everything the parent keeps is set up before the fork: its witness, connections,
    # a waiter's bell (a wait on a busy lock), and a lock held for the whole run.
    counter = lock.item("counter", ttl="30s", timeout="10s")
    with counter.hold():
        rival = threading.Thread(target=lambda: counter.acquire() and counter.release())
        rival.start()
        time.sleep(0.05)
    rival.join(10)
    parents = lock.item("parent", ttl="60s", timeout=0)
    parents.acquire()
    path = tmp_path / "counter"
    path.write_text("0")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.starmap(_worker, [(url, str(path), 40)] * 3)
    assert path.read_text() == "120"
    fences = sorted(f for fences in results for f in fences)
    assert len(set(fences)) == 120, "every acquisition has a fence of its own"
    # The parent still holds its lock, untouched by its children's comings and goings.
    assert parents.acquired and lock.item("parent", timeout=0).try_acquire() is None
    parents.release()


# A process killed inside a record's update (its flock held for those microseconds),
# just after it forked a child that lives on: the child's copy of the descriptor must
# not keep the flock, or every later operation on that lock waits 30 s and fails.
_KILLED_IN_UPDATE = r"""
import os, signal, sys, time
from brokerlock import BrokerLock
from brokerlock.adapters.file import adapter as file_module
url, ready = sys.argv[1:]
def fork_then_die(record):
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    with open(ready + ".tmp", "w") as f:
        f.write(str(child))
    os.rename(ready + ".tmp", ready)
    os.kill(os.getpid(), signal.SIGKILL)
file_module.encode = fork_then_die
BrokerLock.from_url(url).item("job", ttl="60s", timeout=0).try_acquire()
"""


@needs_flock
def test_a_holder_killed_during_an_update_leaves_no_flock_to_its_forked_child(
    tmp_path: Path,
) -> None:
    url = f"file://{tmp_path}/locks"
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_IN_UPDATE, url, str(ready)])
    child = 0
    try:
        assert proc.wait(timeout=30) == -signal.SIGKILL
        child = int(ready.read_text())
        os.kill(child, 0)  # the child lives on
        started = time.monotonic()
        item = BrokerLock.from_url(url).item("job", ttl="60s", timeout="5s")
        item.acquire()
        assert time.monotonic() - started < 1.0
        item.release()
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
