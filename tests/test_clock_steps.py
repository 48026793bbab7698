"""Steps of the host's wall clock under the embedded stores (SQLite, lock files).

Every client process on the host sees the same steps: each runs with a
``sitecustomize`` that adds an offset, read from a file the test writes, to
``time.time()`` and ``time.time_ns()`` (the wall clock as Python sees it; the boot
clock is untouched, as a real ``date -s`` leaves it). A lease must last its ttl by the
monotonic clock whatever the steps: a second process gets in neither early (step
forward) nor late (step back), the holder's ``remaining()`` is never optimistic, and
fences still grow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest
from stores import needs_flock

from brokerlock.adapters.embedded.clock import BOOT_ID

pytestmark = pytest.mark.skipif(
    not BOOT_ID, reason="no boot identity here: embedded stores count on the wall clock"
)

_SITECUSTOMIZE = r"""
import os, time
_path = os.environ.get("BROKERLOCK_TEST_WALL_STEP")
if _path:
    _real_time, _real_time_ns = time.time, time.time_ns

    def _step():
        try:
            with open(_path) as f:
                return float(f.read() or 0)
        except (OSError, ValueError):
            return 0.0

    time.time = lambda: _real_time() + _step()
    time.time_ns = lambda: _real_time_ns() + int(_step() * 1e9)
"""

# A client driven line by line; each command answers one JSON line.
_CLIENT = r"""
import json, sys, time
from brokerlock import BrokerLock, LockLost
lock = BrokerLock.from_url(sys.argv[1])
items = {}
for line in sys.stdin:
    command, name, *args = line.split()
    item = items.setdefault(name, lock.item(name, ttl=args[0] if args else "3s", timeout=0))
    if command == "try":
        got = item.try_acquire()
        answer = {"fence": item.fence if got else None}
    elif command == "remaining":
        answer = {"remaining": item.remaining(), "lost": item.lost, "wall": time.time()}
    elif command == "release":
        try:
            item.release()
            answer = {"released": True}
        except LockLost:
            answer = {"released": False}
    elif command == "list":
        answer = {"left": [lock.adapter.on_wall_clock(l).expires_at - time.time()
                           for l in lock.adapter.list()]}
    print(json.dumps(answer), flush=True)
"""


class Client:
    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )

    def do(self, command: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "client died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(params=["sqlite", pytest.param("file", marks=needs_flock)])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tuple[str, Path, dict[str, str]]]:
    """The store's URL, the file that steps every client's wall clock, their environment."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    step = tmp_path / "wall-step"
    step.write_text("0")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    env["BROKERLOCK_TEST_WALL_STEP"] = str(step)
    url = (
        f"sqlite:///{tmp_path}/locks.sqlite3" if request.param == "sqlite" else f"file://{tmp_path}/locks"
    )
    yield url, step, env


def test_wall_clock_steps_neither_shorten_nor_stretch_a_lease(
    host: Tuple[str, Path, dict[str, str]],
) -> None:
    url, step, env = host
    ttl = 3.0
    holder, rival = Client(url, env), Client(url, env)
    late = None
    try:
        before = time.monotonic()
        first = holder.do("try job")["fence"]
        after = time.monotonic()
        assert first is not None

        step.write_text("120")  # forward: the lease must not end early
        assert holder.do("remaining job")["wall"] > time.time() + 100, "the step took effect"
        assert rival.do("try job")["fence"] is None
        # A process started after the step agrees with those started before it.
        late = Client(url, env)
        assert late.do("try job")["fence"] is None
        state = holder.do("remaining job")
        assert not state["lost"] and 0 < state["remaining"] <= ttl - (time.monotonic() - after) + 0.05
        (left,) = rival.do("list job")["left"]  # shown on the (stepped) wall clock
        assert 0 < left <= ttl

        step.write_text("-120")  # back, by 240 s: the lease must not be stretched
        assert rival.do("try job")["fence"] is None or time.monotonic() - before >= ttl
        while True:
            got = rival.do("try job")["fence"]
            now = time.monotonic()
            if got is not None:
                break
            assert now - after < ttl + 1.0, "the lease outlived its ttl after the step back"
            time.sleep(0.02)
        assert now - before >= ttl, f"the rival got in {now - before:.3f}s after, within the ttl"
        # The holder was never told more than it had, and hears that its lease ended.
        assert holder.do("remaining job")["remaining"] == 0.0
        assert holder.do("release job") == {"released": False}
        # Fences still grow, although the wall clock is 2 minutes behind the holder's.
        assert got > first
        assert rival.do("release job") == {"released": True}
        step.write_text("0")
        third = late.do("try job")["fence"]
        assert third is not None and third > got
    finally:
        for client in (holder, rival, late):
            if client is not None:
                client.close()
