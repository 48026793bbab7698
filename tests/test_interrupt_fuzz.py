"""SIGINT at random moments into a process looping ``with item.hold():`` that catches
``KeyboardInterrupt``, while another process contends, on every back end.

Whatever bytecode an interrupt lands on, the lease must stay somebody's: no lease is
left behind that nobody holds (the rival would wait out the ttl of 20 s), the looping
process never finds itself holding after its ``with`` block ended (but where CPython
leaves no choice: an interrupt on the entry of the release, see ``interrupt_worker``;
``release()`` then frees it), and the lock is free
at the end with no queue place left. Each back end is fuzzed for a few seconds
(``BROKERLOCK_FUZZ_SECONDS`` for a longer run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from stores import StoreFactory

from brokerlock import BrokerLock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGINT into a process: POSIX")

WORKER = str(Path(__file__).with_name("interrupt_worker.py"))
SECONDS = float(os.environ.get("BROKERLOCK_FUZZ_SECONDS", "3"))


def wait_for(path: Path, procs: List[subprocess.Popen[bytes]], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        for proc in procs:
            assert proc.poll() is None, f"a worker exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.005)


def test_sigint_fuzz_leaks_no_lease(make_store: StoreFactory, tmp_path: Path) -> None:
    adapter = make_store()
    url = adapter.url
    memory = url.startswith("memory:")
    name = "fuzzed"
    folder = tmp_path / "run"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    loop = subprocess.Popen([sys.executable, WORKER, "loop", url, name, str(folder)], env=env)
    procs = [loop]
    try:
        wait_for(folder / "ready", procs)
        if not memory:
            procs.append(
                subprocess.Popen([sys.executable, WORKER, "rival", url, name, str(folder)], env=env)
            )
        rng = random.Random()
        fired = 0
        until = time.monotonic() + SECONDS
        while time.monotonic() < until:
            time.sleep(rng.uniform(0.005, 0.06))
            assert loop.poll() is None, f"the looping process died ({loop.returncode})"
            loop.send_signal(signal.SIGINT)
            fired += 1
        time.sleep(0.1)  # the last interrupt lands before the loop is told to stop
        (folder / "stop").touch()
        wait_for(folder / "loop.json", [loop])  # (the rival may have finished)
        looped: Dict[str, Any] = json.loads((folder / "loop.json").read_text())
        if not memory:
            assert procs[1].wait(timeout=60) == 0
        rivalled: Dict[str, Any] = json.loads((folder / "rival.json").read_text())
        # While the looping process still lives (its queue places would count), a
        # newcomer takes the lock at once: no lease and no place left over.
        newcomer = BrokerLock(make_store()).item(name, timeout=0)
        assert newcomer.try_acquire() is newcomer, adapter.get(name)
        newcomer.release()
    finally:
        (folder / "stop").touch()
        (folder / "quit").touch()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert loop.returncode == 0
    report = f"{fired} SIGINTs: loop {looped}, rival {rivalled}"
    # (Signals that arrive together are one interrupt; so are those inside a cleanup.)
    assert looped["interrupts"] >= min(10, fired // 4), report
    assert looped["leaked"] == 0 and looped["held"] == 0, report
    assert looped["timeouts"] == 0 and rivalled["timeouts"] == 0, report
    assert looped["rounds"] > 0 and rivalled["rounds"] > 0, report
    # The ttl is 20 s: a leaked lease would make the rival wait for it; a ring that an
    # interrupt cut short would make it wait for its safety net (4-6 s). It waits some
    # 20 ms otherwise.
    assert rivalled["longest"] < 2.0, report
    assert looped.get("free", True), report
    assert adapter.get(name) is None
