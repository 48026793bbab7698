"""PostgreSQL behind pgbouncer (a real one, started by the fixture): in transaction
pooling mode brokerlock cannot keep its sessions, and says so, naming the pooler and
what to do; in session mode it works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from servers import PgBouncer

from brokerlock import BrokerLock, BrokerLockError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pgbouncer runs on the Linux CI")


def _cli(bouncer: PgBouncer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERLOCK_")}
    return subprocess.run(
        [sys.executable, "-m", "brokerlock", *args[:1], "--url", f"{bouncer.dsn}?table=pooled", *args[1:]],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_transaction_pooling_is_named_with_what_to_do(pgbouncer: PgBouncer) -> None:
    lock = BrokerLock.from_url(f"{pgbouncer.dsn}?table=pooled")
    try:
        if pgbouncer.mode == "session":
            with lock.item("job", ttl="30s", timeout="5s"):
                assert lock.item("job").is_reserved()
            return
        with pytest.raises(BrokerLockError) as caught:
            lock.item("job", ttl="30s", timeout="5s").acquire()
    finally:
        lock.close()
    message = str(caught.value)
    assert "pgbouncer" in message and "transaction pooling" in message, message
    assert "session mode" in message and "directly" in message, message


def test_the_command_line_says_it_in_one_line(pgbouncer: PgBouncer) -> None:
    done = _cli(pgbouncer, "run", "--timeout", "5s", "job", "--", "true")
    if pgbouncer.mode == "session":
        assert done.returncode == 0, done
        return
    assert done.returncode == 2, done
    line = done.stderr.strip()
    assert "\n" not in line and "pgbouncer" in line and "pool_mode = session" in line, line
