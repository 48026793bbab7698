"""Throughput of the memory store with 8 and with 64 threads contending for one lock.

    python benchmarks/memory_threads.py [--seconds 3] [--threads 8 64]

Each thread loops ``with item.hold(): pass`` on one name of one ``MemoryAdapter`` for
the given time; the acquisitions per second are printed per thread count, and the
ratio of the first count's figure to the last's. A release wakes only the next waiter
(one Condition per waiter), so the figure with 64 threads should stay within 2x of
the one with 8: a store that woke every waiter on every release (a thundering herd)
fell about 6x.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import List

from brokerlock import BrokerLock, MemoryAdapter


def throughput(threads: int, seconds: float) -> float:
    """Acquisitions per second of ``threads`` threads on one lock."""
    lock = BrokerLock(MemoryAdapter())
    counts: List[int] = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def work(index: int) -> None:
        item = lock.item("hot", ttl="1m", timeout=None)
        start.wait()
        done = 0
        while not stop.is_set():
            with item.hold():
                done += 1
        counts[index] = done

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per thread count (default 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=[8, 64], help="default: 8 64")
    args = parser.parse_args()
    figures = []
    for threads in args.threads:
        rate = throughput(threads, args.seconds)
        figures.append(rate)
        print(f"{threads:4d} threads: {rate:10.0f} acquisitions/s")
    if len(figures) > 1:
        print(f"ratio {args.threads[0]}/{args.threads[-1]} threads: {figures[0] / figures[-1]:.2f}x")


if __name__ == "__main__":
    main()
