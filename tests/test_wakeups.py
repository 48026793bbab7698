"""Push wake-ups on every platform: inotify (Linux), a FIFO per waiter (other POSIX
systems: macOS; forced here by ``BROKERLOCK_WAKEUP=fifo``), a named event (Windows).

Each case runs in a fresh interpreter with the waiters' safety nets set to ten
minutes: a waiter that gets the lock within seconds was woken by the release, not
by a periodic look.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from stores import file_url, needs_flock
from test_portable import run_python

_HANDOVER = """
import json, os, sys, threading, time
from brokerlock import BrokerLock, _platform
from brokerlock.adapters.embedded import bells
bells.SAFETY_NET = bells.DEATH_NET = 600.0  # only a ring can wake a waiter in time
url = sys.argv[1]
first, second = BrokerLock.from_url(url), BrokerLock.from_url(url)
holder = first.item("job", ttl="60s").acquire()
woken = []
parked = threading.Event()

def wait():
    adapter = second.adapter
    kind = type(adapter._bells.waiter(adapter._bells.make())).__name__
    parked.set()
    item = second.item("job", ttl="60s", timeout="30s").acquire()
    woken.append((kind, time.monotonic()))
    item.release()

for _ in range(3):  # three hand-overs: the bell is kept and reused between waits
    thread = threading.Thread(target=wait)
    thread.start()
    parked.wait(10)
    time.sleep(0.3)  # let it park: an early release would prove nothing
    released = time.monotonic()
    holder.release()
    thread.join(30)
    assert woken, "the waiter never got the lock"
    kind, at = woken.pop()
    holder = first.item("job", ttl="60s").acquire()
    parked.clear()
print(json.dumps({"wakeup": _platform.WAKEUP, "waiter": kind, "after": at - released}))
"""

_WAITERS = {"inotify": "SharedInotifyWaiter", "fifo": "FifoWaiter", "event": "EventWaiter"}


@pytest.mark.parametrize("store", ["sqlite", pytest.param("file", marks=needs_flock)])
@pytest.mark.parametrize(
    "forced",
    [
        "",
        pytest.param("fifo", marks=pytest.mark.skipif(
            sys.platform == "win32", reason="no FIFOs on Windows (it rings named events)"
        )),
    ],
)
def test_a_parked_waiter_is_woken_by_the_release(store: str, forced: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/locks.sqlite3" if store == "sqlite" else file_url(tmp_path / "locks")
    code = "import sys; sys.argv[1:] = [" + repr(url) + "]\n" + _HANDOVER
    out = run_python(code, env={"BROKERLOCK_WAKEUP": forced}, timeout=120)
    expected = forced or ("event" if sys.platform == "win32" else
                          "inotify" if sys.platform.startswith("linux") else "fifo")
    assert out["wakeup"] == expected
    assert out["waiter"] == _WAITERS[expected]
    assert out["after"] < 5.0, "woken by the ring, not by the ten-minute safety net"


_WAIT_IN_MAIN = """
import subprocess, sys
from brokerlock import BrokerLock
url = sys.argv[1]
# The holder is another process, so that the waiter watches for its death (a process
# handle on Windows, a liveness FIFO on the FIFO path) until it exits.
hold = (
    "import sys, time\\n"
    "from brokerlock import BrokerLock\\n"
    "item = BrokerLock.from_url(sys.argv[1]).item('job', ttl='60s').acquire()\\n"
    "print('held', flush=True)\\n"
    "time.sleep(0.5)\\n"
    "item.release()\\n"
)
holder = subprocess.Popen([sys.executable, "-c", hold, url], stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline() == "held\\n"
BrokerLock.from_url(url).item("job", ttl="60s", timeout="30s").acquire().release()
holder.wait(30)
print("ok")
"""


@pytest.mark.parametrize("store", ["sqlite", pytest.param("file", marks=needs_flock)])
def test_a_process_that_waited_exits_without_a_word(store: str, tmp_path: Path) -> None:
    """The main thread's bell and watches are dropped at interpreter exit, where
    imports fail and modules are half gone: nothing may be printed then (under Windows
    an import in that path printed 'Exception ignored' at every exit)."""
    import subprocess

    url = f"sqlite:///{tmp_path}/locks.sqlite3" if store == "sqlite" else file_url(tmp_path / "locks")
    done = subprocess.run(
        [sys.executable, "-c", _WAIT_IN_MAIN, url], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")
