"""A PostgreSQL acquire that waits on a release which deletes the name's row.

Each statement of ours runs on a snapshot taken when it starts. A newcomer whose
statement starts while a release is deleting the row (nobody waits, so the row goes)
waits for that release and then inserts a fresh row. If that insert used what its
snapshot saw, a lease taken and released by someone else meanwhile would be missing
from its fence floor and its clock: a fence lower than the last holder's, and a lease
that seems to begin before the previous one ended (tests/chaos saw both). The
interleaving is set up here by hand, with a release held open in a transaction.
Real server, nothing mocked.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Iterator, List, Optional

import pytest

from brokerlock import PostgresAdapter
from brokerlock.adapters.base import Lease, Request
from brokerlock.adapters.postgres import sql as statements
from brokerlock.adapters.postgres.listen import CHANNEL_PREFIX
from brokerlock.adapters.postgres.url import table_parts


@pytest.fixture
def adapter(postgres_server: Any) -> Iterator[PostgresAdapter]:
    store = PostgresAdapter(f"{postgres_server.dsn}?table=f_{uuid.uuid4().hex[:12]}")
    yield store
    store.close()


def _render(adapter: PostgresAdapter, text: str, conn: Any) -> Any:
    from psycopg import sql

    parts = table_parts(adapter.table)
    queue = sql.Identifier(*parts[:-1], parts[-1] + "_queue")
    return sql.SQL(text).format(t=sql.Identifier(*parts), q=queue)


def _waiting_on_a_lock(conn: Any, backends: int) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    ).fetchone()
    return bool(row and row[0] >= backends)


def test_a_newcomer_waiting_on_a_deleting_release_gets_a_higher_fence(
    adapter: PostgresAdapter, postgres_server: Any
) -> None:
    import psycopg

    first = Request.make("job", uuid.uuid4().hex, 60.0)
    held = adapter.try_acquire(first)
    assert held is not None
    other = psycopg.connect(postgres_server.dsn)  # a transaction of its own, kept open
    watcher = psycopg.connect(postgres_server.dsn, autocommit=True)
    try:
        release = _render(adapter, statements.RELEASE, other)
        take = _render(adapter, statements.TAKE, other)
        # The holder releases (nobody waits: the row is deleted), inside a transaction
        # that stays open, so the row is gone but not yet for others.
        other.execute(release, {"name": "job", "token": first.token, "prefix": CHANNEL_PREFIX})

        got: List[Optional[Lease]] = []
        newcomer = threading.Thread(
            target=lambda: got.append(adapter.try_acquire(Request.make("job", uuid.uuid4().hex, 60.0)))
        )
        newcomer.start()
        # Its statement has its snapshot (the row still there) and waits for the release.
        deadline = time.monotonic() + 10
        while not _waiting_on_a_lock(watcher, 1):
            assert time.monotonic() < deadline, "the newcomer never waited for the release"
            time.sleep(0.005)
        # Meanwhile, in the same transaction, someone takes the lock anew and releases
        # it: a fence above everything the newcomer's snapshot knows, deleted again.
        middle = Request.make("job", uuid.uuid4().hex, 60.0)
        presence = adapter._presence.current()
        row = other.execute(
            take,
            {
                "name": "job", "token": middle.token, "ttl": 60.0, "host": middle.host,
                "pid": middle.pid, "thread": middle.thread, "holder": presence,
            },
        ).fetchone()
        assert row is not None and row[0] is True, row
        middle_fence = int(row[1])
        other.execute(release, {"name": "job", "token": middle.token, "prefix": CHANNEL_PREFIX})
        other.commit()
        newcomer.join(timeout=10)
        assert not newcomer.is_alive()
    finally:
        other.close()
        watcher.close()
    assert len(got) == 1 and got[0] is not None
    lease = got[0]
    assert middle_fence > held.fence
    # Fences only grow, in the order the lock was held; and the newcomer's lease did
    # not begin before the middle one ended.
    assert lease.fence > middle_fence, (held.fence, middle_fence, lease.fence)
    assert lease.acquired_at * 1_000_000 >= middle_fence - 1
