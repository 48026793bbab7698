"""One chaos worker process: ``python chaos_worker.py URL NAME TTL JOURNAL THREADS HOLD_MAX STOP``.

Each of THREADS threads loops: acquire the lock NAME (one item shared by the threads,
as a service would share it), journal what it did, release, until the file STOP
exists. Journal lines, each written with one ``write()`` on an ``O_APPEND`` descriptor
(this process's own file, so a SIGKILL can at worst lose the line being built):

``E fence pid thread enter_ns acquired_at expires_at``
    entered: written at once after ``acquire()`` returned, while holding.
``X fence exit_ns``
    about to leave: written while still holding, right before ``release()``.
``R fence ok|lost``
    what ``release()`` said: ``lost`` is :class:`LockLost` (the lease had ended).
``T thread message`` / ``F thread message``
    a timeout / any other exception (the checker counts both as failures).

``*_ns`` are ``time.monotonic_ns()``, one clock for every process of the host;
``acquired_at``/``expires_at`` are the lease's own stamps, by the store's clock.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time

from brokerlock import BrokerLock, LockLost, LockTimeout


def _break_on_purpose(mutant: str) -> None:
    """Deliberately broken stores, to prove the checker catches what it claims to."""
    if mutant == "blind-witness":
        # Every holder looks dead: live leases get taken over before they expire.
        from brokerlock.adapters.embedded.witness import Witness

        Witness.is_alive = lambda self, mark: False  # type: ignore[method-assign]
    elif mutant:
        raise SystemExit(f"unknown mutant {mutant!r}")


def main(url: str, name: str, ttl: str, journal: str, threads: str, hold_max: str, stop: str) -> None:
    # LockLost after a pause is expected here and journaled; stderr (any of it fails
    # the test) is for surprises: errors, and a presence connection lost while the
    # server runs on (it frees every lease of the process).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(created).6f %(threadName)s %(levelname)s %(message)s"))
    handler.addFilter(
        lambda record: record.levelno >= logging.ERROR or "presence" in record.getMessage()
    )
    logging.getLogger("brokerlock").addHandler(handler)
    logging.getLogger("brokerlock").setLevel(logging.WARNING)
    _break_on_purpose(os.environ.get("CHAOS_MUTANT", ""))
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    item = BrokerLock.from_url(url).item(name, ttl=float(ttl), timeout="20s")
    longest = float(hold_max)
    pid = os.getpid()

    def write(line: str) -> None:
        os.write(fd, line.encode())

    def loop(index: int) -> None:
        rng = random.Random()
        while not os.path.exists(stop):
            try:
                item.acquire()
            except LockTimeout as exc:
                write(f"T {index} {str(exc)!r}\n")
                continue
            except Exception as exc:
                write(f"F {index} {type(exc).__name__}:{str(exc)!r}\n")
                time.sleep(0.01)
                continue
            lease = item.lease
            assert lease is not None
            fence = lease.fence
            write(
                f"E {fence} {pid} {index} {time.monotonic_ns()} "
                f"{lease.acquired_at!r} {lease.expires_at!r}\n"
            )
            # Mostly hand over at once; sometimes hold a little, so pauses and kills
            # land inside the critical section too.
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0, longest))
            write(f"X {fence} {time.monotonic_ns()}\n")
            try:
                item.release()
                write(f"R {fence} ok\n")
            except LockLost:
                write(f"R {fence} lost\n")
            except Exception as exc:
                write(f"F {index} release:{type(exc).__name__}:{str(exc)!r}\n")

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(int(threads))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()


if __name__ == "__main__":
    main(*sys.argv[1:])
    os._exit(0)
