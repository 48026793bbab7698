"""Every back end the contract suite runs on, as factories of fresh, private stores.

A new back end is one entry in ``STORES``. Server back ends use the real servers that
``tests/servers.py`` starts; without them they skip on a developer machine and fail in
CI (``CI`` set), so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from brokerlock import Adapter, FileAdapter, MemoryAdapter, SQLiteAdapter
from brokerlock._platform import HAVE_FILE_LOCKS, HAVE_WITNESS

StoreFactory = Callable[[], Adapter]

#: Set by CI where the servers are not installed (macOS, Windows): the server fixtures
#: (tests/servers.py) skip there; on Linux CI they run and must not skip.
SKIP_SERVERS = os.environ.get("BROKERLOCK_SKIP_SERVERS", "") not in ("", "0")

#: For tests of what the kernel-lock witness promises (a dead holder's lock free at
#: once): BROKERLOCK_PORTABLE=1 turns it off (the lease decides), as does a platform
#: without kernel file locks.
needs_witness = pytest.mark.skipif(
    not HAVE_WITNESS, reason="no liveness witness here (BROKERLOCK_PORTABLE=1 or no kernel file locks)"
)
#: For tests of FileAdapter itself: without flock() or LockFileEx() it refuses to start.
needs_flock = pytest.mark.skipif(
    not HAVE_FILE_LOCKS, reason="no flock() or LockFileEx() here: FileAdapter cannot work"
)
#: For tests of what fork() does to kept descriptors and locks: Windows has no fork().
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
#: Python 3.12+ warns of any fork() in a process with threads, and pytest's process has
#: the library's by then (a renewer, a watcher). For a test whose child exec()s or exits
#: at once, or whose point is a child of a process with those threads. (Forks from
#: single-threaded interpreters, under -W error: tests/test_processes.py.)
forks_with_threads = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)


def need(what: str, how: str) -> None:
    """Skip (developer machine) or fail (CI) when a test's server is missing."""
    message = f"{what} is not available: {how}"
    if os.environ.get("CI") and not SKIP_SERVERS:
        pytest.fail(message + " (CI must run these tests, not skip them)")
    pytest.skip(message)


def memory_store(tmp_path: str) -> StoreFactory:
    store = MemoryAdapter()
    # One store shared by every adapter the test makes, as the others share a file.
    return lambda: store


def sqlite_store(tmp_path: str) -> StoreFactory:
    return lambda: SQLiteAdapter(os.path.join(tmp_path, "locks.sqlite3"))


def file_store(tmp_path: str) -> StoreFactory:
    return lambda: FileAdapter(os.path.join(tmp_path, "locks"))


def redis_store(tmp_path: str, server: Any) -> StoreFactory:
    from brokerlock import RedisAdapter

    # A fresh store is a fresh key prefix on the session's server.
    url = f"{server.url}?prefix=test-{uuid.uuid4().hex[:12]}%3A"
    return lambda: RedisAdapter(url)


def postgres_store(tmp_path: str, server: Any) -> StoreFactory:
    from brokerlock import PostgresAdapter

    # A fresh store is a fresh table in the session's cluster.
    dsn = f"{server.dsn}?table=t_{uuid.uuid4().hex[:12]}"
    return lambda: PostgresAdapter(dsn)


#: The session fixtures (tests/servers.py) a store factory takes after ``tmp_path``.
redis_store.needs = ("redis_server",)  # type: ignore[attr-defined]
postgres_store.needs = ("postgres_server",)  # type: ignore[attr-defined]

STORES: Dict[str, Callable[..., StoreFactory]] = {
    "memory": memory_store,
    "sqlite": sqlite_store,
    "file": file_store,
    "redis": redis_store,
    "postgres": postgres_store,
}

#: Back ends whose stores another process can reach (for multi-process tests).
SHARED = ["sqlite", "file", "redis", "postgres"]

if not HAVE_FILE_LOCKS:  # FileAdapter refuses to start (tests/test_portable.py)
    del STORES["file"]
    SHARED.remove("file")


def file_url(path: Path) -> str:
    """The file:// URL of a directory: ``file:///dir``, on Windows ``file:///C:/dir``."""
    return "file:///" + Path(path).as_posix().lstrip("/")


def url_of(adapter: Adapter) -> str:
    return adapter.url
