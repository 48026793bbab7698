"""Which store the command line uses, and what it says when it cannot use one: URLs
that would lock nothing or depend on the working directory, no home directory, a
read-only or unwritable store. Real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest

from brokerlock import BrokerLock, FileAdapter, SQLiteAdapter

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths, modes and users")

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
AS_USER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "as_user.py")
#: A uid without a passwd entry (nobody's is not needed: none is created).
STRANGER = 40005


def _env(**changes: Optional[str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKERLOCK_", "XDG_"))}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def cli(
    *args: str, env: Dict[str, str], cwd: str, uid: Optional[int] = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "brokerlock", *args]
    if uid is not None:
        command = [sys.executable, AS_USER, str(uid), str(uid), "--", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done
    line = done.stderr.strip()
    assert line and "\n" not in line and "Traceback" not in line, done.stderr
    return line


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["--url", "env"])
def test_memory_store_is_refused_by_the_command_line(via: str, tmp_path: Path) -> None:
    args = ["--url", "memory://"] if via == "--url" else []
    env = _env(BROKERLOCK_URL=None if via == "--url" else "memory://")
    marker = tmp_path / "ran"
    line = one_line(cli("run", *args, "job", "--", "touch", str(marker), env=env, cwd=str(tmp_path)))
    assert "memory://" in line and "lock nothing" in line, line
    assert ("BROKERLOCK_URL" in line) == (via == "env"), line
    assert not marker.exists()


def test_sqlite_url_with_one_slash_is_an_absolute_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    database = tmp_path / "store" / "locks.sqlite3"
    url = f"sqlite:{database}"  # sqlite:/abs/...: one slash
    assert url.startswith("sqlite:/") and not url.startswith("sqlite://")
    done = cli("run", "--url", url, "job", "--", "true", env=_env(), cwd=str(elsewhere))
    assert done.returncode == 0, done
    assert database.is_file()
    assert list(elsewhere.iterdir()) == [], "nothing may be made relative to the working directory"
    adapter = BrokerLock.from_url(url).adapter
    assert isinstance(adapter, SQLiteAdapter) and adapter.path == str(database)
    files = BrokerLock.from_url(f"file:{tmp_path}/files").adapter
    assert isinstance(files, FileAdapter) and files.directory == str(tmp_path / "files")
    # ...and the two-slash forms keep their meaning.
    same = BrokerLock.from_url(f"sqlite:///{database}").adapter
    assert isinstance(same, SQLiteAdapter) and same.path == str(database)


@pytest.mark.parametrize(
    "url, relative",
    [("sqlite:///locks.sqlite3", "locks.sqlite3"), ("sqlite:locks.sqlite3", "locks.sqlite3"),
     ("sqlite:///db/locks.sqlite3", "db/locks.sqlite3"), ("file:locks", "locks")],
)
@pytest.mark.parametrize("via", ["--url", "env"])
def test_relative_store_path_is_refused_by_the_command_line(
    url: str, relative: str, via: str, tmp_path: Path
) -> None:
    args = ["--url", url] if via == "--url" else []
    env = _env(BROKERLOCK_URL=None if via == "--url" else url)
    line = one_line(cli("status", *args, "job", env=env, cwd=str(tmp_path)))
    assert repr(url) in line and f"relative path ({relative})" in line and "absolute" in line, line
    assert list(tmp_path.iterdir()) == []


def test_the_library_keeps_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    adapter = BrokerLock.from_url("sqlite:rel.sqlite3").adapter
    assert isinstance(adapter, SQLiteAdapter) and adapter.path == str(tmp_path / "rel.sqlite3")


# -- no home directory -------------------------------------------------------------------


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A temporary base that other uids can enter (pytest's tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="brokerlock-cli-"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not ROOT, reason="acting as a user without a home directory needs root")
@pytest.mark.parametrize("home", ["unset", "unwritable"])
def test_without_a_home_the_default_store_error_says_how_to_choose_one(home: str, open_base: Path) -> None:
    """As the user ``nobody`` is: HOME=/nonexistent, or no HOME and no passwd entry."""
    env = _env(HOME=None if home == "unset" else str(open_base / "nonexistent"))
    line = one_line(cli("run", "job", "--", "true", env=env, cwd=str(open_base), uid=STRANGER))
    assert "--url" in line and "BROKERLOCK_URL" in line, line
    if home == "unset":
        assert "no home directory" in line, line
    else:
        assert "default lock store" in line and "permission denied" in line, line
    assert list(open_base.iterdir()) == []


# -- read-only and unwritable stores -------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="an unwritable directory needs another uid (root writes anywhere)")
def test_an_unwritable_store_names_the_file_owner_mode_and_remedy(open_base: Path) -> None:
    """The SQLite store of a user whose directory went 0555: not "refusing to open
    witness file", which reads like a policy, but what is wrong and how to mend it."""
    store = open_base / "store"
    store.mkdir(mode=0o755)
    os.chown(store, STRANGER, STRANGER)
    home = str(open_base)
    url = f"sqlite:///{store}/locks.sqlite3"
    made = cli("run", "--url", url, "job", "--", "true", env=_env(HOME=home), cwd=home, uid=STRANGER)
    assert made.returncode == 0, made
    (store / "locks.sqlite3-witness").unlink()
    os.chmod(store, 0o555)
    again = cli("run", "--url", url, "job", "--", "true", env=_env(HOME=home), cwd=home, uid=STRANGER)
    line = one_line(again)
    assert "refusing" not in line and "readonly database" not in line, line
    assert f"{store}" in line and "permission denied" in line, line
    assert f"uid {STRANGER}" in line and "0555" in line and f"chmod u+rwx {store}" in line, line


@pytest.fixture
def read_only_fs() -> Iterator[Path]:
    """A tmpfs, mounted read-write for the test to fill, then remounted read-only."""
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mountpoint = Path(tempfile.mkdtemp(prefix="brokerlock-ro-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        os.rmdir(mountpoint)
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        os.rmdir(mountpoint)


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_a_read_only_file_system_reads_as_an_io_error(store: str, read_only_fs: Path) -> None:
    url = f"sqlite:///{read_only_fs}/locks.sqlite3" if store == "sqlite" else f"file://{read_only_fs}/locks"
    made = cli("run", "--url", url, "job", "--", "true", env=_env(), cwd=str(read_only_fs))
    assert made.returncode == 0, made
    if store == "sqlite":
        (read_only_fs / "locks.sqlite3-witness").unlink()
    else:
        (read_only_fs / "locks" / "witness").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_fs)], check=True)
    line = one_line(cli("run", "--url", url, "job", "--", "true", env=_env(), cwd="/"))
    assert "read-only" in line and "I/O error" in line and "refusing" not in line, line


# -- the PostgreSQL driver -------------------------------------------------------------------

#: What psycopg 3 raises where libpq is missing (its own text, attempts and all).
NO_LIBPQ = (
    "no pq wrapper available.\n"
    "Attempts made:\n"
    "- couldn't import psycopg 'c' implementation: No module named 'psycopg_c'\n"
    "- couldn't import psycopg 'binary' implementation: No module named 'psycopg_binary'\n"
    "- couldn't import psycopg 'python' implementation: libpq library not found"
)


@pytest.mark.parametrize("missing", ["libpq", "psycopg"])
def test_a_missing_driver_or_libpq_is_named(missing: str, tmp_path: Path) -> None:
    """A stub ``psycopg`` first on the path fails as the real one does without libpq,
    or as a missing package does."""
    stub = tmp_path / "stub" / "psycopg"
    stub.mkdir(parents=True)
    if missing == "libpq":
        (stub / "__init__.py").write_text(f"raise ImportError({NO_LIBPQ!r})\n")
    else:
        (stub / "__init__.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'psycopg'\", name='psycopg')\n"
        )
    env = _env(PYTHONPATH=str(tmp_path / "stub"))
    done = cli("status", "--url", "postgresql://127.0.0.1:9/x", "job", env=env, cwd=str(tmp_path))
    line = one_line(done)
    if missing == "libpq":
        assert "libpq" in line and "client library" in line and "libpq library not found" in line, line
        assert "pip install brokerlock[postgres]" not in line, line
    else:
        assert "needs the psycopg package" in line and "brokerlock[postgres]" in line, line
