"""The Redis store's lean script calls recover as redis-py's own path does.

Real server (``tests/servers.py``), nothing mocked: the server forgets its scripts,
pooled connections are killed under the adapter, and a client handed to the adapter
keeps redis-py's path and settings.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from brokerlock import BrokerLock, RedisAdapter
from brokerlock.adapters._redis_call import pack


@pytest.fixture
def url(redis_server: Any) -> str:
    return f"{redis_server.url}?prefix=calls-{uuid.uuid4().hex[:12]}%3A"


def test_pack_is_resp() -> None:
    expected = b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$2\r\n\xc3\xa9\r\n"
    assert pack([b"EVALSHA", "ab", 2, "é"]) == expected


def test_scripts_flushed_from_the_server_are_loaded_again(url: str) -> None:
    lock = BrokerLock(RedisAdapter(url))
    item = lock.item("job", ttl="10s")
    item.acquire()
    lock.adapter._client.script_flush()  # type: ignore[attr-defined]
    item.release()  # NOSCRIPT, loaded again, run
    lock.adapter._client.script_flush()  # type: ignore[attr-defined]
    assert item.acquire().fence is not None
    item.release()


def test_pooled_connections_killed_under_the_adapter_reconnect(url: str) -> None:
    lock = BrokerLock(RedisAdapter(url))
    item = lock.item("job", ttl="10s")
    item.acquire()
    item.release()
    client = lock.adapter._client  # type: ignore[attr-defined]
    admin = type(client).from_url(url.split("?")[0])
    # Every client connection but the admin's own: the adapter's pooled ones among them.
    assert admin.client_kill_filter(skipme=True, _type="normal") >= 1
    item.acquire()
    item.release()
    admin.close()


def test_a_client_handed_over_keeps_redis_py_path(redis_server: Any) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    adapter = RedisAdapter(client, prefix=f"calls-{uuid.uuid4().hex[:12]}:")
    assert adapter._call is None
    item = BrokerLock(adapter).item("job", ttl="10s")
    item.acquire()
    item.release()
    client.close()
