"""Redis and PostgreSQL beyond the contract: real processes, kills, restarts, lost servers.

Every test runs against the private servers of ``tests/servers.py``; nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
from servers import PostgresServer, RedisServer, free_port
from stores import STORES
from test_readme import needs_server, python_blocks

from brokerlock import Adapter, BrokerLock, BrokerLockError, LockLost

README = Path(__file__).resolve().parent.parent / "README.rst"

#: Lets the subprocesses import brokerlock from this checkout.
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


@pytest.fixture(params=["redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> Tuple[str, Any]:
    return request.param, request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def url(backend: Tuple[str, Any], tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh store (a new prefix or table) on the backend's server."""
    kind, server = backend
    adapter = STORES[kind](str(tmp_path), server)()
    yield adapter.url
    adapter.close()


def spawn(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV)


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"worker exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "worker never became ready"
        time.sleep(0.005)


INCREMENT = """
    import sys, time
    from brokerlock import BrokerLock
    url, counter, fences = sys.argv[1:]
    item = BrokerLock.from_url(url).item("counter", ttl="30s", timeout="60s")
    for _ in range(150):
        with item.hold():
            with open(counter) as f:
                value = int(f.read())
            time.sleep(0)  # without exclusion, increments would now be lost
            with open(counter, "w") as f:
                f.write(str(value + 1))
            with open(fences, "a") as f:
                f.write(f"{item.fence}\\n")
"""


def test_four_processes_increment_exactly(url: str, tmp_path: Path) -> None:
    counter, fences = tmp_path / "counter", tmp_path / "fences"
    counter.write_text("0")
    fences.write_text("")
    procs = [spawn(INCREMENT, url, str(counter), str(fences)) for _ in range(4)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    assert counter.read_text() == "600"
    seen = [int(line) for line in fences.read_text().split()]
    assert len(seen) == 600
    # Written under the lock, so in the order of the holds: every hold had a new fence.
    assert all(a < b for a, b in zip(seen, seen[1:]))


HOLD = """
    import sys, time
    from brokerlock import BrokerLock
    url, ttl, ready = sys.argv[1:]
    item = BrokerLock.from_url(url).item("job", ttl=ttl, timeout="10s")
    item.acquire()
    open(ready, "w").write(str(item.fence))
    time.sleep(600)
"""


def test_killed_holder(backend: Tuple[str, Any], url: str, tmp_path: Path) -> None:
    """Both free a killed holder's lock at once: its presence session or connection ended."""
    ttl = 60.0
    ready = tmp_path / "ready"
    proc = spawn(HOLD, url, f"{ttl}s", str(ready))
    try:
        wait_for_file(ready, proc)
        lock = BrokerLock.from_url(url)
        item = lock.item("job", ttl="10s", timeout="10s")
        assert item.try_acquire() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        item.acquire()
        took = time.monotonic() - killed
        assert took < 0.5, "the holder's presence ended: its lock is free at once"
        assert item.fence is not None and item.fence > int(ready.read_text())
        item.release()
        lock.close()
    finally:
        proc.kill()
        proc.wait()


def test_parked_waiter_gets_killed_holders_lock(backend: Tuple[str, Any], url: str, tmp_path: Path) -> None:
    """A waiter already parked is not left waiting for the ttl either."""
    kind, _server = backend
    ready = tmp_path / "ready"
    proc = spawn(HOLD, url, "60s", str(ready))
    try:
        wait_for_file(ready, proc)
        item = BrokerLock.from_url(url).item("job", ttl="10s", timeout="10s")
        killed: List[float] = []
        timer = threading.Timer(0.3, lambda: (killed.append(time.monotonic()), proc.kill()))
        timer.start()
        item.acquire()
        took = time.monotonic() - killed[0]
        # No release to wake it and nothing pushes a death: a parked waiter finds the
        # holder dead at its safety-net look (5 s on both; issue 17 traded the old
        # sub-second polling for a waiter that costs under 1 ms of CPU per 5 s).
        from brokerlock.adapters.postgres import adapter as postgres_adapter
        from brokerlock.adapters.redis import adapter as redis_adapter

        net = postgres_adapter.RECHECK if kind == "postgres" else redis_adapter.SAFETY_NET
        assert took < net + 2.0, took
        item.release()
    finally:
        proc.kill()
        proc.wait()


def test_two_hosts_with_separate_connections(backend: Tuple[str, Any], url: str) -> None:
    """Two adapters, each with its own client, exclude each other and hand over at once."""
    kind, server = backend
    b = BrokerLock.from_url(url)
    if kind == "redis":
        import redis

        from brokerlock import RedisAdapter

        host_a: Adapter = RedisAdapter(redis.Redis.from_url(server.url), prefix=b.adapter.prefix)  # type: ignore[attr-defined]
    else:
        import psycopg

        from brokerlock import PostgresAdapter

        host_a = PostgresAdapter(psycopg.connect(server.dsn), table=b.adapter.table)  # type: ignore[attr-defined]
    a = BrokerLock(host_a)
    assert a.adapter.url == b.adapter.url
    inside, overlaps, total = 0, 0, 0
    mutex = threading.Lock()

    def work(lock: BrokerLock) -> None:
        nonlocal inside, overlaps, total
        item = lock.item("shared", ttl="30s", timeout="30s")
        for _ in range(30):
            with item.hold():
                with mutex:
                    inside += 1
                    overlaps += inside != 1
                time.sleep(0.001)
                with mutex:
                    inside -= 1
                    total += 1

    threads = [threading.Thread(target=work, args=(lock,)) for lock in (a, b, a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (overlaps, total) == (0, 120)

    # A parked waiter on one host is woken by the release on the other, not by a poll
    # (its safety-net re-check is a second away).
    holder = a.item("handoff", ttl="30s")
    holder.acquire()
    waiter = b.item("handoff", timeout="10s")
    got: List[Any] = []

    def wait() -> None:
        waiter.acquire()
        got.extend([time.monotonic(), waiter.fence])
        waiter.release()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    released = time.monotonic()
    holder.release()
    thread.join()
    assert got and got[0] - released < 0.25
    assert got[1] is not None and holder.fence is None
    a.close()
    b.close()


def test_server_restart_while_held(backend: Tuple[str, Any], url: str) -> None:
    """Stopped: calls fail naming the server. Back: the holder learns LockLost, never two holders.

    Redis runs here without persistence, so the restart forgets the lease; PostgreSQL
    keeps the row, but the holder's session ended with the restart, which frees it.
    """
    _kind, server = backend
    lock, other = BrokerLock.from_url(url), BrokerLock.from_url(url)
    item = lock.item("survivor", ttl="30s", timeout="3s")
    item.acquire()
    first_fence = item.fence
    assert first_fence is not None
    waiter = other.item("survivor", timeout="30s")
    errors: List[BaseException] = []

    def wait() -> None:
        try:
            waiter.acquire()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(BrokerLockError) as info:
            item.extend()
        assert time.monotonic() - started < 12
        assert f"127.0.0.1:{server.port}" in str(info.value)
        thread.join(timeout=15)
        assert not thread.is_alive(), "a parked waiter must not hang on a dead server"
        assert errors and isinstance(errors[0], BrokerLockError)
        assert f"127.0.0.1:{server.port}" in str(errors[0])
    finally:
        server.start()
    # The next calls reconnect by themselves.
    newcomer = other.item("survivor", ttl="30s", timeout="3s")
    newcomer.acquire()
    assert newcomer.fence is not None and newcomer.fence > first_fence
    if not isinstance(info.value, LockLost):
        # (The presence watch may have told the holder already, when the server closed
        # its presence connection: then the extend above raised LockLost, naming it.)
        with pytest.raises(LockLost):
            item.extend()
    assert not item.acquired and item.lost
    holders = [lease for lease in other.adapter.list() if lease.name == "survivor"]
    assert [lease.token for lease in holders] == [newcomer.lease.token]  # type: ignore[union-attr]
    newcomer.release()
    lock.close()
    other.close()


def test_unreachable_server_is_named_without_password() -> None:
    port = free_port()
    started = time.monotonic()
    for url in (f"redis://:s3cret@127.0.0.1:{port}/0", f"postgresql://u:s3cret@127.0.0.1:{port}/db"):
        with pytest.raises(BrokerLockError) as info:
            BrokerLock.from_url(url).item("x", timeout="1s").acquire()
        message = str(info.value)
        assert f"127.0.0.1:{port}" in message and "s3cret" not in message, message
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("driver,extra", [("redis", "redis"), ("psycopg", "postgres")])
def test_missing_driver_names_the_extra(driver: str, extra: str) -> None:
    code = f"""
        import sys
        sys.modules[{driver!r}] = None  # as if it were not installed
        import brokerlock
        try:
            brokerlock.BrokerLock.from_url({extra!r} + "://localhost/x")
        except brokerlock.BrokerLockError as exc:
            print(exc)
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert f"pip install brokerlock[{extra}]" in out.stdout, out.stderr


def test_core_import_loads_no_driver() -> None:
    code = "import brokerlock, sys; print('redis' in sys.modules, 'psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_table_name_must_be_an_identifier(postgres_server: PostgresServer) -> None:
    from brokerlock import PostgresAdapter

    for bad in ["x; DROP TABLE y", "a b", '"q"', "", "a.b.c", "x" * 64]:
        with pytest.raises(ValueError, match="identifier"):
            PostgresAdapter(postgres_server.dsn, table=bad)


def test_prefixes_are_separate_stores(redis_server: RedisServer) -> None:
    a = BrokerLock.from_url(redis_server.url + "?prefix=one%3A")
    b = BrokerLock.from_url(redis_server.url + "?prefix=one%3Ax")
    a.item("p").acquire()
    assert b.item("p").try_acquire() is not None
    assert [lease.name for lease in b.adapter.list()] == ["p"]


def readme_server_blocks() -> List[str]:
    return [code for code in python_blocks() if needs_server(code)]


def test_readme_server_examples_run(
    redis_server: RedisServer, postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = readme_server_blocks()
    assert len(blocks) >= 2
    for code in blocks:
        code = code.replace("redis://localhost:6379/0", redis_server.url)
        code = code.replace("postgresql://app@localhost/app", postgres_server.dsn)
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
        assert capsys.readouterr().out.strip(), "every example shows what it did"
