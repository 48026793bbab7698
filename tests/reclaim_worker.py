"""Run in a real subprocess by tests/test_deferred_reclaim.py:

    python reclaim_worker.py cycle KIND STORE OUT KEEP SHARED TURNS THREADS
    python reclaim_worker.py oneoff KIND STORE OUT KEEP PREFIX COUNT [hang]

``KIND`` is ``file`` or ``sqlite``; ``KEEP`` the size of the set of freed names whose
records an adapter keeps (small, so that records are pushed out and removed all the
time). Fences come from the previous fence and the store's floor alone (the clock's
part is 0 here), so a floor raised too late or a record removed under someone shows
as a repeated or falling fence.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from typing import Any, List

from brokerlock import BrokerLock, FileAdapter, SQLiteAdapter
from brokerlock.adapters.embedded import deferred
from brokerlock.adapters.file import record
from brokerlock.adapters.sqlite import adapter as sqlite_adapter


def _store(kind: str, path: str, keep: int) -> Any:
    deferred.KEEP_FREED = keep
    no_clock = lambda: 0  # noqa: E731
    record.clock_fence = no_clock  # type: ignore[assignment]
    sqlite_adapter.clock_fence = no_clock  # type: ignore[assignment]
    return FileAdapter(path) if kind == "file" else SQLiteAdapter(path)


def _note(out: str, name: str, fence: int) -> None:
    """Inside the lock: claim the name (a second holder finds the claim), then append
    the fence to the name's log: its lines are in the order of the leases."""
    try:
        claim = os.open(os.path.join(out, "held-" + name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        with open(os.path.join(out, "violations"), "a") as f:
            f.write(f"two holders of {name}\n")
        return
    os.close(claim)
    fd = os.open(os.path.join(out, "fences-" + name), os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"%d\n" % fence)
    finally:
        os.close(fd)
    os.unlink(os.path.join(out, "held-" + name))


def cycle(kind: str, path: str, out: str, keep: str, shared: str, turns: str, threads: str) -> None:
    """Threads cycle a few shared names and one-off names, while another thread keeps
    removing this adapter's kept records (``close()``)."""
    store = _store(kind, path, int(keep))
    lock = BrokerLock(store)
    names = [f"shared-{i}" for i in range(int(shared))]
    done = threading.Event()
    errors: List[BaseException] = []

    def work(me: int) -> None:
        rng = random.Random(f"{os.getpid()}-{me}")
        try:
            for turn in range(int(turns)):
                if rng.random() < 0.3:
                    name = f"once-{os.getpid()}-{me}-{turn}"
                else:
                    name = rng.choice(names)
                item = lock.item(name, ttl="60s", timeout="60s")
                item.acquire()
                try:
                    assert item.fence is not None
                    _note(out, name, item.fence)
                finally:
                    item.release()
        except BaseException as exc:  # reported by the parent through the exit code
            errors.append(exc)

    def flush() -> None:
        while not done.wait(0.003):
            store.close()

    flusher = threading.Thread(target=flush)
    flusher.start()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(int(threads))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    flusher.join()
    if errors:
        raise errors[0]
    # No close(): the records this adapter kept must go at the interpreter's exit.


def oneoff(kind: str, path: str, out: str, keep: str, prefix: str, count: str, *hang: str) -> None:
    """Cycle ``count`` one-off names; then exit (no close()), or say so and wait to be
    killed."""
    lock = BrokerLock(_store(kind, path, int(keep)))
    for i in range(int(count)):
        item = lock.item(f"{prefix}-{i}", ttl="60s")
        item.acquire()
        item.release()
    if hang:
        with open(os.path.join(out, "ready"), "w") as f:
            f.write("ready")
        time.sleep(120)


if __name__ == "__main__":
    {"cycle": cycle, "oneoff": oneoff}[sys.argv[1]](*sys.argv[2:])
