"""Bad input gets a clear exception that names the bad value."""

from __future__ import annotations

import math
import os
import stat
import sys
from datetime import timedelta
from pathlib import Path
from typing import List

import pytest
from stores import file_url, needs_flock

from brokerlock import (
    BrokerLock,
    BrokerLockError,
    FileAdapter,
    MemoryAdapter,
    SQLiteAdapter,
    default_url,
)
from brokerlock._platform import HAVE_WITNESS, WAKEUP
from brokerlock.adapters.embedded.clock import BOOT_ID
from brokerlock.adapters.file.adapter import file_name
from brokerlock.durations import parse_duration

#: File modes, symlinks and directory ownership as tested here are POSIX notions.
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions and symlinks")


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5), ("60s", 60), ("2 minutes", 120), ("24hours", 86400), ("1.5h", 5400),
        ("2m", 120), ("10", 10), (" 3 s ", 3), ("1 day", 86400), (2.5, 2.5), (7, 7.0),
        (timedelta(minutes=1, seconds=30), 90), ("1 week", 604800), (0, 0.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)  # type: ignore[arg-type]


def test_humanfriendly_handles_the_rest() -> None:
    assert parse_duration("1 year") == 31449600  # a unit our fast path does not know


@pytest.mark.parametrize(
    "bad", ["", "   ", "-1s", "abc", "5 parsecs", math.nan, math.inf, -1, -0.5, "inf", "nan", 10**20,
            timedelta(seconds=-1)],
)
def test_bad_durations_raise_value_error_naming_them(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(bad, "ttl")  # type: ignore[arg-type]
    assert "ttl" in str(info.value)
    if isinstance(bad, str) and bad.strip():
        assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [True, [1], object(), b"1s"])
def test_non_durations_raise_type_error(bad: object) -> None:
    with pytest.raises(TypeError):
        parse_duration(bad)  # type: ignore[arg-type]


def test_item_validates_ttl_and_timeout() -> None:
    lock = BrokerLock(MemoryAdapter())
    with pytest.raises(ValueError, match="'soon'"):
        lock.item("x", ttl="soon")
    with pytest.raises(ValueError, match="longer than 0"):
        lock.item("x", ttl=0)
    with pytest.raises(ValueError, match="negative"):
        lock.item("x", timeout=-3)
    item = lock.item("x", ttl="1.5h", timeout=None)
    assert item.ttl == 5400.0 and item.timeout is None
    defaults = lock.item("y")
    assert (defaults.ttl, defaults.timeout) == (120.0, 30.0)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a"]])
def test_non_str_names_raise_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="lock name must be a str"):
        BrokerLock(MemoryAdapter()).item(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "\ud800", "a\x00b", "x" * 5000])
def test_bad_names_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        BrokerLock(MemoryAdapter()).item(bad)


@needs_flock
@posix_only
def test_lock_files_stay_in_their_directory(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    lock = BrokerLock(FileAdapter(directory))
    used: List[str] = []
    for name in ["../escape", "/etc/passwd", "..", "a/b", "a_b", "C:\\x", "~root"]:
        used.append(file_name(name))
        with lock.item(name).hold():
            # (The records of the names freed before are kept a while: embedded.deferred.)
            held = sorted(p.name for p in directory.iterdir() if p.name.endswith(".lock"))
            assert held == sorted(used) and all(len(h) == 45 for h in held)
    lock.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locks"]
    files = sorted(p.name for p in directory.iterdir())
    assert ("witness" in files) == HAVE_WITNESS
    assert ("clock" in files) == bool(BOOT_ID)  # the store's clock (embedded.clock)
    # A released name leaves no record once the store is closed (docs/frugality.rst),
    # only the store's fence floor. (On the FIFO path a holder's liveness FIFO lies in
    # the store's bells directory.)
    assert set(files) - {"witness", "clock"} == ({"fence", "bells"} if WAKEUP == "fifo" else {"fence"})
    assert file_name("a/b") != file_name("a_b")


@posix_only
def test_store_files_are_private(tmp_path: Path) -> None:
    FileAdapter(tmp_path / "new" / "locks")
    SQLiteAdapter(tmp_path / "db" / "locks.sqlite3")
    for directory in [tmp_path / "new" / "locks", tmp_path / "db"]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "db" / "locks.sqlite3").stat().st_mode) == 0o600


def test_not_a_database_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not the bytes of an SQLite database\n" * 100)
    with pytest.raises(BrokerLockError) as info:
        SQLiteAdapter(path)
    assert str(path) in str(info.value) and "not a database" in str(info.value)


@posix_only
def test_symlinked_database_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    (tmp_path / "locks.db").symlink_to(target)
    with pytest.raises(BrokerLockError, match="symbolic link"):
        SQLiteAdapter(tmp_path / "locks.db")
    assert not target.exists()


@needs_flock
@posix_only
def test_symlink_at_a_lock_file_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    lock = BrokerLock(FileAdapter(directory))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (directory / file_name("planted")).symlink_to(victim)
    with pytest.raises(BrokerLockError, match="symbolic link"):
        lock.item("planted").acquire()
    assert victim.read_text() == "precious"


@needs_flock
@posix_only
def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(BrokerLockError, match="world-writable"):
        FileAdapter(directory)
    directory.chmod(0o1777)  # the sticky bit, as /tmp has, makes it acceptable
    FileAdapter(directory)


def test_memory_path_for_sqlite_is_refused() -> None:
    with pytest.raises(ValueError, match="MemoryAdapter"):
        SQLiteAdapter(":memory:")


@pytest.mark.parametrize(
    "url, match",
    [
        ("ftp://x", "unknown store URL 'ftp://x'"),
        ("sqlite://host/x.db", "host"),
        ("file://relative", "host"),
        ("sqlite:///", "no database"),
        ("nonsense", "unknown store URL"),
        ("sqlite:///a%00b.db", "NUL character"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BrokerLock.from_url(url)


@posix_only
def test_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = BrokerLock.from_url("sqlite:///rel.db").adapter
    assert isinstance(relative, SQLiteAdapter) and relative.path == str(tmp_path / "rel.db")
    absolute = BrokerLock.from_url(f"sqlite:///{tmp_path}/abs.db").adapter
    assert isinstance(absolute, SQLiteAdapter) and absolute.path == str(tmp_path / "abs.db")
    files = BrokerLock.from_url(file_url(tmp_path / "dir")).adapter
    assert isinstance(files, FileAdapter) and files.directory == str(tmp_path / "dir")
    first, second = BrokerLock.from_url("memory://"), BrokerLock.from_url("memory://")
    first.item("m").acquire()
    assert not second.item("m").is_reserved(), "each memory:// is a private store"


@posix_only
def test_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKERLOCK_URL", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_url() == f"sqlite:///{tmp_path}/state/brokerlock/locks.sqlite3"
    lock = BrokerLock()
    assert isinstance(lock.adapter, SQLiteAdapter)
    assert stat.S_IMODE((tmp_path / "state" / "brokerlock").stat().st_mode) == 0o700
    monkeypatch.setenv("BROKERLOCK_URL", "memory://")
    assert isinstance(BrokerLock().adapter, MemoryAdapter)
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.delenv("BROKERLOCK_URL")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path}/home/.local/state/brokerlock/locks.sqlite3"


def test_adapter_type_is_checked() -> None:
    with pytest.raises(TypeError, match="needs an adapter"):
        BrokerLock("sqlite:///x.db")  # type: ignore[arg-type]


@posix_only
def test_umask_does_not_matter(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        FileAdapter(tmp_path / "u")
        with BrokerLock(FileAdapter(tmp_path / "u")).item("n").hold():
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "u").stat().st_mode) == 0o700
    for child in (tmp_path / "u").rglob("*"):
        # (On the FIFO path the bells directory holds the holder's liveness FIFO.)
        assert stat.S_IMODE(child.stat().st_mode) == (0o700 if child.is_dir() else 0o600), child
