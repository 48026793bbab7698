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

_WAITERS = {"inotify": "_SharedInotifyWaiter", "fifo": "FifoWaiter", "event": "EventWaiter"}


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
