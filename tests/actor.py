"""A lock client in another process (optionally as another user), driven line by line.

``python actor.py URL`` reads commands on stdin and answers one line each on stdout:

``acquire NAME TTL TIMEOUT`` / ``try NAME TTL`` / ``extend NAME`` / ``release NAME`` /
``force NAME`` / ``reserved NAME`` / ``token NAME`` / ``steal NAME TOKEN``
    answered ``ok <value>`` or ``err <ExceptionType> <message>``.

Used by the fault and security tests to act as a second process or a second user
(``subprocess.Popen(..., user="nobody")``) at chosen moments.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Dict, Optional, Sequence, Tuple


def serve(url: str, user: Optional[str] = None) -> None:
    from brokerlock import BrokerLock, BrokerLockItem

    if user is not None:
        # Become the other user only now: the interpreter and brokerlock may live where
        # that user cannot read (/root), so everything the store needs is imported first.
        import os
        import pwd
        import sqlite3  # noqa: F401

        import humanfriendly  # noqa: F401

        import brokerlock.adapters.file
        import brokerlock.adapters.sqlite  # noqa: F401

        drivers = ("redis", "psycopg", "brokerlock.adapters.redis", "brokerlock.adapters.postgres")
        for driver in ("encodings.idna", *drivers):
            try:
                __import__(driver)
            except ImportError:
                pass

        info = pwd.getpwnam(user)
        os.setgroups([])
        os.setgid(info.pw_gid)
        os.setuid(info.pw_uid)

    lock: Optional[BrokerLock] = None
    items: Dict[str, BrokerLockItem] = {}

    def store() -> BrokerLock:
        nonlocal lock
        if lock is None:  # opened lazily, so that opening can fail as a command
            lock = BrokerLock.from_url(url)
        return lock

    for line in sys.stdin:
        command, *args = line.split()
        try:
            value: Any = None
            if command == "open":
                store()
            elif command == "acquire":
                name, ttl, timeout = args
                items[name] = store().item(name, ttl=ttl, timeout=timeout)
                value = items[name].acquire().fence
            elif command == "try":
                name, ttl = args
                items[name] = store().item(name, ttl=ttl, timeout=0)
                got = items[name].try_acquire()
                value = None if got is None else got.fence
            elif command == "extend":
                items.setdefault(args[0], store().item(args[0])).extend()
            elif command == "release":
                items.setdefault(args[0], store().item(args[0])).release()
            elif command == "force":
                value = store().adapter.force_release(args[0])
            elif command == "reserved":
                value = store().item(args[0]).is_reserved()
            elif command == "token":
                lease = items[args[0]].lease
                value = None if lease is None else lease.token
            elif command == "steal":
                # What a hostile client can do with the store's own operations and a
                # token it guessed or read: release and extend someone else's lease.
                name, token = args
                adapter = store().adapter
                value = f"{adapter.release(name, token)},{adapter.extend(name, token, 3600.0) is not None}"
            else:
                raise ValueError(f"unknown command {command!r}")
            reply = f"ok {value}"
        except Exception as exc:  # reported to the test, which decides
            reply = f"err {type(exc).__name__} {str(exc).splitlines()[0] if str(exc) else ''}"
        print(reply, flush=True)


class Actor:
    """The test's side: ``actor.do("acquire job 30s 1s") -> ("ok", "3")``."""

    def __init__(self, url: str, user: Optional[str] = None, cwd: Optional[str] = None) -> None:
        import os

        env = dict(os.environ)
        # The child must import brokerlock from this tree even as another user.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("XDG_STATE_HOME", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__), url, *([user] if user else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd or "/",
        )

    def do(self, command: str) -> Tuple[str, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"actor died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        status, _, rest = line.rstrip("\n").partition(" ")
        return status, rest

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Actor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(url: str, commands: Sequence[str], user: Optional[str] = None) -> list:  # type: ignore[type-arg]
    with Actor(url, user=user) as actor:
        return [actor.do(c) for c in commands]


if __name__ == "__main__":
    serve(*sys.argv[1:])
