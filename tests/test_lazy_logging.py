"""``logging`` loads only when someone could listen, and no record is lost.

Each case runs in a fresh interpreter: pytest itself has loaded ``logging`` here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Tuple

from stores import file_url

USE_LOCKS = """
import sys
from brokerlock import BrokerLock
for url in ({sqlite!r}, {file!r}, "memory://"):
    with BrokerLock.from_url(url).item("job", ttl=5):
        pass
"""


def run(code: str) -> Tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def urls(tmp_path: Path) -> dict[str, str]:
    return {"sqlite": f"sqlite:///{tmp_path}/locks.sqlite3", "file": file_url(tmp_path / "locks")}


def test_import_and_locks_do_not_load_logging(tmp_path: Path) -> None:
    out, _ = run(USE_LOCKS.format(**urls(tmp_path)) + "print('logging' in sys.modules)")
    assert out.strip() == "False"


def test_uncontended_locks_load_neither_the_bells_nor_ctypes(tmp_path: Path) -> None:
    """A lock nobody waits for never rings: a cron job does not pay for the bells'
    module and inotify's ctypes (~4 ms of start-up), and a process that can no longer
    import (another user's, a removed checkout) releases all the same. (On Windows the
    file locks themselves are ctypes calls: LockFileEx.)"""
    out, _ = run(
        USE_LOCKS.format(**urls(tmp_path))
        + "print('brokerlock.adapters.embedded.bells' in sys.modules, 'ctypes' in sys.modules)"
    )
    assert out.strip() == ("False True" if sys.platform == "win32" else "False False")


def test_records_reach_a_handler_set_up_after_import(tmp_path: Path) -> None:
    code = (
        "import brokerlock, logging\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(name)s %(filename)s %(message)s')\n"
        + USE_LOCKS.format(**urls(tmp_path))
    )
    _, err = run(code)
    acquired = [line for line in err.splitlines() if "acquired 'job'" in line]
    assert len(acquired) == 3, err
    # The record names the library's caller of the log, not the lazy shim.
    # (The acquire steps live in owning.py, under lock.py's façade.)
    assert all(line.startswith("brokerlock owning.py ") for line in acquired), acquired


def test_no_warning_reaches_stderr_without_a_handler(tmp_path: Path) -> None:
    """logging loaded but not configured: the library's NullHandler must already be in
    place when its first record (a warning) is emitted, or Python's last-resort
    handler would print it."""
    code = f"""
import logging, sys, time
from brokerlock import BrokerLock, LockLost
item = BrokerLock.from_url({urls(tmp_path)["sqlite"]!r}).item("job", ttl=0.05)
item.acquire()
time.sleep(0.2)
try:
    item.release()
except LockLost:
    print("lost")
print(any(type(h) is logging.NullHandler for h in logging.getLogger("brokerlock").handlers))
"""
    out, err = run(code)
    assert out.split() == ["lost", "True"]
    assert err == ""


def test_the_command_shows_warnings_without_loading_logging(tmp_path: Path) -> None:
    """The ``brokerlock`` command shows the library's warnings on stderr, one line
    each, through ``_log``'s sink: no ``logging`` load on every cron job's start."""
    from brokerlock import FileAdapter
    from brokerlock.adapters.file.adapter import file_name

    store = tmp_path / "locks"
    FileAdapter(str(store)).close()
    (store / file_name("job")).write_bytes(b"not a record")
    code = (
        "import sys\n"
        "from brokerlock.cli.main import main\n"
        f"code = main(['status', 'job', '--url', {file_url(store)!r}])\n"
        "print(code, 'logging' in sys.modules)\n"
    )
    out, err = run(code)
    assert out.split()[-2:] == ["0", "False"], (out, err)  # free, and logging never loaded
    assert err.splitlines() == [
        f"brokerlock: lock file {store / file_name('job')} is damaged; treating its lock as free"
    ], err
