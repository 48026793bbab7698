"""Contended hand-overs per second on an embedded store, between N processes.

    python benchmarks/handovers.py                      # sqlite and file, 2 and 8 processes
    python benchmarks/handovers.py --store file --procs 2,4,8 --seconds 5
    BROKERLOCK_WAKEUP=fifo python benchmarks/handovers.py   # the macOS wake-up path on Linux
    .ci/windows.sh --python benchmarks/handovers.py     # as Windows processes, under Wine

Every process takes the lock, increments nothing but its own tally, and releases it,
in a loop, for a fixed time. The run checks exclusion: fences are unique and the
processes' holds never overlap.

What is counted, honestly: ``handovers_per_s`` counts only hand-overs *between
different processes*, acquisitions whose holder differs from the previous holder's
(consecutive fences). A process that takes the lock again right after releasing it
is not a hand-over and is not counted. That happens whenever nobody is queued at the
release (the queue is fair, but a waiter that has not queued yet has no place in it):
with 2 processes it is most acquisitions, as the released process re-queues while the
other one holds, takes and releases in microseconds. ``acquisitions_per_s`` counts
every acquisition, ``handover_share`` is the hand-overs' share of them, and
``handover_p50_us`` is the median time from a holder's call to ``release()`` to the
next process's return from ``acquire()``, over the hand-overs counted.
Standard library only, so that it runs under the embeddable Windows build as well.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_WORKER = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from brokerlock import BrokerLock
url, go, out = sys.argv[2], sys.argv[3], sys.argv[4]
item = BrokerLock.from_url(url).item("bench", ttl="30s", timeout="30s")
item.acquire(); item.release()  # connections, bells and witness made before the clock runs
open(out + ".ready", "w").close()
while not os.path.exists(go):  # every worker is ready: the parent sets the clock
    time.sleep(0.001)
time.sleep(0.01)  # (the go file is written, then renamed into place: it is whole)
with open(go) as f:
    start, stop = json.load(f)
holds = []
while time.time() < start:
    time.sleep(0.001)
while time.time() < stop:
    item.acquire()
    entered = time.time()
    fence = item.fence
    left = time.time()
    item.release()
    holds.append((fence, entered, left))  # (left: just before release() is called)
with open(out, "w") as f:
    json.dump(holds, f)
"""


def url_for(store: str, directory: str) -> str:
    if store == "sqlite":
        return "sqlite:///" + os.path.join(directory, "locks.sqlite3")
    return "file:///" + directory.replace(os.sep, "/").lstrip("/")


def timed_run(
    children: List[subprocess.Popen[bytes]], outs: List[str], go: str, seconds: float,
    patience: float = 120,
) -> List[Any]:
    """Start the clock once every worker wrote ``<out>.ready``, let them run ``seconds``
    and gather their holds as ``(number, worker, entered, left)``: each worker writes the
    ``[number, entered, left]`` of its holds to its ``out`` file.

    The clock starts once every worker has started and taken the lock once: a start
    time fixed in advance left slow starters (Wine, a loaded machine) out of the
    measured seconds, or all of them (0 acquisitions)."""
    limit = time.monotonic() + patience
    while not all(os.path.exists(out + ".ready") for out in outs):
        if time.monotonic() > limit or any(c.poll() is not None for c in children):
            raise SystemExit("a worker did not start")
        time.sleep(0.01)
    start = time.time() + 0.2
    with open(go + ".tmp", "w") as f:
        json.dump([start, start + seconds], f)
    os.replace(go + ".tmp", go)
    for child in children:
        if child.wait(timeout=seconds + patience) != 0:
            raise SystemExit(f"a worker failed with exit status {child.returncode}")
    holds: List[Any] = []
    for me, out in enumerate(outs):
        with open(out) as f:
            holds.extend((number, me, entered, left) for number, entered, left in json.load(f))
    return holds


def run(store: str, procs: int, seconds: float) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        url = url_for(store, os.path.join(directory, "store"))
        go = os.path.join(directory, "go.json")
        outs = [os.path.join(directory, f"out{i}.json") for i in range(procs)]
        children = [
            subprocess.Popen([sys.executable, "-c", _WORKER, ROOT, url, go, out]) for out in outs
        ]
        holds = timed_run(children, outs, go, seconds)
    holds.sort()
    fences = [h[0] for h in holds]
    assert len(set(fences)) == len(fences), "two acquisitions got the same fence"
    for (_, a, _, a_left), (_, b, b_entered, _) in zip(holds, holds[1:]):
        assert a == b or a_left <= b_entered, "two processes held the lock at once"
    # Only hand-overs between different processes; a process re-taking its own lock
    # is not one. (Clocks: time.time() of one host, shared by the processes.)
    gaps = sorted(b[2] - a[3] for a, b in zip(holds, holds[1:]) if a[1] != b[1])
    handovers = len(gaps)
    return {
        "store": store, "procs": procs, "seconds": seconds, "acquisitions": len(holds),
        "acquisitions_per_s": round(len(holds) / seconds), "handovers": handovers,
        "handovers_per_s": round(handovers / seconds),
        "handover_share": round(handovers / max(1, len(holds)), 2),
        "handover_p50_us": round(gaps[len(gaps) // 2] * 1e6) if gaps else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default="sqlite,file")
    parser.add_argument("--procs", default="2,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from brokerlock import _platform

    print(f"# {sys.platform} Python {sys.version.split()[0]}, wake-up: {_platform.WAKEUP}, "
          f"witness: {_platform.HAVE_WITNESS}, {os.cpu_count()} CPUs", flush=True)
    for store in args.store.split(","):
        for procs in map(int, args.procs.split(",")):
            print(json.dumps(run(store, procs, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
