"""The paths macOS and Windows take, proved on Linux (issue 8).

This machine cannot run Windows or macOS, so each test runs a fresh interpreter with the
platform's gaps made real: ``BROKERLOCK_PORTABLE=1`` (no inotify, no kernel-lock
witness: what macOS and Windows lack), ``fcntl`` hidden, ``select.poll`` and the POSIX
``os`` functions removed, and finally ``sys.platform`` itself set to ``win32`` so that
brokerlock's own Windows branches run. Platform flags are decided at import, hence a
fresh interpreter each time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
from stores import file_url

from brokerlock._platform import HAVE_FCNTL, HAVE_FILE_LOCKS, PORTABLE

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> Any:
    """Run ``code`` in a fresh interpreter; it must print one JSON line last."""
    # (the switches of a tox env stay out: each probe here says which paths it takes)
    switches = ("BROKERLOCK_PORTABLE", "BROKERLOCK_WAKEUP")
    full_env = {k: v for k, v in os.environ.items() if k not in switches}
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- (1) the whole contract on the fallback path --------------------------------------
@pytest.mark.skipif(PORTABLE, reason="this session already runs the contract suite portably")
def test_contract_suite_passes_on_the_portable_path() -> None:
    """Every contract test passes with the OS fast paths off, in the very process that
    asserts they are off. The server back ends are left out (BROKERLOCK_SKIP_SERVERS):
    they have no OS-specific path, and this is about the embedded stores."""
    code = """
        import sys
        import pytest
        from brokerlock import _platform
        assert _platform.PORTABLE and not _platform.HAVE_WITNESS and not _platform.HAVE_INOTIFY
        sys.exit(pytest.main(["tests/contract", "-q", "-p", "no:cacheprovider"]))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(BROKERLOCK_PORTABLE="1", BROKERLOCK_SKIP_SERVERS="1")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=240,
    )
    took = time.monotonic() - started
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"contract suite failed portably:\n{done.stdout[-4000:]}\n{done.stderr}"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    assert counts.get("passed", 0) >= 50, summary
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors"), summary
    assert took < 180, f"the portable contract run took {took:.0f}s"


# -- (2) importing where the platform lacks modules -------------------------------------
# Runs in the child first: import brokerlock normally so that every standard module it
# uses is loaded (as it would be on the real platform), then forget brokerlock, take
# away what the simulated platform lacks, and import it again.
_PREPARE = """
    import importlib, json, os, select, sys, threading, time
    import brokerlock, brokerlock.urls, brokerlock.adapters.file, brokerlock.adapters.sqlite
    import brokerlock.durations, humanfriendly  # noqa: F401  (load, then keep)
    for name in [m for m in sys.modules if m == "brokerlock" or m.startswith("brokerlock.")]:
        del sys.modules[name]
    variant = sys.argv[1]
    sys.modules["fcntl"] = None  # every variant: "import fcntl" raises ImportError
    if variant in ("win32", "no-poll"):
        del select.poll
    if variant == "win32":
        for attr in ("geteuid", "getuid", "O_NOFOLLOW", "O_CLOEXEC", "pread", "pwrite",
                     "register_at_fork", "fork"):
            if hasattr(os, attr):
                delattr(os, attr)
        sys.platform = "win32"
"""

_CHECK = """
    from brokerlock import BrokerLock, BrokerLockError, FileAdapter, SQLiteAdapter
    from brokerlock import _platform, urls
    from brokerlock.adapters.embedded import locking as _files, wakeup as _wakeup, witness as _witness

    directory = sys.argv[2]
    out = {"flags": [_platform.HAVE_FCNTL, _platform.HAVE_INOTIFY, _platform.HAVE_WITNESS]}
    for name, module in list(sys.modules.items()):
        if name.startswith("brokerlock") and module is not None:
            assert not hasattr(module, "fcntl"), name + " got hold of fcntl"
    assert sys.modules["fcntl"] is None

    # SQLite works: a round trip between two clients of one database ...
    db = os.path.join(directory, "db", "locks.sqlite3")
    first, second = BrokerLock(SQLiteAdapter(db)), BrokerLock(SQLiteAdapter(db))
    item = first.item("job", ttl="10s", timeout=0).acquire()
    first_fence = item.fence
    assert isinstance(first_fence, int) and second.item("job").is_reserved()
    assert second.item("job", timeout=0).try_acquire() is None
    item.release()
    again = second.item("job", timeout=0).acquire()
    second_fence = again.fence
    assert second_fence > first_fence
    # ... and a waiter parked in the platform's waiter gets the lock when it is released.
    got = []

    def wait():  # a hold belongs to its thread: take and give back the lock in one
        waiter = first.item("job", ttl="10s", timeout="10s").acquire()
        got.append((time.monotonic(), waiter.fence))
        waiter.release()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    released = time.monotonic()
    again.release()
    thread.join(10)
    assert got and got[0][1] > second_fence, got
    out["handoff"] = got[0][0] - released
    out["witness"] = _witness.witness_for(db + "-witness").mine()
    bells = first.adapter._bells  # type: ignore[attr-defined]
    out["waiter"] = type(bells.waiter(bells.make())).__name__

    # The file store says clearly that it cannot work here, and what to use instead.
    for make in (lambda: FileAdapter(os.path.join(directory, "files")),
                 lambda: BrokerLock.from_url("file://" + os.path.join(directory, "files"))):
        try:
            make()
        except BrokerLockError as exc:
            out.setdefault("file_errors", []).append(str(exc))
        else:
            out.setdefault("file_errors", []).append(None)
"""


#: The next two pretend to be another platform by hiding modules on this one; on
#: Windows itself the whole suite runs the Windows branches for real (.ci/windows.sh).
_PRETENDS = pytest.mark.skipif(
    sys.platform == "win32", reason="pretends to lack POSIX modules; this is Windows itself"
)


@_PRETENDS
@pytest.mark.parametrize("variant", ["no-fcntl", "no-poll", "win32"])
def test_import_without_the_platform_modules(variant: str, tmp_path: Path) -> None:
    """``no-fcntl``: a POSIX without fcntl; ``no-poll``: inotify but no poll() (select()
    takes over); ``win32``: fcntl, poll and POSIX ``os`` functions gone and
    ``sys.platform == "win32"``, so the Windows branches of brokerlock run."""
    code = _PREPARE + _CHECK + "\n    print(json.dumps(out))\n"
    code = "import sys; sys.argv[1:] = " + repr([variant, str(tmp_path)]) + "\n" + textwrap.dedent(code)
    out = run_python(code)
    have_fcntl, have_inotify, have_witness = out["flags"]
    assert not have_fcntl and not have_witness
    assert out["witness"] is None, "no fcntl: no witness, the lease decides"
    platform = "win32" if variant == "win32" else sys.platform
    for message in out["file_errors"]:
        assert message is not None, "FileAdapter must refuse to start without flock()"
        assert platform in message and "SQLiteAdapter" in message, message
    if variant == "win32":
        assert not have_inotify and out["waiter"] == "BackoffWaiter"
    elif sys.platform.startswith("linux"):
        assert have_inotify and out["waiter"].endswith("InotifyWaiter")
        assert out["handoff"] < 0.5, "inotify (through select() in no-poll) wakes the waiter"
    assert out["handoff"] < 2.0


@_PRETENDS
def test_windows_branches_of_the_helpers(tmp_path: Path) -> None:
    """Under ``sys.platform == "win32"`` the helpers take their Windows branches: the
    state directory is under LOCALAPPDATA, flock refuses with the platform's name,
    positioned I/O works without pread/pwrite, and select() stands in for poll()."""
    code = _PREPARE + """
    from brokerlock import BrokerLockError, urls
    from brokerlock.adapters.embedded import locking as _files, wakeup as _wakeup
    out = {}
    os.environ["LOCALAPPDATA"] = sys.argv[2]
    out["state"] = urls.state_dir()
    out["url"] = urls.default_url()
    fd = os.open(os.path.join(sys.argv[2], "f"), os.O_RDWR | os.O_CREAT)
    _files.write_at(fd, b"hello world", 0)
    _files.write_at(fd, b"W", 6)
    out["read"] = _files.read_at(fd, 11, 0).decode()
    try:
        _files.lock_file(fd)
    except BrokerLockError as exc:
        out["flock"] = str(exc)
    r, w = os.pipe()
    poll = _wakeup._poller(r)
    out["idle"] = list(poll(10))
    os.write(w, b"x")
    out["ready"] = len(poll(1000))
    print(json.dumps(out))
    """
    code = "import sys; sys.argv[1:] = " + repr(["win32", str(tmp_path)]) + "\n" + textwrap.dedent(code)
    out = run_python(code, env={"BROKERLOCK_URL": ""})
    assert out["state"] == os.path.join(str(tmp_path), "brokerlock")
    assert out["url"] == "sqlite:///" + os.path.join(str(tmp_path), "brokerlock", "locks.sqlite3")
    assert out["read"] == "hello World"
    assert "win32" in out["flock"] and "SQLiteAdapter" in out["flock"]
    assert out["idle"] == [] and out["ready"] == 1


# -- (3) PORTABLE really switches the fast paths off ------------------------------------
_PROBE = """
    import json, os, sys
    from brokerlock import FileAdapter, SQLiteAdapter, _platform
    from brokerlock.adapters.embedded import witness as _witness
    directory = sys.argv[1]
    adapters = [SQLiteAdapter(os.path.join(directory, "locks.sqlite3"))]
    if _platform.HAVE_FILE_LOCKS:
        adapters.append(FileAdapter(os.path.join(directory, "files")))
    for adapter in adapters:
        adapter._witness.mine()  # the file a waiter watches besides its bell
    waiters = [adapter._bells.waiter(adapter._bells.make()) for adapter in adapters]
    print(json.dumps({
        "flags": [_platform.PORTABLE, _platform.HAVE_INOTIFY, _platform.HAVE_WITNESS],
        "waiters": [type(w).__name__ for w in waiters],
        "mark": _witness.witness_for(os.path.join(directory, "w")).mine(),
    }))
"""


@pytest.mark.parametrize("portable", [True, False])
def test_portable_switch_takes_the_fallback(portable: bool, tmp_path: Path) -> None:
    code = "import sys; sys.argv[1:] = [" + repr(str(tmp_path)) + "]\n" + textwrap.dedent(_PROBE)
    out = run_python(code, env={"BROKERLOCK_PORTABLE": "1"} if portable else {})
    flag, have_inotify, have_witness = out["flags"]
    if portable:
        assert flag and not have_inotify and not have_witness
        # Every embedded adapter's waiters poll.
        assert set(out["waiters"]) == {"BackoffWaiter"}
        assert out["mark"] is None
        return
    # The control: without the switch this Linux machine takes the fast paths, so the
    # assertions above are not true by accident.
    assert not flag
    if not sys.platform.startswith("linux") or not HAVE_FCNTL:
        pytest.skip("the fast paths exist on Linux only")
    assert have_inotify and have_witness and all(w.endswith("InotifyWaiter") for w in out["waiters"])
    assert re.fullmatch(r"\d+:\d+:\d+", out["mark"])


# -- what each platform promises about a dead holder ------------------------------------
_DEAD_HOLDER = """
    import json, subprocess, sys, time
    from brokerlock import BrokerLock
    url = sys.argv[1]
    # The holder takes the lock for 1.5 s and exits without releasing (as a killed one).
    holder = ("import os, sys; from brokerlock import BrokerLock; "
              "BrokerLock.from_url(sys.argv[1]).item('job', ttl='1500ms').acquire(); os._exit(0)")
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", holder, url], check=True)
    item = BrokerLock.from_url(url).item("job", ttl="10s", timeout="10s")
    free_at_once = item.try_acquire() is not None
    if not free_at_once:
        item.acquire()
    print(json.dumps({"free_at_once": free_at_once, "after": time.monotonic() - started}))
"""


@pytest.mark.parametrize("store", ["sqlite", "file"])
@pytest.mark.parametrize("portable", [True, False])
def test_dead_holder_is_freed_by_witness_or_by_lease(store: str, portable: bool, tmp_path: Path) -> None:
    """With the witness (Linux, macOS, Windows) a dead holder's lock is free at once; without it
    (Windows, PORTABLE) it is free when its lease runs out, never before."""
    if store == "file" and not HAVE_FILE_LOCKS:
        pytest.skip("no flock() or LockFileEx() on this platform")
    if not portable and not HAVE_FILE_LOCKS:
        pytest.skip("no witness on this platform")
    url = f"sqlite:///{tmp_path}/locks.sqlite3" if store == "sqlite" else file_url(tmp_path / "locks")
    code = "import sys; sys.argv[1:] = [" + repr(url) + "]\n" + textwrap.dedent(_DEAD_HOLDER)
    out = run_python(code, env={"BROKERLOCK_PORTABLE": "1"} if portable else {})
    if portable:
        assert not out["free_at_once"], "without a witness only the lease may free the lock"
        assert out["after"] >= 1.5
    else:
        assert out["free_at_once"], "the witness frees a dead holder's lock at once"


# -- the default store, wherever the user's state directory is ------------------------
_NO_QUESTION_MARK = pytest.mark.skipif(
    sys.platform == "win32", reason="'?' is not allowed in a Windows file name"
)


@pytest.mark.parametrize(
    "odd",
    [
        "Application Support", "we#ird", pytest.param("what?", marks=_NO_QUESTION_MARK),
        "100%41", "back\\slash",
    ],
)
def test_default_store_url_reads_back_as_its_path(
    odd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS puts state under "Application Support"; a home directory may hold any of
    the characters a URL reads specially. The default URL must name the same file."""
    from brokerlock import SQLiteAdapter, urls

    state = tmp_path / odd / "brokerlock"
    monkeypatch.delenv("BROKERLOCK_URL", raising=False)
    monkeypatch.setattr(urls, "state_dir", lambda: str(state))
    adapter = urls.adapter_from_url(urls.default_url())
    try:
        assert isinstance(adapter, SQLiteAdapter)
        assert adapter.path == os.path.join(os.path.realpath(state), "locks.sqlite3")
    finally:
        adapter.close()
