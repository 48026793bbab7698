"""The Redis store's lean command path: every reply reaches the call that asked for it,
and failures recover as redis-py's own path does.

Real server (``tests/servers.py``), nothing mocked: the server is paused under a call
until the client gives up on it, forgets its scripts, has its connections killed; a
client handed to the adapter keeps redis-py's path and settings.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest

from brokerlock import BrokerLock, BrokerLockError, RedisAdapter
from brokerlock.adapters.base import Request
from brokerlock.adapters.redis.call import pack

#: The adapter's socket timeout in these tests, and how long the server is paused:
#: long enough past it that the client gives up while the command still waits.
SHORT_TIMEOUT = 0.25
PAUSE_MS = 1_000


@pytest.fixture
def url(redis_server: Any) -> str:
    return f"{redis_server.url}?prefix=calls-{uuid.uuid4().hex[:12]}%3A"


@pytest.fixture
def admin(redis_server: Any) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_pack_is_resp() -> None:
    expected = b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$2\r\n\xc3\xa9\r\n"
    assert pack([b"EVALSHA", "ab", 2, "é"]) == expected


def test_a_call_cut_short_never_hands_its_reply_to_a_later_call(url: str, admin: Any) -> None:
    """The failure once suspected behind the chaos run (see test_redis_stale_grant for
    the real one): a reply the server sends after the client gave up on the call, read
    by the next call on that pooled connection."""
    adapter = RedisAdapter(f"{url}&socket_timeout={SHORT_TIMEOUT}")
    try:
        held = adapter.try_acquire(Request.make("job", "a" * 32, 10.0))
        assert held is not None
        admin.client_pause(PAUSE_MS)  # every client's commands wait, ours included
        with pytest.raises(BrokerLockError, match="Timeout"):
            adapter.try_acquire(Request.make("other", "b" * 32, 10.0))
        admin.ping()  # answered once the pause is over: the late reply is on its way
        # Each of these would read the acquire's reply (a lease: truthy, a list) if the
        # connection that timed out had gone back to the pool as it was.
        assert adapter.release("nothing", "c" * 32) is False
        assert adapter.extend("nothing", "c" * 32, 1.0) is None
        current = adapter.get("job")
        assert current is not None and current.token == held.token
        assert adapter.release("job", held.token) is True
    finally:
        adapter.close()


def test_a_waiter_blocks_for_less_than_the_socket_timeout(url: str) -> None:
    """BLPOP ends on the server before the client would give up on its reply, or a
    wake-up popped on the server could be lost on the way."""
    holder = RedisAdapter(url)
    waiter = RedisAdapter(f"{url}&socket_timeout={SHORT_TIMEOUT}")
    try:
        held = holder.try_acquire(Request.make("job", "a" * 32, 10.0))
        assert held is not None
        # Four socket timeouts of waiting: an error here would be the client giving up.
        assert waiter.acquire(Request.make("job", "b" * 32, 10.0), 4 * SHORT_TIMEOUT) is None
        assert holder.release("job", held.token) is True
    finally:
        holder.close()
        waiter.close()


def test_scripts_flushed_from_the_server_are_loaded_again(url: str) -> None:
    lock = BrokerLock(RedisAdapter(url))
    item = lock.item("job", ttl="10s")
    item.acquire()
    lock.adapter._client.script_flush()  # type: ignore[attr-defined]
    item.release()  # NOSCRIPT, loaded again, run
    lock.adapter._client.script_flush()  # type: ignore[attr-defined]
    assert item.acquire().fence is not None
    item.release()
    lock.close()


def test_pooled_connections_killed_under_the_adapter_reconnect(url: str, admin: Any) -> None:
    lock = BrokerLock(RedisAdapter(url))
    item = lock.item("job", ttl="10s")
    item.acquire()
    item.release()
    # Every client connection but the admin's own: the adapter's pooled ones among them
    # (and this process's presence connection, which the next acquire opens again).
    assert admin.client_kill_filter(skipme=True, _type="normal") >= 1
    assert item.acquire().fence is not None
    item.release()
    lock.close()


def test_a_client_handed_over_keeps_redis_py_path(redis_server: Any) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    adapter = RedisAdapter(client, prefix=f"calls-{uuid.uuid4().hex[:12]}:")
    assert adapter._call is None
    item = BrokerLock(adapter).item("job", ttl="10s")
    item.acquire()
    item.release()
    client.close()
