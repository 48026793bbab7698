"""One store shared by several Unix users through a setgid group directory.

Real processes under real (numeric) users: the test runs ``brokerlock run`` as two
uids of one group, in each order, contended and not, on SQLite and lock-file stores.
No user is created anywhere: a process can become any uid (``tests/as_user.py``), and
every file the test makes lives in its own temporary base.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Dict, Iterator, List, Optional, cast

import pytest

AS_USER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "as_user.py")
GROUP = 40000
USERS = (40001, 40002)

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="Unix users and groups"),
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="running processes as other users needs root",
    ),
]


class Sandbox:
    """A temporary base (0755, so that the test's uids can reach into it) holding the
    shared directory (root:GROUP, 2770) and a home directory per user."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.shared = base / "locks"
        self.shared.mkdir()
        os.chown(self.shared, 0, GROUP)
        os.chmod(self.shared, 0o2770)
        self.homes: Dict[int, Path] = {}
        for uid in USERS:
            home = base / f"home-{uid}"
            home.mkdir(mode=0o700)
            os.chown(home, uid, GROUP)
            self.homes[uid] = home

    def env(self, uid: int) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKERLOCK_", "XDG_"))}
        env.update(HOME=str(self.homes[uid]), USER=f"u{uid}", LOGNAME=f"u{uid}")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def start(self, uid: int, *args: str, stdin: Optional[int] = None) -> subprocess.Popen[str]:
        # (Not Popen(user=...): the interpreter may live where the uid cannot read; the
        # launcher imports what it needs first, then becomes the uid for good.)
        return subprocess.Popen(
            [sys.executable, AS_USER, str(uid), str(GROUP), "--", *args], env=self.env(uid),
            cwd=str(self.homes[uid]), stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, umask=0o022,
        )

    def run(self, uid: int, *args: str) -> subprocess.CompletedProcess[str]:
        process = self.start(uid, *args)
        out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    base = Path(tempfile.mkdtemp(prefix="brokerlock-shared-"))
    try:
        os.chmod(base, 0o755)
        yield Sandbox(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _url(sandbox: Sandbox, store: str) -> str:
    if store == "sqlite":
        return "sqlite:///" + str(sandbox.shared / "locks.sqlite3")
    return "file://" + str(sandbox.shared / "files")


class Holder:
    """``brokerlock run`` as ``uid``, its job holding the lock until told to finish."""

    def __init__(self, sandbox: Sandbox, uid: int, url: str, name: str) -> None:
        self.process = sandbox.start(
            uid, "run", "--url", url, "--timeout", "30s", name, "--",
            "sh", "-c", "echo held; head -c1 >/dev/null; echo done",
            stdin=subprocess.PIPE,
        )
        stdout = cast(IO[str], self.process.stdout)
        line = stdout.readline()
        assert line == "held\n", (line, self.process.stderr and self.process.stderr.read())

    def finish(self) -> subprocess.CompletedProcess[str]:
        out, err = self.process.communicate("x", timeout=60)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, out, err)


def _owner(path: Path) -> int:
    try:
        return path.lstat().st_uid
    except FileNotFoundError:
        return -1  # (a file made and linked into place under another name meanwhile)


def _wait_for_bell(sandbox: Sandbox, store: str, uid: int) -> None:
    """Until a waiter of ``uid`` has rung in: its bell file exists (a condition, not a
    guess at how long a start-up takes)."""
    bells = sandbox.shared / ("locks.sqlite3-bells" if store == "sqlite" else "files/bells")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if bells.is_dir() and any(_owner(p) == uid for p in bells.iterdir()):
            return
        time.sleep(0.01)
    raise AssertionError(f"no waiter of uid {uid} showed up in {bells}")


def _contend(sandbox: Sandbox, store: str, holder_uid: int, waiter_uid: int, name: str) -> None:
    """``holder_uid`` holds ``name``; ``waiter_uid`` is refused at once without waiting,
    then waits and gets the lock only after the holder finished."""
    url = _url(sandbox, store)
    marker = sandbox.homes[waiter_uid] / f"ran-{name}"
    marker.unlink(missing_ok=True)
    holder = Holder(sandbox, holder_uid, url, name)
    busy = sandbox.run(waiter_uid, "run", "--url", url, "--timeout", "0", name, "--", "true")
    assert busy.returncode not in (0, 2), busy
    assert "busy" in busy.stderr or "held" in busy.stderr, busy.stderr
    waiter = sandbox.start(
        waiter_uid, "run", "--url", url, "--timeout", "30s", name, "--",
        "sh", "-c", f"echo ran > {marker}",
    )
    if sys.platform == "linux":
        _wait_for_bell(sandbox, store, waiter_uid)
    assert not marker.exists(), "the waiter ran beside the holder"
    assert _check_modes(sandbox) == []  # (with SQLite's -wal and -shm, which exist now)
    finished = holder.finish()
    assert finished.returncode == 0 and finished.stdout == "done\n", finished
    _out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, (waiter.returncode, err)
    assert marker.read_text() == "ran\n"


def _check_modes(sandbox: Sandbox) -> List[str]:
    """Everything made in the shared directory: its group, group read/write; and
    directories setgid and group-searchable."""
    bad = []
    for path in sandbox.shared.rglob("*"):
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue  # (removed meanwhile: a bell, a temporary name)
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # private until linked into place with its final mode
        mode = stat.S_IMODE(info.st_mode)
        if info.st_gid != GROUP:
            bad.append(f"{path}: gid {info.st_gid}")
        if stat.S_ISDIR(info.st_mode):
            if mode != 0o2770:
                bad.append(f"{path}: mode {mode:04o}")
        elif mode != 0o660:
            bad.append(f"{path}: mode {mode:04o}")
    return bad


@pytest.mark.parametrize("store", ["sqlite", "file"])
@pytest.mark.parametrize("first", USERS)
@pytest.mark.parametrize("contended_first", [False, True], ids=["calm-first", "contended-first"])
def test_two_users_share_a_group_directory(
    sandbox: Sandbox, store: str, first: int, contended_first: bool
) -> None:
    second = USERS[1] if first == USERS[0] else USERS[0]
    url = _url(sandbox, store)
    if contended_first:
        # The very first use of the store is a contended one: the holder makes the
        # database or records and the witness, the waiter the bells.
        _contend(sandbox, store, first, second, "job")
        _contend(sandbox, store, second, first, "job")
    for uid in (first, second):
        done = sandbox.run(uid, "run", "--url", url, "--timeout", "0", "job", "--", "true")
        assert done.returncode == 0, done
        other = sandbox.run(uid, "run", "--url", url, "--timeout", "0", f"only-{uid}", "--", "true")
        assert other.returncode == 0, other
    if not contended_first:
        _contend(sandbox, store, first, second, "job")
        _contend(sandbox, store, second, first, "job")
    for uid in (first, second):
        listed = sandbox.run(uid, "list", "--url", url)
        assert listed.returncode == 0, listed
    assert _check_modes(sandbox) == []
    made = {p.name for p in sandbox.shared.rglob("*")}
    assert not [name for name in made if name.endswith(".tmp")], made
    if store == "sqlite":
        assert {"locks.sqlite3", "locks.sqlite3-witness", "locks.sqlite3-bells"} <= made
    else:
        assert {"files", "witness", "bells"} <= made


def test_a_file_the_group_cannot_use_is_named_with_owner_mode_and_remedy(sandbox: Sandbox) -> None:
    """A witness left 0600 by one user (say, by an older version) stops the other user
    with one line: which file, whose, which mode, and what to do."""
    witness = sandbox.shared / "locks.sqlite3-witness"
    witness.touch(mode=0o600)
    os.chown(witness, USERS[0], GROUP)
    os.chmod(witness, 0o600)
    url = _url(sandbox, "sqlite")
    done = sandbox.run(USERS[1], "run", "--url", url, "--timeout", "0", "job", "--", "true")
    assert done.returncode == 2, done
    line = done.stderr.strip()
    assert "\n" not in line, line
    assert str(witness) in line and f"uid {USERS[0]}" in line and "0600" in line, line
    assert "chmod g+rw" in line, line


def test_a_user_outside_the_group_is_told_to_join_it(sandbox: Sandbox) -> None:
    outsider = 40003
    home = sandbox.base / f"home-{outsider}"
    home.mkdir()
    os.chown(home, outsider, outsider)
    process = subprocess.run(
        [sys.executable, AS_USER, str(outsider), str(outsider), "--", "run", "--url",
         _url(sandbox, "file"), "job", "--", "true"],
        env={**sandbox.env(USERS[0]), "HOME": str(home)}, cwd=str(home),
        capture_output=True, text=True, timeout=60,
    )
    assert process.returncode == 2, process
    line = process.stderr.strip()
    assert "\n" not in line and "permission denied" in line, line
    assert f"in the group of {sandbox.shared}" in line, line


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_both_users_starting_at_once_on_a_new_store(sandbox: Sandbox, store: str) -> None:
    """Several jobs of each user start together on a store that does not exist yet:
    none fails on the other's files, and no two are ever inside at once (each job
    makes a directory that must not exist, as its proof of being alone)."""
    arena = sandbox.base / "arena"
    arena.mkdir()
    os.chmod(arena, 0o777)  # (the jobs' own scratch space, not the store)
    inside, count = arena / "inside", arena / "count"
    count.touch()
    os.chmod(count, 0o666)
    job = f"mkdir {inside} || exit 99; echo x >> {count} || exit 98; rmdir {inside}"
    url = _url(sandbox, store)
    runs = [
        sandbox.start(uid, "run", "--url", url, "--timeout", "60s", "job", "--", "sh", "-c", job)
        for _ in range(3)
        for uid in USERS
    ]
    results = [(run.wait(timeout=120), run.communicate()[1]) for run in runs]
    assert all(code == 0 for code, _err in results), results
    assert count.read_text() == "x\n" * len(runs)
    assert _check_modes(sandbox) == []
