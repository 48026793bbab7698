"""What one-off names leave behind in a store (issue 17).

    python benchmarks/one_off_names.py                    # 100,000 names, file and sqlite
    python benchmarks/one_off_names.py --names 2000 --backends file,sqlite,redis,postgres

Date-stamped, per-user or per-tenant names (``report-2026-12-07``) are each acquired
and released once. For each back end this acquires and releases ``--names`` distinct
names, twice over (a second run with new names must not grow the store), and reports
the records left, the store's size and how long ``brokerlock list`` takes in a new
process. Targets: at most 1,000 records left, ``list`` under 100 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

MAX_RECORDS = 1000
MAX_LIST_SECONDS = 0.1


def _size(path: str) -> int:
    """Bytes a file or directory tree takes on disk (blocks, as ``du`` counts)."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    total = os.stat(path).st_blocks * 512
    for top, dirs, files in os.walk(path):
        for entry in dirs + files:
            try:
                total += os.lstat(os.path.join(top, entry)).st_blocks * 512
            except OSError:
                pass
    return total


def _records_and_size(url: str, adapter: Any) -> Dict[str, int]:
    kind = type(adapter).__name__
    if kind == "FileAdapter":
        names = [e for e in os.listdir(adapter.directory) if e.endswith(".lock")]
        return {"records": len(names), "bytes": _size(adapter.directory)}
    if kind == "SQLiteAdapter":
        import sqlite3

        with sqlite3.connect(adapter.path) as conn:
            count = conn.execute("SELECT count(*) FROM brokerlock_locks").fetchone()[0]
        size = sum(_size(adapter.path + s) for s in ("", "-wal") if os.path.exists(adapter.path + s))
        return {"records": int(count), "bytes": size}
    if kind == "RedisAdapter":
        client = adapter._client
        keys = sum(1 for _ in client.scan_iter(match=adapter.prefix + "*", count=1000))
        return {"records": keys, "bytes": int(client.info("memory")["used_memory"])}
    if kind == "PostgresAdapter":

        def count(conn: Any) -> Any:
            table = adapter._ident.as_string(conn)
            return conn.execute(
                f"SELECT count(*) FILTER (WHERE name <> ''), pg_total_relation_size('{table}') FROM {table}"
            ).fetchone()

        records, size = adapter._run("count", count)
        return {"records": int(records), "bytes": int(size)}
    raise ValueError(f"cannot count the records of {kind}")


def _list_seconds(url: str, runs: int = 3) -> float:
    """Wall time of ``brokerlock list`` in a new process (median of ``runs``)."""
    script = os.path.join(sysconfig.get_path("scripts"), "brokerlock")
    argv = [script] if os.path.exists(script) else [sys.executable, "-m", "brokerlock"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([*argv, "list", "--url", url], env=env, capture_output=True, check=False)  # warm
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run([*argv, "list", "--url", url], env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(f"brokerlock list failed: {done.stderr.decode(errors='replace')[-300:]}")
    return sorted(times)[len(times) // 2]


def _python_seconds(runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=False)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(url: str, names: int) -> Dict[str, Any]:
    """Acquire and release ``names`` one-off names twice over; what the store holds."""
    from brokerlock import BrokerLock

    lock = BrokerLock.from_url(url)
    try:
        out: Dict[str, Any] = {"url": url.split("?")[0], "names": names, "runs": []}
        for _run in range(2):
            stamp = uuid.uuid4().hex[:8]
            t0 = time.perf_counter()
            for i in range(names):
                item = lock.item(f"report-{stamp}-{i}", ttl=60)
                item.acquire()
                item.release()
            per_name = (time.perf_counter() - t0) / names
            out["runs"].append({**_records_and_size(url, lock.adapter), "us_per_name": per_name * 1e6})
        t0 = time.perf_counter()
        lock.adapter.list()
        out["list_call_s"] = time.perf_counter() - t0
        out["list_s"] = _list_seconds(url)
        out["python_s"] = _python_seconds()
        if type(lock.adapter).__name__ in ("FileAdapter", "SQLiteAdapter"):
            # These keep the records of the names an adapter freed last, until it is
            # closed (docs/frugality.rst): count what closing leaves too.
            lock.close()
            out["records_closed"] = _records_and_size(url, lock.adapter)["records"]
        first, second = out["runs"]
        out["records"] = second["records"]
        out["grew_bytes"] = second["bytes"] - first["bytes"]
        out["ok"] = out["records"] <= MAX_RECORDS and out["list_s"] < MAX_LIST_SECONDS
        return out
    finally:
        lock.close()


def describe(family: str, r: Dict[str, Any]) -> str:
    first, second = r["runs"]
    closed = f" ({r['records_closed']:,} once closed)" if "records_closed" in r else ""
    return (
        f"{family:9s} {r['names']:,} names x2: {second['records']:,} records left{closed}, "
        f"{second['bytes'] / 1e6:.2f} MB (first run {first['bytes'] / 1e6:.2f} MB), "
        f"{second['us_per_name']:.0f} us per name; brokerlock list {r['list_s'] * 1e3:.0f} ms "
        f"(python -c pass {r['python_s'] * 1e3:.0f} ms; adapter.list() {r['list_call_s'] * 1e3:.1f} ms)"
        f" -> {'meets' if r['ok'] else 'MISSES'} (<= {MAX_RECORDS:,} records, list < "
        f"{MAX_LIST_SECONDS * 1e3:.0f} ms)"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--backends", default="file,sqlite")
    args = parser.parse_args(argv)
    families = [f for f in args.backends.split(",") if f]
    workdir = tempfile.mkdtemp(prefix="brokerlock-oneoff-")
    started: List[Any] = []
    failed = False
    try:
        for family in families:
            if family == "file":
                url = "file://" + os.path.join(workdir, "files")
            elif family == "sqlite":
                url = "sqlite:///" + os.path.join(workdir, "locks.sqlite3")
            elif family in ("redis", "postgres"):
                import servers

                server, why = (servers.start_redis if family == "redis" else servers.start_postgres)()
                if server is None:
                    print(f"{family}: n/a ({why})")
                    continue
                started.append(server)
                url = server.url
            else:
                parser.error(f"unknown back end {family!r}")
            result = measure(url, args.names)
            failed |= not result["ok"]
            print(describe(family, result), flush=True)
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
