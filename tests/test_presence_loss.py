"""A killed presence connection marks the hold lost at once (real servers).

The server frees every lease of a process the moment that process's presence
connection ends, so the holder must hear of it then, not at its next renewal: its
``on_lost`` fires, its keepalive stops, and ``brokerlock run`` stops its job.
The ttls here are a minute, so only the watch can explain a loss within a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, List, Tuple

import pytest
from test_cli import Jobs, expect, finish

from brokerlock import BrokerLock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the job is a POSIX shell command")

#: How soon the loss must be known: "within a second", with room for a loaded machine.
PROMPT = 1.5


def redis_url(server: Any) -> str:
    return f"{server.url}?prefix=test-{uuid.uuid4().hex[:12]}%3A"


def postgres_url(server: Any) -> str:
    return f"{server.dsn}?table=t_{uuid.uuid4().hex[:12]}"


def redis_pubsub_clients(server: Any) -> List[str]:
    import redis

    with redis.Redis.from_url(server.url) as admin:
        return [str(client["id"]) for client in admin.client_list(_type="pubsub")]


def kill_redis_clients(server: Any, ids: List[str]) -> None:
    import redis

    with redis.Redis.from_url(server.url) as admin:
        for client_id in ids:
            assert admin.client_kill_filter(_id=client_id) == 1


def kill_postgres_holder(server: Any, url: str, name: str) -> None:
    """pg_terminate_backend() of the session that holds the presence key of ``name``'s row."""
    import psycopg

    table = url.rpartition("table=")[2]
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        row = admin.execute(
            f"SELECT l.pid FROM {table} t JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted "
            "AND l.objsubid = 1 AND ((l.classid::int8 << 32) | l.objid::int8) = t.holder "
            "WHERE t.name = %s",
            (name,),
        ).fetchone()
        assert row is not None, "no presence session holds the row's key"
        assert admin.execute("SELECT pg_terminate_backend(%s)", (row[0],)).fetchone() == (True,)


def server_and_killer(
    request: pytest.FixtureRequest, kind: str, ours: bool = True
) -> Tuple[str, Callable[[str], None]]:
    """A fresh store URL, and a function that kills the presence of ``name``'s holder:
    this process (``ours``) or another one started after this call."""
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        url = redis_url(server)
        before = set(redis_pubsub_clients(server))

        def kill(name: str) -> None:
            if ours:
                lock = BrokerLock.from_url(url)
                presence = lock.adapter._presence  # type: ignore[attr-defined]
                lock.close()
                host, port = presence._pubsub.connection._sock.getsockname()[:2]
                import redis

                with redis.Redis.from_url(server.url) as admin:
                    assert admin.client_kill(f"{host}:{port}")
                return
            new = [c for c in redis_pubsub_clients(server) if c not in before]
            assert new, "no presence connection appeared"
            kill_redis_clients(server, new)

        return url, kill
    server = request.getfixturevalue("postgres_server")
    url = postgres_url(server)
    return url, lambda name: kill_postgres_holder(server, url, name)


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_killed_presence_reaches_on_lost_at_once(request: pytest.FixtureRequest, kind: str) -> None:
    url, kill = server_and_killer(request, kind)
    lock = BrokerLock.from_url(url)
    heard = threading.Event()
    item = lock.item("job", ttl="1m", keepalive=True, on_lost=lambda _item: heard.set())
    item.acquire()
    hold = item._current()
    assert hold is not None and not heard.is_set()

    killed = time.monotonic()
    kill("job")
    assert heard.wait(PROMPT), f"on_lost not called within {PROMPT}s of the kill"
    assert time.monotonic() - killed < PROMPT
    assert item.lost and not item.acquired and hold.finished  # the keepalive drops it
    assert "presence" in hold.why

    # The lock was free for the taking from the kill on; the process takes it again
    # under a new presence connection.
    again = BrokerLock.from_url(url).item("job", ttl="1m", timeout=5)
    again.acquire()
    assert again.fence is not None and again.fence > hold.lease.fence
    again.release()
    item._release_quietly()
    lock.close()


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_released_hold_hears_nothing_of_a_later_kill(request: pytest.FixtureRequest, kind: str) -> None:
    url, kill = server_and_killer(request, kind)
    lost: List[str] = []
    item = BrokerLock.from_url(url).item("job", ttl="1m", on_lost=lambda i: lost.append(i.name))
    item.acquire()
    other = BrokerLock.from_url(url).item("other", ttl="1m")
    other.acquire()
    item.release()
    heard = threading.Event()
    other.on_lost = lambda _item: heard.set()
    kill("other")
    assert heard.wait(PROMPT)
    assert lost == [] and not item.lost  # released before the kill: nothing was lost


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_run_stops_its_job_within_a_second_of_the_kill(request: pytest.FixtureRequest, kind: str) -> None:
    url, kill = server_and_killer(request, kind, ours=False)
    jobs = Jobs()
    try:
        env = {**os.environ, "BROKERLOCK_URL": url}
        job = jobs.start(env, "run", "--ttl", "1m", "job", "--", "sh", "-c", "echo started; exec sleep 60")
        expect(job.stdout, "started")
        killed = time.monotonic()
        kill("job")
        code, _, err = finish(job, timeout=30)
        assert code == 125, err
        assert time.monotonic() - killed < PROMPT + 1, err  # the job ends on its SIGTERM
        assert "presence" in err and "stopping 'sh'" in err, err
        free = subprocess.run(
            [sys.executable, "-m", "brokerlock", "status", "job"], env=env, capture_output=True, timeout=60
        )
        assert free.returncode == 0
    finally:
        jobs.close()
