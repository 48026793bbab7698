"""Several processes contend for one lock on the default embedded store.

Each worker takes the lock a few times, holds it briefly, and prints who holds it,
when, and with which fence: the fences only grow, and no two holds overlap.

    python examples/contend.py [--workers 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from brokerlock import BrokerLock


def worker(index: int, rounds: int) -> None:
    lock = BrokerLock()  # $BROKERLOCK_URL, else ~/.local/state/brokerlock/locks.sqlite3
    item = lock.item("examples/contend", ttl="10s", timeout="30s")
    for _ in range(rounds):
        asked = time.monotonic()
        with item.hold():
            waited = time.monotonic() - asked
            stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
            print(
                f"{stamp}  worker {index} (pid {os.getpid()}) holds {item.name!r} "
                f"with fence {item.fence} after waiting {waited * 1000:.1f} ms",
                flush=True,
            )
            time.sleep(0.05)  # the "critical work"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.rounds)
        return
    print(f"store: {BrokerLock().adapter.url}")
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--rounds", str(args.rounds)])
        for i in range(args.workers)
    ]
    sys.exit(max(proc.wait() for proc in procs))


if __name__ == "__main__":
    main()
