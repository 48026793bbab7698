"""A lease granted to a Redis waiter that ran out before the waiter woke is never
taken up later by that waiter.

The chaos failure behind the revert of the lean command path (4822768): a release
hands the lock to a waiter that is between two steps of its loop (not blocked in
``BLPOP``), pushing the lease onto its wake-up list; the waiter is stopped past the
lease's ttl; the lease expires and another client takes the lock. When the waiter
runs again its loop queues it again under the same token, and its ``BLPOP`` then
popped the stale lease: a holder inside beside the live one, and, since its place in
the queue stayed, the next release granted that token again, so the stale holder's
release reported an intact lease. Real server (``tests/servers.py``), nothing mocked;
the stop is played by calling the loop's steps one at a time.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Tuple

import pytest

from brokerlock import RedisAdapter
from brokerlock.adapters.base import Lease, Request

#: Gives up waiting for a short lease to expire on the server after this many seconds.
EXPIRY_WITHIN = 5.0


@pytest.fixture
def url(redis_server: Any) -> str:
    return f"{redis_server.url}?prefix=stale-{uuid.uuid4().hex[:12]}%3A"


def _wait_until_free(adapter: RedisAdapter, name: str) -> None:
    """Until the server's own clock ended the lease (the store is the only event)."""
    deadline = time.monotonic() + EXPIRY_WITHIN
    while adapter.get(name) is not None:
        assert time.monotonic() < deadline, "the lease never expired on the server"
        time.sleep(0.005)


def _granted_then_taken(
    holder: RedisAdapter, waiter: RedisAdapter, other: RedisAdapter
) -> Tuple[Request, Lease, float]:
    """The waiter's loop, step one: it queues behind the holder; before its BLPOP the
    release hands it the lock, onto its wake-up list; the waiter is stopped past its
    lease and someone else takes the free lock. The waiter's request, the live lease
    and the server clock offset that its step returned."""
    first = holder.try_acquire(Request.make("job", "a" * 32, 10.0))
    assert first is not None
    request = Request.make("job", "b" * 32, 0.05)
    lease, code, _look_by, position, _member, server = waiter._try(request, True)
    assert (lease, code, position) == (None, 0, 1)
    assert holder.release("job", first.token)
    granted = holder.get("job")
    assert granted is not None and granted.token == request.token
    _wait_until_free(holder, "job")
    taken = other.try_acquire(Request.make("job", "c" * 32, 10.0))
    assert taken is not None and taken.fence > granted.fence
    return request, taken, server


def test_a_grant_that_expired_on_the_wake_up_list_is_not_taken_later(url: str) -> None:
    holder, waiter, other = RedisAdapter(url), RedisAdapter(url), RedisAdapter(url)
    try:
        request, taken, _server = _granted_then_taken(holder, waiter, other)
        # The waiter runs again: queue, block. It must wait for the live holder.
        stale = waiter.acquire(request, 0.3)
        assert stale is None, f"took fence {stale.fence} while fence {taken.fence} is held"
        current = other.get("job")
        assert current is not None and current.token == taken.token
        # Its place in the queue is gone with it: the release is not handed to it.
        assert other.release("job", taken.token)
        assert waiter.get("job") is None
        assert not waiter.release("job", request.token)
    finally:
        for adapter in (holder, waiter, other):
            adapter.close()


def test_a_waiter_granted_while_between_steps_still_gets_its_live_lease(url: str) -> None:
    """The other side of the fix: a grant that is still live is taken, by either step."""
    holder, waiter = RedisAdapter(url), RedisAdapter(url)
    try:
        first = holder.try_acquire(Request.make("job", "a" * 32, 10.0))
        assert first is not None
        request = Request.make("job", "b" * 32, 10.0)
        lease, code, _look_by, _position, _member, _server = waiter._try(request, True)
        assert lease is None and code == 0
        assert holder.release("job", first.token)
        got = waiter.acquire(request, 1.0)
        assert got is not None and got.token == request.token and got.fence > first.fence
        assert waiter.release("job", request.token)
    finally:
        holder.close()
        waiter.close()



def test_a_grant_read_after_its_lease_ran_out_is_not_taken(url: str) -> None:
    """The waiter was stopped after the release pushed its grant and read it only after
    the lease ran out on the server and another client took the lock: it must not walk
    in beside that holder. Whether the grant ran out is judged by the server's clock at
    the waiter's last script plus the time that passed since, not by the local clock."""
    holder, waiter, other = RedisAdapter(url), RedisAdapter(url), RedisAdapter(url)
    try:
        request, _taken, server = _granted_then_taken(holder, waiter, other)
        pushed = waiter._block("job", waiter._signal("job", request.token), 1.0)
        assert pushed is not None, "the release's grant was not on the list"
        assert waiter._granted(request, pushed, server) is None
        # A grant read in time is taken as it is.
        live = Request.make("job", "d" * 32, 10.0)
        in_time = pushed.rsplit(" ", 1)[0] + " " + str(int((time.time() + 60) * 1e6))
        assert waiter._granted(live, in_time, server) is not None
    finally:
        for adapter in (holder, waiter, other):
            adapter.close()
