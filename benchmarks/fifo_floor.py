"""The floor under the embedded stores' contended figures: the least a strict-FIFO lock
between processes costs in pure Python on this machine.

    python benchmarks/fifo_floor.py                  # 2 and 8 processes, 3 s each
    python benchmarks/fifo_floor.py --procs 8 --seconds 5

Not a lock anyone should use: it has no ttl, no fences, no timeout, no crash safety
(a process killed while queued or holding strands every other), no threads, one name.
It keeps only what a FIFO hand-over between processes cannot do without: a shared
record under ``flock`` (the holder and the queue, a few bytes), one FIFO per process as
its bell, and a release that writes the next holder into the record before ringing
it. Whatever brokerlock spends beyond this floor per acquisition is the price of its
guarantees and of how it is written, which is what a target for the embedded stores
should be weighed against (see docs/benchmarks.rst).

Standard library only; POSIX (``flock``, FIFOs).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from handovers import timed_run  # (this directory: the same clock and gathering)

FREE = b"-"


def worker(directory: str, me: int, go: str, out: str) -> None:
    record = os.open(os.path.join(directory, "record"), os.O_RDWR)
    own = os.path.join(directory, f"bell{me}")
    bell = os.open(own, os.O_RDONLY | os.O_NONBLOCK)
    keep_open = os.open(own, os.O_WRONLY | os.O_NONBLOCK)  # (no EOF storms when rung)
    rung: Dict[bytes, int] = {}
    poll = select.poll()
    poll.register(bell, select.POLLIN)
    mine = str(me).encode()

    def update(change: Callable[[List[bytes]], Tuple[Any, List[bytes]]]) -> Any:
        # The record: "<holder or -> <count> <queued id> ..."; holder and queue change
        # together under the flock, as in a real store.
        fcntl.flock(record, fcntl.LOCK_EX)
        try:
            fields = os.pread(record, 512, 0).split()
            result, new = change(fields)
            os.pwrite(record, b" ".join(new).ljust(256), 0)
        finally:
            fcntl.flock(record, fcntl.LOCK_UN)
        return result

    def take_or_queue(fields: List[bytes]) -> Tuple[Optional[int], List[bytes]]:
        holder, count, queue = fields[0], int(fields[1]), fields[2:]
        if holder == FREE:
            return count + 1, [mine, b"%d" % (count + 1), *queue]
        return None, [holder, fields[1], *queue, mine]

    def release(fields: List[bytes]) -> Tuple[Optional[bytes], List[bytes]]:
        count, queue = int(fields[1]), fields[2:]
        if not queue:
            return None, [FREE, fields[1]]
        return queue[0], [queue[0], b"%d" % (count + 1), *queue[1:]]

    with open(out + ".ready", "w"):
        pass
    while not os.path.exists(go):
        time.sleep(0.001)
    time.sleep(0.01)  # (written whole, then renamed into place)
    with open(go) as f:
        start, stop = json.load(f)
    while time.time() < start:
        time.sleep(0.0005)
    holds: List[Tuple[int, float, float]] = []
    while time.time() < stop:
        number = update(take_or_queue)
        if number is None:
            while True:  # granted when the record names us; the bell says when to look
                poll.poll()
                try:
                    os.read(bell, 64)
                except BlockingIOError:
                    pass
                fields = os.pread(record, 512, 0).split()
                if fields[0] == mine:
                    number = int(fields[1])
                    break
        entered = time.time()
        left = time.time()
        following = update(release)
        if following is not None:
            fd = rung.get(following)
            if fd is None:
                fd = rung[following] = os.open(
                    os.path.join(directory, "bell" + following.decode()), os.O_WRONLY | os.O_NONBLOCK
                )
            os.write(fd, b"x")
        holds.append((number, entered, left))
    os.close(keep_open)
    with open(out, "w") as f:
        json.dump(holds, f)


def run(procs: int, seconds: float) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "record"), "wb") as f:
            f.write(b"- 0".ljust(256))
        for i in range(procs):
            os.mkfifo(os.path.join(directory, f"bell{i}"))
        go = os.path.join(directory, "go.json")
        outs = [os.path.join(directory, f"out{i}.json") for i in range(procs)]
        children = [
            subprocess.Popen([sys.executable, __file__, "--worker", directory, str(i), go, outs[i]])
            for i in range(procs)
        ]
        holds = timed_run(children, outs, go, seconds, patience=60)
    holds.sort()
    numbers = [h[0] for h in holds]
    assert numbers == list(range(1, len(holds) + 1)), "an acquisition was lost or repeated"
    for (_, a, _, a_left), (_, b, b_entered, _) in zip(holds, holds[1:]):
        assert a == b or a_left <= b_entered, "two processes held the lock at once"
    gaps = sorted(b[2] - a[3] for a, b in zip(holds, holds[1:]) if a[1] != b[1])
    return {
        "procs": procs, "seconds": seconds, "acquisitions_per_s": round(len(holds) / seconds),
        "handover_share": round(len(gaps) / max(1, len(holds)), 2),
        "handover_p50_us": round(gaps[len(gaps) // 2] * 1e6) if gaps else None,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"]:
        worker(args[1], int(args[2]), args[3], args[4])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--procs", default="2,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    options = parser.parse_args(args)
    print(f"# FIFO floor, {sys.platform} Python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    for procs in map(int, options.procs.split(",")):
        print(json.dumps(run(procs, options.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
