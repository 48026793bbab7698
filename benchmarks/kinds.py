"""The locks under test: brokerlock's back ends and the peers people use today.

Every kind is built *inside* the worker process (or thread) that uses it, from its
name and a picklable :class:`Env`, so nothing but strings crosses a ``spawn``. Each
one is wrapped to the same three calls, ``acquire()``, ``release()`` and ``close()``,
and used with the library's defaults wherever the library has them: the point is to
measure what a user of the library gets, polling intervals included.
"""

from __future__ import annotations

import fcntl
import os
import random
import secrets
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol

#: Every blocking acquire is bounded, so a broken lock fails a run instead of hanging it.
ACQUIRE_TIMEOUT = 30.0
#: Lease length for the kinds that have one: far longer than any run, so leases never
#: expire during a benchmark and only releases hand the lock over.
TTL = 120.0


class Lock(Protocol):
    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Env:
    """Where the stores of one run live; picklable, so it can be handed to ``spawn``."""

    workdir: str
    redis_url: Optional[str] = None
    pg_dsn: Optional[str] = None
    #: Deepkit's broker: its loopback port, and the node_modules its clients load.
    deepkit_port: Optional[str] = None
    deepkit_modules: Optional[str] = None


@dataclass(frozen=True)
class Kind:
    name: str
    #: The back end it competes with: memory, file, sqlite, redis or postgres.
    family: str
    ours: bool
    make: Callable[[Env, str], Lock]
    #: "process": one process per participant; "thread": participants are threads of
    #: one process (in-process locks cannot be shared between processes).
    mode: str = "process"
    #: Longest random pause of a holder before it releases, in seconds. A polling lock's
    #: handoff latency depends on where in its poll period the release lands; pausing
    #: for a random time spanning that period samples every phase, as real traffic
    #: would. Push-based locks only need the waiter parked, so a short span does.
    settle: float = 0.01
    needs: Optional[str] = None  # "redis", "postgres" or "deepkit": a server must be running
    note: str = ""


def _path(env: Env, kind: str, file: str) -> str:
    directory = os.path.join(env.workdir, kind)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.path.join(directory, file)


class _Backoff:
    """What a hand-written lease loop does between attempts: 1 ms doubling to 100 ms,
    jittered (the same policy as brokerlock's own fallback waiter)."""

    def __init__(self) -> None:
        self.delay = 0.001

    def sleep(self) -> None:
        time.sleep(self.delay * random.uniform(0.5, 1.5))
        self.delay = min(self.delay * 2, 0.1)


def _poll(attempt: Callable[[], bool], what: str) -> None:
    if attempt():
        return
    backoff, deadline = _Backoff(), time.monotonic() + ACQUIRE_TIMEOUT
    while time.monotonic() < deadline:
        backoff.sleep()
        if attempt():
            return
    raise TimeoutError(f"{what}: not acquired within {ACQUIRE_TIMEOUT} s")


# -- file locks ----------------------------------------------------------------------
class Flock:
    """The floor: ``flock(2)`` on a descriptor kept open; the kernel parks and wakes."""

    def __init__(self, env: Env, name: str) -> None:
        self.fd = os.open(_path(env, "flock", name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


class LeakyFlock(Flock):
    """A deliberately broken lock for ``--backends selftest``: when the lock is busy it
    sometimes claims to have it anyway. The run must catch it and exit 1."""

    def acquire(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if random.random() < 0.2:
                return  # the bug: "acquired" while somebody else holds it
            fcntl.flock(self.fd, fcntl.LOCK_EX)


class _Wrapped:
    """A peer library's lock object in ``self.lock``, driven through our Lock protocol."""

    lock: Any

    def acquire(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        pass


class FileLockPeer(_Wrapped):
    """tox-dev/filelock with its defaults (polls every 50 ms)."""

    def __init__(self, env: Env, name: str) -> None:
        import filelock

        self.lock = filelock.FileLock(_path(env, "filelock", name + ".lock"), timeout=ACQUIRE_TIMEOUT)


class PortalockerPeer(_Wrapped):
    """portalocker.Lock with its defaults (polls every 250 ms)."""

    def __init__(self, env: Env, name: str) -> None:
        import portalocker

        self.lock = portalocker.Lock(_path(env, "portalocker", name + ".lock"), timeout=ACQUIRE_TIMEOUT)


class FastenersPeer(_Wrapped):
    """fasteners.InterProcessLock with its defaults (polls from 10 ms backing off to 100 ms)."""

    def __init__(self, env: Env, name: str) -> None:
        import fasteners

        self.lock = fasteners.InterProcessLock(_path(env, "fasteners", name + ".lock"))

    def acquire(self) -> None:
        if not self.lock.acquire(timeout=ACQUIRE_TIMEOUT):
            raise TimeoutError("fasteners: not acquired")


# -- SQLite ---------------------------------------------------------------------------
_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS lease ("
    "name TEXT PRIMARY KEY, token TEXT, fence INTEGER NOT NULL, expires_at REAL)"
)


def prepare_sqlite_row(env: Env) -> None:
    # Created once by the parent: concurrent CREATE TABLEs would measure contention on
    # the schema, not on the lock.
    conn = sqlite3.connect(_path(env, "sqlite-row", "lease.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(_SQLITE_SCHEMA)
    conn.close()


class SQLiteRow:
    """A raw lease row, what one would write by hand: one INSERT .. ON CONFLICT .. WHERE
    expired RETURNING per attempt, one UPDATE to release, a backoff sleep to wait. Same
    settings as brokerlock's store (WAL, synchronous=NORMAL), so the ratio shows what
    brokerlock's layers cost on top of the statement itself."""

    def __init__(self, env: Env, name: str) -> None:
        self.conn = sqlite3.connect(
            _path(env, "sqlite-row", "lease.db"), timeout=ACQUIRE_TIMEOUT, isolation_level=None
        )
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.name = name
        self.token = ""

    def _attempt(self) -> bool:
        now = time.time()
        row = self.conn.execute(
            "INSERT INTO lease VALUES (?, ?, 1, ?) ON CONFLICT(name) DO UPDATE SET "
            "token = excluded.token, fence = lease.fence + 1, expires_at = excluded.expires_at "
            "WHERE lease.token IS NULL OR lease.expires_at <= ? RETURNING fence",
            (self.name, self.token, now + TTL, now),
        ).fetchone()
        return row is not None

    def acquire(self) -> None:
        self.token = secrets.token_hex(16)
        _poll(self._attempt, "sqlite row")

    def release(self) -> None:
        self.conn.execute(
            "UPDATE lease SET token = NULL WHERE name = ? AND token = ?", (self.name, self.token)
        )

    def close(self) -> None:
        self.conn.close()


# -- Redis ------------------------------------------------------------------------------
def _redis(env: Env) -> Any:
    import redis

    return redis.Redis.from_url(env.redis_url or "")


class RedisPyLock(_Wrapped):
    """redis-py's ``Redis.lock()`` with its defaults (polls every 100 ms)."""

    def __init__(self, env: Env, name: str) -> None:
        self.client = _redis(env)
        self.lock = self.client.lock("redis-py:" + name, timeout=TTL, blocking_timeout=ACQUIRE_TIMEOUT)

    def acquire(self) -> None:
        if not self.lock.acquire():
            raise TimeoutError("redis-py: not acquired")

    def close(self) -> None:
        self.client.close()


class PythonRedisLock(_Wrapped):
    """ionelmc's python-redis-lock (module ``redis_lock``): BLPOP wake-ups."""

    def __init__(self, env: Env, name: str) -> None:
        import redis_lock

        self.client = _redis(env)
        self.lock = redis_lock.Lock(self.client, "redis-lock:" + name, expire=int(TTL))

    def acquire(self) -> None:
        if not self.lock.acquire(timeout=ACQUIRE_TIMEOUT):
            raise TimeoutError("python-redis-lock: not acquired")

    def close(self) -> None:
        self.client.close()


_RELEASE_LUA = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
)


class RedisSetNX:
    """The raw recipe: ``SET key token NX PX ttl`` to take, an owner-checked Lua ``DEL``
    to give back, a backoff sleep to wait."""

    def __init__(self, env: Env, name: str) -> None:
        self.client = _redis(env)
        self.key = "setnx:" + name
        self.token = ""
        self.script = self.client.register_script(_RELEASE_LUA)

    def _attempt(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=int(TTL * 1000)))

    def acquire(self) -> None:
        self.token = secrets.token_hex(16)
        _poll(self._attempt, "redis SET NX")

    def release(self) -> None:
        self.script(keys=[self.key], args=[self.token])

    def close(self) -> None:
        self.client.close()


# -- PostgreSQL --------------------------------------------------------------------------
def _pg(env: Env) -> Any:
    import psycopg

    return psycopg.connect(env.pg_dsn or "", autocommit=True)


def prepare_pg_row(env: Env) -> None:
    conn = _pg(env)
    with conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_lease ("
            "name text PRIMARY KEY, token text, fence bigint NOT NULL, expires_at timestamptz)"
        )


class PgAdvisory:
    """``pg_advisory_lock``: the server parks the waiter and wakes it on unlock."""

    def __init__(self, env: Env, name: str) -> None:
        self.conn = _pg(env)
        self.conn.execute(f"SET lock_timeout = '{int(ACQUIRE_TIMEOUT)}s'")
        self.key = zlib.crc32(name.encode())

    def acquire(self) -> None:
        self.conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))

    def release(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))

    def close(self) -> None:
        self.conn.close()


class PgRow:
    """The raw upsert lease row, SQLite's twin on the server's clock, polling to wait."""

    def __init__(self, env: Env, name: str) -> None:
        self.conn = _pg(env)
        self.name = name
        self.token = ""

    def _attempt(self) -> bool:
        row = self.conn.execute(
            "INSERT INTO bench_lease AS l VALUES (%s, %s, 1, clock_timestamp() + %s * interval '1 second') "
            "ON CONFLICT (name) DO UPDATE SET token = excluded.token, fence = l.fence + 1, "
            "expires_at = excluded.expires_at "
            "WHERE l.token IS NULL OR l.expires_at <= clock_timestamp() RETURNING fence",
            (self.name, self.token, TTL),
        ).fetchone()
        return row is not None

    def acquire(self) -> None:
        self.token = secrets.token_hex(16)
        _poll(self._attempt, "postgres row")

    def release(self) -> None:
        self.conn.execute(
            "UPDATE bench_lease SET token = NULL WHERE name = %s AND token = %s", (self.name, self.token)
        )

    def close(self) -> None:
        self.conn.close()


# -- Deepkit's broker ------------------------------------------------------------------------
#: Deepkit 1.0.19 reads the ttl and timeout its client sends in ms as seconds (issue 17).
DEEPKIT_NOTE = (
    "Deepkit's broker 1.0.19 (BrokerKernel + RpcTcpServer, BrokerDeepkitAdapter clients in "
    "Node, driven from Python over a pipe: its figures include one pipe round trip per "
    "call). Its unit bug: the client sends ttl and timeout in ms and the server reads "
    "seconds, so '60s' lasts ~16.7 hours, and a ttl over ~36 min overflows Node's timer "
    "and lets a second holder in at once."
)


def _schedstat_ns(pid: int) -> int:
    """CPU time of process ``pid`` in ns (Linux's scheduler count: exact, unlike the
    10 ms ticks of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class DeepkitBroker:
    """``BrokerLock(new BrokerDeepkitAdapter(...)).item(name, {ttl, timeout})`` in a Node
    process of its own per participant (benchmarks/deepkit_broker.js), told over a pipe
    to acquire or release. A waiter's CPU is the Node client's (``cpu_ns``)."""

    def __init__(self, env: Env, name: str) -> None:
        import subprocess

        from servers import DEEPKIT_SCRIPT

        self.proc = subprocess.Popen(
            ["node", DEEPKIT_SCRIPT, "client", env.deepkit_port or "", name, f"{int(TTL)}s",
             f"{int(ACQUIRE_TIMEOUT)}s"],
            env={**os.environ, "NODE_PATH": env.deepkit_modules or ""},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout
        ready = self._out.readline()
        if ready != b"ready\n":
            raise RuntimeError(f"Deepkit client did not start: {ready!r}")

    def _call(self, command: bytes) -> None:
        self._in.write(command)
        answer = self._out.readline()
        if answer != b"ok\n":
            said = answer.decode(errors="replace").strip() or "client exited"
            raise RuntimeError(f"Deepkit broker: {said}")

    def acquire(self) -> None:
        self._call(b"a\n")

    def release(self) -> None:
        self._call(b"r\n")

    def cpu_ns(self) -> int:
        return _schedstat_ns(self.proc.pid)

    def close(self) -> None:
        try:
            self._in.write(b"q\n")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()  # our own child, by handle
            self.proc.wait()


# -- in-process --------------------------------------------------------------------------
_THREAD_LOCKS: Dict[str, threading.Lock] = {}
_MEMORY_STORES: Dict[str, Any] = {}
_SHARED = threading.Lock()


class ThreadingLock:
    """``threading.Lock``: the floor for locks between threads of one process."""

    def __init__(self, env: Env, name: str) -> None:
        with _SHARED:
            self.lock = _THREAD_LOCKS.setdefault(name, threading.Lock())

    def acquire(self) -> None:
        if not self.lock.acquire(timeout=ACQUIRE_TIMEOUT):
            raise TimeoutError("threading.Lock: not acquired")

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        pass


# -- brokerlock, through its public API only --------------------------------------------
class Brokerlock:
    """``BrokerLock(adapter).item(name).acquire()/release()``, as a user writes it."""

    def __init__(self, store: Any, name: str, owns_store: bool = True) -> None:
        from brokerlock import BrokerLock

        self.lock = store if isinstance(store, BrokerLock) else BrokerLock(store)
        self.item = self.lock.item(name, ttl=TTL, timeout=ACQUIRE_TIMEOUT)
        self.owns_store = owns_store

    def acquire(self) -> None:
        self.item.acquire()

    def release(self) -> None:
        self.item.release()

    def close(self) -> None:
        if self.owns_store:
            self.lock.close()


def _bl_memory(env: Env, name: str) -> Lock:
    from brokerlock import MemoryAdapter

    # One store shared by the threads of this process, as an application would.
    with _SHARED:
        store = _MEMORY_STORES.setdefault(name, MemoryAdapter())
    return Brokerlock(store, name, owns_store=False)


def _bl_file(env: Env, name: str) -> Lock:
    from brokerlock import FileAdapter

    return Brokerlock(FileAdapter(os.path.dirname(_path(env, "bl-file", "x"))), name)


def _bl_sqlite(env: Env, name: str) -> Lock:
    from brokerlock import SQLiteAdapter

    return Brokerlock(SQLiteAdapter(_path(env, "bl-sqlite", "locks.sqlite3")), name)


def _bl_url(url: Optional[str]) -> Callable[[Env, str], Lock]:
    def make(env: Env, name: str) -> Lock:
        from brokerlock import BrokerLock

        return Brokerlock(BrokerLock.from_url(url or ""), name)

    return make


def _bl_redis(env: Env, name: str) -> Lock:
    return _bl_url(env.redis_url)(env, name)


def _bl_postgres(env: Env, name: str) -> Lock:
    return _bl_url(env.pg_dsn)(env, name)


KINDS: List[Kind] = [
    Kind("flock", "file", False, Flock, note="floor: fcntl.flock"),
    Kind("filelock", "file", False, FileLockPeer, settle=0.05),
    Kind("portalocker", "file", False, PortalockerPeer, settle=0.25),
    Kind("fasteners", "file", False, FastenersPeer, settle=0.1),
    Kind("sqlite row", "sqlite", False, SQLiteRow, settle=0.1, note="raw lease row + backoff"),
    Kind("redis-py Lock", "redis", False, RedisPyLock, settle=0.1, needs="redis"),
    Kind("python-redis-lock", "redis", False, PythonRedisLock, needs="redis"),
    Kind("redis SET NX", "redis", False, RedisSetNX, settle=0.1, needs="redis", note="raw SET NX PX + Lua"),
    Kind("pg advisory", "postgres", False, PgAdvisory, needs="postgres"),
    Kind(
        "pg upsert row",
        "postgres",
        False,
        PgRow,
        settle=0.1,
        needs="postgres",
        note="raw lease row + backoff",
    ),
    Kind("deepkit broker", "deepkit", False, DeepkitBroker, needs="deepkit", note=DEEPKIT_NOTE),
    Kind("threading.Lock", "memory", False, ThreadingLock, mode="thread", note="floor, threads"),
    Kind("brokerlock memory", "memory", True, _bl_memory, mode="thread", note="threads"),
    Kind("brokerlock file", "file", True, _bl_file),
    Kind("brokerlock sqlite", "sqlite", True, _bl_sqlite),
    Kind("brokerlock redis", "redis", True, _bl_redis, needs="redis"),
    Kind("brokerlock postgres", "postgres", True, _bl_postgres, needs="postgres"),
]
#: Not in the default run: proves that the exclusion checks fail a broken lock.
SELFTEST = Kind("leaky flock", "selftest", False, LeakyFlock, note="broken on purpose")
BY_NAME: Dict[str, Kind] = {kind.name: kind for kind in [*KINDS, SELFTEST]}
FAMILIES = ["memory", "file", "sqlite", "redis", "postgres", "deepkit"]

#: One-time set-up in the parent, before any worker starts.
PREPARE: Dict[str, Callable[[Env], None]] = {
    "sqlite row": prepare_sqlite_row,
    "pg upsert row": prepare_pg_row,
}


def unavailable(kind: Kind, env: Env) -> Optional[str]:
    """Why ``kind`` cannot run here, or ``None`` when it can."""
    if kind.needs == "redis" and not env.redis_url:
        return "no Redis server"
    if kind.needs == "postgres" and not env.pg_dsn:
        return "no PostgreSQL server"
    if kind.needs == "deepkit" and not env.deepkit_port:
        return "Deepkit's broker is not running"
    if kind.ours and kind.needs:
        import importlib.util

        module = "brokerlock.adapters." + kind.needs
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} does not exist yet"
        except ImportError as exc:
            return f"{module}: {exc}"
    return None
