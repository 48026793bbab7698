"""The processes of the interrupt fuzz test (tests/test_interrupt_fuzz.py).

``python interrupt_worker.py loop URL NAME DIR`` loops ``with item.hold():`` and
survives the SIGINTs the test fires at it, counting what it sees: after each
interrupt, a lease of its own thread in the store while the item says it holds
nothing is a leak. ``rival URL NAME DIR`` contends for the same lock and records its
longest wait. Both stop when DIR/stop appears, write DIR/<mode>.json, and (``loop``)
stay alive until DIR/quit appears, so the test can look at the store while they live.
For the memory store the rival is a thread of the loop's process (``URL`` memory://).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from types import TracebackType
from typing import Any, Dict, List, Optional

from brokerlock import BrokerLock, BrokerLockItem, LockTimeout

TTL = "20s"
TIMEOUT = "15s"
#: The calls between a with block and the guard of its release. CPython raises a
#: pending interrupt as a Python function starts, before its first line runs: landing
#: there, an interrupt leaves the hold with the thread (``item.acquired`` true, and
#: ``release()`` frees it), the one case the ownership contract allows, and
#: docs/ownership.rst names. Nothing else may leave a hold behind the block.
ENTRIES = {"__exit__", "release", "settle"}
#: The with statement's start: ``__enter__`` gives back a hold its acquire made when an
#: interrupt lands in it (CPython 3.9/3.10 raise one at almost any instruction), all but
#: at its ``return``, after which the with statement owns the hold. An interrupt that
#: leaves a hold with its innermost frame in one of these can only have landed there.
RETURNS = {"__enter__"}


def on_entry(tb: Optional[TracebackType]) -> bool:
    """Whether the interrupt landed on the entry of one of ``ENTRIES`` (no line of it
    ran: the innermost frame is there, at the function's first line), or at the return
    of one of ``RETURNS``."""
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    ours = os.sep + "brokerlock" + os.sep in code.co_filename
    return ours and (
        (code.co_name in ENTRIES and tb.tb_lineno == code.co_firstlineno) or code.co_name in RETURNS
    )


def rival(item: BrokerLockItem, folder: str, out: Dict[str, Any]) -> None:
    longest = 0.0
    rounds = timeouts = 0
    while not os.path.exists(os.path.join(folder, "stop")):
        started = time.monotonic()
        try:
            item.acquire()
        except LockTimeout:
            timeouts += 1
            continue
        longest = max(longest, time.monotonic() - started)
        rounds += 1
        time.sleep(0.001)
        item.release()
        time.sleep(0.001)
    out.update(rounds=rounds, timeouts=timeouts, longest=longest)


def loop(item: BrokerLockItem, folder: str, out: Dict[str, Any]) -> None:
    store = item._adapter
    me = threading.current_thread().name
    where: List[str] = []  # where the interrupts that left a hold landed
    last = [""]
    entry = [False]
    counted = [False]
    recheck = [False]
    counts: Dict[str, Any] = dict.fromkeys(
        ("rounds", "interrupts", "leaked", "deferred", "held", "on_entry", "timeouts",
         "unchecked"),
        0,
    )

    def check() -> None:
        """After an interrupt: the thread holds nothing (the with block ended, unless
        the interrupt landed on the entry of its release), and no lease of this thread
        is left in the store."""
        if item.acquired:
            if not counted[0]:  # (once per interrupt, if this check is cut short)
                counted[0] = True
                if entry[0]:
                    counts["on_entry"] += 1
                else:
                    counts["held"] += 1
                    where.append(last[0])
            item.release()
        lease = store.get(item.name)
        if lease is not None and lease.pid == os.getpid() and lease.thread == me:
            # A second interrupt on the entry of the cleanup itself (no Python code can
            # stop that) leaves the acquisition recorded as pending: the item's next
            # call finishes it. Anything else of ours in the store is a leak.
            pending = getattr(item._local, "pending", None)
            if pending is not None and pending.token == lease.token:
                counts["deferred"] += 1
            else:
                counts["leaked"] += 1

    stop = os.path.join(folder, "stop")
    with open(os.path.join(folder, "ready"), "w"):
        pass
    while True:
        # Nested: an interrupt can land in the handler of the one before it.
        try:
            # ``while True``: CPython 3.13 would raise an interrupt at the jump back of
            # ``while not os.path.exists(stop)`` past these handlers (cpython#130279).
            while True:
                if os.path.exists(stop):
                    break
                if recheck[0]:  # the last check was cut short: finish it first
                    recheck[0] = False
                    check()
                try:
                    with item.hold():
                        counts["rounds"] += 1
                        time.sleep(0.001)
                except LockTimeout:
                    counts["timeouts"] += 1
                except KeyboardInterrupt:
                    counts["interrupts"] += 1
                    last[0] = traceback.format_exc(limit=-4)
                    entry[0] = on_entry(sys.exc_info()[2])
                    counted[0] = False
                    try:
                        check()
                    except KeyboardInterrupt:
                        counts["unchecked"] += 1
                        recheck[0] = True
            # The test sent its last interrupt before "stop"; one still pending (this
            # process was not scheduled meanwhile) must not cut the final check short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            break
        except KeyboardInterrupt:
            counts["interrupts"] += 1
            recheck[0] = True
    check()  # no more interrupts now
    out.update(counts, where=where)


def main(mode: str, url: str, name: str, folder: str) -> None:
    out: Dict[str, Any] = {}
    lock = BrokerLock.from_url(url)
    item = lock.item(name, ttl=TTL, timeout=TIMEOUT)
    helper = None
    rival_out: Dict[str, Any] = {}
    if mode == "loop" and url.startswith("memory:"):
        other = BrokerLock(lock.adapter).item(name, ttl=TTL, timeout=TIMEOUT)
        helper = threading.Thread(target=rival, args=(other, folder, rival_out), daemon=True)
        helper.start()
    (loop if mode == "loop" else rival)(item, folder, out)
    if helper is not None:
        helper.join()
        with open(os.path.join(folder, "rival.json"), "w") as f:
            json.dump(rival_out, f)
    if helper is not None:  # (another process's rival may hold it still)
        out["free"] = lock.adapter.get(name) is None
    with open(os.path.join(folder, mode + ".json.tmp"), "w") as f:
        json.dump(out, f)
    os.rename(os.path.join(folder, mode + ".json.tmp"), os.path.join(folder, mode + ".json"))
    if mode == "loop":
        while not os.path.exists(os.path.join(folder, "quit")):
            time.sleep(0.01)


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)
