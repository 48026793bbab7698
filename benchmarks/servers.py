"""Private Redis and PostgreSQL servers on free 127.0.0.1 ports, for one benchmark run.

Nothing here touches a server someone else runs: each server lives in a temporary
directory and is stopped (and the directory removed) when the run ends. When a server
cannot be started, :func:`start_redis`/:func:`start_postgres` return ``None`` with the
reason, and the run prints n/a for the rows that need it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, name: str, url: str, proc: subprocess.Popen[bytes], directory: str) -> None:
        self.name, self.url, self.proc, self.directory = name, url, proc, directory

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown; Redis exits on it too.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _wait_ready(check: Callable[[], bool], proc: subprocess.Popen[bytes], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if check():
                return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


def start_redis() -> Tuple[Optional[Server], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        return None, "redis-server is not installed"
    directory = tempfile.mkdtemp(prefix="brokerlock-bench-redis-")
    port = free_port()
    log = open(os.path.join(directory, "log"), "wb")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
            "--protected-mode",
            "yes",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def ping() -> bool:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    server = Server("redis", url, proc, directory)
    if not _wait_ready(ping, proc, 15):
        server.stop()
        return None, "redis-server did not start"
    return server, ""


def _pg_bin() -> Optional[str]:
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    candidates: List[str] = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return os.path.dirname(candidates[0]) if candidates else None


def start_postgres() -> Tuple[Optional[Server], str]:
    bindir = _pg_bin()
    if bindir is None:
        return None, "PostgreSQL's initdb was not found"
    directory = tempfile.mkdtemp(prefix="brokerlock-bench-pg-")
    as_user: Dict[str, Any] = {}
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as the postgres user. Through Popen's
        # user/group rather than runuser, so that the process we signal to stop is
        # postgres itself and not a wrapper that would leave it running.
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(directory, ignore_errors=True)
            return None, "running as root and there is no postgres user to run PostgreSQL as"
        os.chown(directory, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    data = os.path.join(directory, "data")
    init = subprocess.run(
        [
            os.path.join(bindir, "initdb"),
            "-D",
            data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=directory,
        **as_user,
    )
    if init.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        return None, "initdb failed: " + init.stdout.decode(errors="replace")[-300:]
    port = free_port()
    # The same settings as the test suite's server (tests/servers.py). fsync off: a lock
    # server's leases need not survive a power cut of the server for a
    # benchmark, and it measures locking rather than this machine's disk. Every
    # PostgreSQL row below runs on the same server with the same settings.
    proc = subprocess.Popen(
        [
            os.path.join(bindir, "postgres"),
            "-D",
            data,
            "-p",
            str(port),
            "-k",
            directory,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=100",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=directory,
        **as_user,
    )
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def connect() -> bool:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() is not None

    server = Server("postgres", dsn, proc, directory)
    if not _wait_ready(connect, proc, 30):
        server.stop()
        return None, "postgres did not start"
    return server, ""


#: Deepkit's broker, the system brokerlock was ported from (issue 17), pinned.
DEEPKIT_PACKAGES = ["@deepkit/broker@1.0.19", "@deepkit/rpc-tcp@1.0.19"]
DEEPKIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepkit_broker.js")


def deepkit_modules() -> Tuple[Optional[str], str]:
    """The node_modules folder with Deepkit's broker, installed with npm on first use
    into a cache folder outside the repository (``$BROKERLOCK_BENCH_CACHE``, else
    ``$XDG_CACHE_HOME/brokerlock-bench`` or ``~/.cache/brokerlock-bench``)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, "node and npm are not installed"
    cache = os.environ.get("BROKERLOCK_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "brokerlock-bench"
    )
    folder = os.path.join(cache, "deepkit-1.0.19")
    modules = os.path.join(folder, "node_modules")
    if os.path.exists(os.path.join(modules, "@deepkit", "rpc-tcp", "package.json")):
        return modules, ""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "package.json"), "w") as f:
        f.write('{"name": "brokerlock-bench-deepkit", "private": true}\n')
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", *DEEPKIT_PACKAGES],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600, check=False,
    )
    if done.returncode != 0:
        return None, "npm install failed: " + done.stdout.decode(errors="replace")[-300:]
    return modules, ""


def start_deepkit() -> Tuple[Optional[Server], str]:
    """BrokerKernel behind RpcTcpServer on a free loopback port; ``url`` is the port."""
    modules, why = deepkit_modules()
    if modules is None:
        return None, why
    directory = tempfile.mkdtemp(prefix="brokerlock-bench-deepkit-")
    port = free_port()
    proc = subprocess.Popen(
        ["node", DEEPKIT_SCRIPT, "server", str(port)],
        env={**os.environ, "NODE_PATH": modules}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=directory,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode(errors="replace").strip()
    server = Server("deepkit", str(port), proc, directory)
    if line != "listening":
        server.stop()
        return None, f"Deepkit's broker did not start: {line[-300:]}"
    return server, ""
