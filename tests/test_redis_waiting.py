"""A parked Redis waiter is told what it must watch; it does not poll for it.

Waiters look at the store only when a script pushes a look onto their list, at the
end of the lease they wait behind, and every ``SAFETY_NET`` (5 s). These tests make
the waiter's only way to be served in time the push: a waiter whose turn came never
takes its lease up, or a waiter is killed while the holder of a long lease lives on,
so a waiter that relied on its safety net would take 5 s. Real server and a real
holder process, nothing mocked; the stopped waiter is played by running one step of
its loop and no more.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from typing import Any, List

import pytest

from brokerlock import RedisAdapter
from brokerlock.adapters.base import Lease, Request
from brokerlock.adapters.redis import adapter as redis_adapter

#: How soon after the moment it could first have the lock a waiter must have it:
#: far under the safety net, with room for a loaded machine.
PROMPT = 2.5


@pytest.fixture
def url(redis_server: Any) -> str:
    return f"{redis_server.url}?prefix=waiting-{uuid.uuid4().hex[:12]}%3A"


def _queued(adapter: RedisAdapter, name: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while adapter._client.zcard(adapter._key("queue", name)) < count:
        assert time.monotonic() < deadline, f"{count} waiters never queued"
        time.sleep(0.01)


def _wait_in_thread(adapter: RedisAdapter, request: Request, got: List[Any]) -> threading.Thread:
    def run() -> None:
        got.append(adapter.acquire(request, 20.0))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_second_waiter_learns_the_end_of_a_lease_granted_to_the_first(url: str) -> None:
    """The first waiter is granted the lock and never takes it up (stopped): the second,
    told of the grant, takes the lock when that short lease ends, not at its net."""
    assert redis_adapter.SAFETY_NET >= 2 * PROMPT, "the test could not tell push from net"
    holder, stopped, waiter = RedisAdapter(url), RedisAdapter(url), RedisAdapter(url)
    try:
        held = holder.try_acquire(Request.make("job", "a" * 32, 30.0))
        assert held is not None
        first = Request.make("job", "b" * 32, 0.3)
        assert stopped._try(first, True)[1:4:2] == (0, 1)  # queued first, then stopped
        second = Request.make("job", "c" * 32, 30.0)
        got: List[Any] = []
        thread = _wait_in_thread(waiter, second, got)
        _queued(holder, "job", 2)
        time.sleep(0.1)  # parked in BLPOP with the holder's 30 s lease in view
        assert holder.release("job", held.token)
        granted = holder.get("job")
        assert granted is not None and granted.token == first.token
        assert granted.expires_at is not None
        thread.join(PROMPT + 1.0)
        assert got, "the second waiter was not served within the push's time"
        lease = got[0]
        assert isinstance(lease, Lease) and lease.token == second.token
        assert lease.acquired_at >= granted.expires_at, "taken while the grant was live"
        assert lease.fence > granted.fence
        assert waiter.release("job", second.token)
    finally:
        for adapter in (holder, stopped, waiter):
            adapter.close()


_HOLDER = """
import sys, time
from brokerlock import BrokerLock
BrokerLock.from_url(sys.argv[1]).item("job", ttl=30).acquire()
print("held", flush=True)
time.sleep(60)
"""



def _start_holder(url: str) -> subprocess.Popen[str]:
    """A process that holds "job" with a 30 s lease, once it says so."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    except BaseException:
        _kill(holder)
        raise
    return holder


def _kill(holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait(10)

def test_a_waiter_that_takes_the_lock_from_the_queue_tells_the_next(url: str) -> None:
    """The holder of a 30 s lease is killed (nothing pushes that); the first waiter
    takes the lock from the head of the queue and is then stopped: the waiter behind
    it, parked with the dead holder's 30 s lease in view, is pushed by that take and
    watches the new lease's end instead."""
    holder = _start_holder(url)
    first_adapter, waiter = RedisAdapter(url), RedisAdapter(url)
    try:
        first = Request.make("job", "b" * 32, 0.3)
        assert first_adapter._try(first, True)[1:4:2] == (0, 1)
        second = Request.make("job", "c" * 32, 30.0)
        got: List[Any] = []
        thread = _wait_in_thread(waiter, second, got)
        _queued(waiter, "job", 2)
        time.sleep(0.1)  # parked in BLPOP with the holder's 30 s lease in view
        _kill(holder)
        took = first_adapter._try(first, True)[0]
        assert took is not None, "the head of the queue could not take the dead holder's lock"
        thread.join(PROMPT + 1.0)
        assert got, "the second waiter was not served within the push's time"
        lease = got[0]
        assert isinstance(lease, Lease) and lease.token == second.token
        assert took.expires_at is not None and lease.acquired_at >= took.expires_at
        assert lease.fence > took.fence
        assert waiter.release("job", second.token)
    finally:
        _kill(holder)
        for adapter in (first_adapter, waiter):
            adapter.close()


def test_a_newcomer_that_finds_a_dead_holder_wakes_the_head_of_the_queue(url: str) -> None:
    """The holder of a 30 s lease is killed; a newcomer's try finds the lock free but a
    waiter ahead of it: it must not take the lock, and the parked waiter, woken by that
    try, takes it at once (not at its net, and not after losing its place)."""
    holder = _start_holder(url)
    waiter, newcomer = RedisAdapter(url), RedisAdapter(url)
    try:
        parked = Request.make("job", "b" * 32, 30.0)
        got: List[Any] = []
        thread = _wait_in_thread(waiter, parked, got)
        _queued(waiter, "job", 1)
        time.sleep(0.1)  # parked in BLPOP with the holder's 30 s lease in view
        _kill(holder)
        assert newcomer.try_acquire(Request.make("job", "c" * 32, 30.0)) is None
        thread.join(PROMPT)
        assert got, "the parked waiter was not woken by the newcomer's look"
        lease = got[0]
        assert isinstance(lease, Lease) and lease.token == parked.token
        assert newcomer.try_acquire(Request.make("job", "d" * 32, 30.0)) is None
        assert waiter.release("job", parked.token)
    finally:
        _kill(holder)
        for adapter in (waiter, newcomer):
            adapter.close()
