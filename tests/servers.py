"""Private Redis and PostgreSQL servers for the tests: real servers, never mocks.

Each runs on a free loopback port in a temp directory for the whole session, and is
stopped at the end. Without the binaries the tests skip on a developer machine and
fail in CI (see ``stores.need``). As root, PostgreSQL runs as the ``postgres`` user
(it refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest
from stores import SKIP_SERVERS, need

try:
    import pwd
except ImportError:  # Windows: the server tests skip there (BROKERLOCK_SKIP_SERVERS)
    pwd = None  # type: ignore[assignment]

READY_WITHIN = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process on a fixed port that can be stopped and started again."""

    name = "server"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.log = os.path.join(workdir, f"{self.name}.log")

    def command(self) -> List[str]:
        raise NotImplementedError

    def popen_options(self) -> Dict[str, Any]:
        return {}

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, **self.popen_options(),
            )
        deadline = time.monotonic() + READY_WITHIN
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready within {READY_WITHIN}s:\n{self.tail()}")
            time.sleep(0.01)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return ""


class RedisServer(Server):
    name = "redis-server"

    def __init__(self, binary: str, workdir: str) -> None:
        super().__init__(workdir)
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> List[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no",
        ]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def postgres_bindir() -> Optional[str]:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return os.path.dirname(found[-1])
    binary = shutil.which("postgres")
    return os.path.dirname(binary) if binary else None


class PostgresServer(Server):
    name = "postgres"

    def __init__(self, bindir: str, workdir: str, user: Optional[str]) -> None:
        super().__init__(workdir)
        self.bindir = bindir
        self.user = user
        self.data = os.path.join(workdir, "data")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def popen_options(self) -> Dict[str, Any]:
        if self.user is None:
            return {}
        info = pwd.getpwnam(self.user)
        return {"user": info.pw_uid, "group": info.pw_gid, "extra_groups": []}

    def initdb(self) -> None:
        subprocess.run(
            [os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres",
             "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.workdir,
            **self.popen_options(),
        )

    def command(self) -> List[str]:
        return [
            os.path.join(self.bindir, "postgres"), "-D", self.data, "-k", self.workdir,
            "-h", "127.0.0.1", "-p", str(self.port),
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=300", "-c", "shared_buffers=32MB",
        ]

    def stop(self, sig: int = signal.SIGINT) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: it ends every session, as a restart does.
        super().stop(sig)

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False


def _workdir(owner: Optional[str]) -> str:
    # Under /tmp rather than pytest's tmp_path: the postgres user must be able to reach it.
    path = tempfile.mkdtemp(prefix="brokerlock-test-")
    if owner is not None:
        info = pwd.getpwnam(owner)
        os.chown(path, info.pw_uid, info.pw_gid)
    return path


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if SKIP_SERVERS:
        pytest.skip("BROKERLOCK_SKIP_SERVERS is set: no server tests on this platform")
    binary = shutil.which("redis-server")
    if binary is None:
        need("redis-server", "install it (apt-get install redis-server) to run the Redis tests")
    try:
        import redis  # noqa: F401
    except ImportError:
        need("the redis package", "pip install brokerlock[redis]")
    assert binary is not None
    workdir = _workdir(None)
    server = RedisServer(binary, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if SKIP_SERVERS:
        pytest.skip("BROKERLOCK_SKIP_SERVERS is set: no server tests on this platform")
    bindir = postgres_bindir()
    if bindir is None or not os.path.exists(os.path.join(bindir, "initdb")):
        need("PostgreSQL", "install it (apt-get install postgresql) to run the PostgreSQL tests")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        need("the psycopg package", "pip install brokerlock[postgres]")
    assert bindir is not None
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            need("a 'postgres' system user", "PostgreSQL refuses to run as root; create the user")
        user = "postgres"
    workdir = _workdir(user)
    server = PostgresServer(bindir, workdir, user)
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class PgBouncer(Server):
    """pgbouncer in front of the test PostgreSQL, in the given pool mode."""

    name = "pgbouncer"

    def __init__(self, binary: str, workdir: str, postgres: PostgresServer, mode: str) -> None:
        super().__init__(workdir)
        self.binary, self.postgres, self.mode = binary, postgres, mode
        self.name = f"pgbouncer-{mode}"
        self.log = os.path.join(workdir, f"{self.name}.log")
        self.config = os.path.join(workdir, f"{self.name}.ini")
        users = os.path.join(workdir, "users.txt")
        with open(users, "w") as f:
            f.write('"postgres" ""\n')
        with open(self.config, "w") as f:
            f.write(
                "[databases]\n"
                f"postgres = host=127.0.0.1 port={postgres.port} dbname=postgres user=postgres\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                f"auth_type = trust\nauth_file = {users}\npool_mode = {mode}\n"
                "default_pool_size = 10\nmax_client_conn = 200\n"
                "ignore_startup_parameters = extra_float_digits,options\n"
            )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def popen_options(self) -> Dict[str, Any]:
        return self.postgres.popen_options()  # (pgbouncer refuses to run as root too)

    def command(self) -> List[str]:
        return [self.binary, self.config]

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False


@pytest.fixture(scope="session", params=["transaction", "session"])
def pgbouncer(request: pytest.FixtureRequest, postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """pgbouncer (Debian's package) in transaction mode, then in session mode."""
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if binary is None:
        need("pgbouncer", "install it (apt-get install pgbouncer) to run the pooler tests")
    assert binary is not None
    workdir = _workdir(postgres_server.user)
    bouncer = PgBouncer(binary, workdir, postgres_server, request.param)
    if postgres_server.user is not None:
        info = pwd.getpwnam(postgres_server.user)
        for path in (bouncer.config, os.path.join(workdir, "users.txt")):
            os.chown(path, info.pw_uid, info.pw_gid)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
