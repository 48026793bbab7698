"""Local security: private files, planted symlinks, directories others control, tokens, SQL.

Extends tests/test_input.py (which already covers the 0700/0600 modes of a new store,
a symlink at the database path or at a lock file, and a world-writable lock directory
for the file store) without repeating it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from actor import Actor

from brokerlock import BrokerLock, BrokerLockError, FileAdapter, SQLiteAdapter
from brokerlock._platform import HAVE_WITNESS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes, symlinks and other users")

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root, to act as or chown to the user nobody")


def _nobody() -> Any:
    import pwd

    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by nobody under /tmp (pytest's own tmp dirs are root's 0700)."""
    info = _nobody()
    path = Path(tempfile.mkdtemp(prefix="brokerlock-sec-"))
    os.chown(path, info.pw_uid, info.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _exercise(lock: BrokerLock) -> None:
    """Create every file a store makes: a hold, a waiter that times out, a release."""
    holder = lock.item("held", ttl="10s")
    holder.acquire()
    from brokerlock import LockTimeout

    with pytest.raises(LockTimeout):
        lock.item("held", timeout="50ms").acquire()
    holder.release()


# -- modes ------------------------------------------------------------------------------


def test_every_file_of_a_sqlite_store_is_private(tmp_path: Path) -> None:
    old = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        lock = BrokerLock(SQLiteAdapter(tmp_path / "a" / "b" / "locks.sqlite3"))
        _exercise(lock)
        made = sorted((tmp_path / "a" / "b").iterdir())
        assert {p.name for p in made} >= {"locks.sqlite3", "locks.sqlite3-wal"}
        assert ("locks.sqlite3-witness" in {p.name for p in made}) == HAVE_WITNESS
        for path in made:
            assert _mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(_mode(path)))
        assert _mode(tmp_path / "a" / "b") == 0o700
    finally:
        os.umask(old)


def test_every_file_of_a_file_store_is_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        lock = BrokerLock(FileAdapter(tmp_path / "locks"))
        _exercise(lock)
        for path in [tmp_path / "locks", *(tmp_path / "locks").rglob("*")]:
            assert _mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(_mode(path)))
    finally:
        os.umask(old)


# -- planted symlinks --------------------------------------------------------------------


@pytest.mark.parametrize(
    "store, planted",
    [
        ("sqlite", "locks.sqlite3-witness"),
        ("sqlite", "locks.sqlite3-wal"),
        ("sqlite", "locks.sqlite3-shm"),
        ("file", "witness"),
    ],
)
def test_planted_symlink_is_never_followed(store: str, planted: str, tmp_path: Path) -> None:
    """A symlink planted where the store will create a file: refused with a
    BrokerLockError, or at least never written through; the victim stays intact."""
    directory = tmp_path / "store"
    directory.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o644)
    (directory / planted).symlink_to(victim)

    def use() -> None:
        lock = BrokerLock(
            SQLiteAdapter(directory / "locks.sqlite3") if store == "sqlite" else FileAdapter(directory)
        )
        _exercise(lock)
        lock.close()

    try:
        use()
    except BrokerLockError as exc:
        assert "symbolic link" in str(exc) or "unable to open" in str(exc), exc
    assert victim.read_text() == "precious"
    assert _mode(victim) == 0o644


def test_planted_symlink_for_the_bells_directory_is_not_followed(tmp_path: Path) -> None:
    """Where waiters leave their wake-up files: a symlink there must not lead them elsewhere."""
    directory = tmp_path / "store"
    directory.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("bells", "locks.sqlite3-bells"):
        (directory / name).symlink_to(elsewhere)
    for adapter in (FileAdapter(directory), SQLiteAdapter(directory / "locks.sqlite3")):
        try:
            _exercise(BrokerLock(adapter))
        except BrokerLockError as exc:
            assert "symbolic link" in str(exc) or "not a directory" in str(exc), exc
    assert list(elsewhere.iterdir()) == []


# -- directories other users control ---------------------------------------------------


@needs_root
@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_directory_owned_by_another_user_is_refused(store: str, tmp_path: Path) -> None:
    info = _nobody()
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, info.pw_uid, info.pw_gid)
    make: Callable[[], Any] = (
        (lambda: SQLiteAdapter(directory / "locks.sqlite3"))
        if store == "sqlite"
        else (lambda: FileAdapter(directory))
    )
    with pytest.raises(BrokerLockError) as caught:
        make()
    message = str(caught.value)
    assert str(directory) in message and f"uid {info.pw_uid}" in message and "our own" in message
    assert list(directory.iterdir()) == [], "nothing may be created in a refused directory"


@needs_root
def test_symlink_to_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    info = _nobody()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, info.pw_uid, info.pw_gid)
    (tmp_path / "mine").symlink_to(theirs)
    with pytest.raises(BrokerLockError, match="belongs to uid"):
        FileAdapter(tmp_path / "mine")


def test_world_writable_database_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(BrokerLockError, match="world-writable") as caught:
        SQLiteAdapter(directory / "locks.sqlite3")
    assert "sticky" in str(caught.value)
    assert list(directory.iterdir()) == []
    directory.chmod(0o1777)  # as /tmp: others cannot remove or replace our files
    SQLiteAdapter(directory / "locks.sqlite3").close()


# -- another user, another client: the token --------------------------------------------


@needs_root
@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_another_user_cannot_reach_our_store(store: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db/locks.sqlite3" if store == "sqlite" else f"file://{tmp_path}/locks"
    lock = BrokerLock.from_url(url)
    item = lock.item("ours", ttl="30s")
    item.acquire()
    with Actor(url, user="nobody") as intruder:
        for command in ("open", "force ours", "try ours 1s"):
            status, message = intruder.do(command)
            assert status == "err" and message.startswith("BrokerLockError"), (command, message)
            assert "ermission" in message, message
    assert item.is_reserved()
    item.extend()
    item.release()


def _shared_url(kind: str, request: pytest.FixtureRequest, nobody_dir: Path) -> str:
    fresh = uuid.uuid4().hex[:12]
    if kind == "sqlite":
        return f"sqlite:///{nobody_dir}/db/locks.sqlite3"
    if kind == "file":
        return f"file://{nobody_dir}/locks"
    if kind == "redis":
        return f"{request.getfixturevalue('redis_server').url}?prefix=sec-{fresh}%3A"
    return f"{request.getfixturevalue('postgres_server').dsn}?table=sec_{fresh}"


@needs_root
@pytest.mark.parametrize("kind", ["sqlite", "file", "redis", "postgres"])
def test_without_the_token_nobody_releases_or_extends(
    kind: str, request: pytest.FixtureRequest, nobody_dir: Path
) -> None:
    """Two clients of one store (for the embedded ones: two processes of the user nobody,
    the only way both can reach it): release and extend with any other token fail, and
    the holder's lease is untouched. Breaking it takes ``force_release``, the store-level
    operation behind ``brokerlock release --force``."""
    url = _shared_url(kind, request, nobody_dir)
    with Actor(url, user="nobody") as holder, Actor(url, user="nobody") as other:
        assert holder.do("acquire job 30s 1s")[0] == "ok"
        status, token = holder.do("token job")
        assert status == "ok" and len(token) >= 32
        for guess in (secrets.token_hex(16), token[:-1] + ("0" if token[-1] != "0" else "1"), "", "%", "*"):
            if not guess:
                continue
            assert other.do(f"steal job {guess}") == ("ok", "False,False"), guess
        assert other.do("release job") == ("ok", "None")  # holds nothing: a no-op
        assert other.do("reserved job") == ("ok", "True")
        assert holder.do("extend job") == ("ok", "None")
        assert other.do("force job") == ("ok", "True")
        assert holder.do("extend job")[1].startswith("LockLost")


def test_release_force_is_documented_as_the_override() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
    assert "release --force" in readme


# -- SQL is parameterised ----------------------------------------------------------------

SQL_NAMES = [
    "?", "??", ":name", ":token", "%s", "%(name)s", "%(token)s", "$1", "{}", "{name}", "\\",
    "'", "''", '"', "x'); DROP TABLE brokerlock_locks; --", "brokerlock_locks", "*", "%", "_",
    "a' OR '1'='1", "\\x27", "';--", "/* */", "\u2019",
]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_placeholder_and_quote_names_are_distinct_locks(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if kind == "sqlite":
        lock = BrokerLock(SQLiteAdapter(tmp_path / "locks.sqlite3"))
    else:
        server = request.getfixturevalue("postgres_server")
        lock = BrokerLock.from_url(f"{server.dsn}?table=sql_{uuid.uuid4().hex[:12]}")
    items = [lock.item(name, ttl="30s", timeout=0) for name in SQL_NAMES]
    for item in items:
        assert item.try_acquire() is item, item.name
    assert sorted(lease.name for lease in lock.adapter.list()) == sorted(SQL_NAMES)
    for item in items:
        assert lock.adapter.get(item.name).token == item.lease.token  # type: ignore[union-attr]
        item.release()
    assert lock.adapter.list() == []
    lock.close()


def test_postgres_statements_never_carry_the_name(request: pytest.FixtureRequest) -> None:
    """The server sees ``$n`` placeholders, not our values: the last statement of every
    brokerlock session, as PostgreSQL recorded it, never contains the name."""
    import psycopg

    server = request.getfixturevalue("postgres_server")
    table = f"sql_{uuid.uuid4().hex[:12]}"
    marker = f"zz'marker-{uuid.uuid4().hex}"
    lock = BrokerLock.from_url(f"{server.dsn}?table={table}")
    seen = []
    with psycopg.connect(server.dsn, autocommit=True) as observer:
        item = lock.item(marker, ttl="30s", timeout=0)
        for step in (item.acquire, item.extend, item.is_reserved, lock.adapter.list, item.release):
            step()
            rows = observer.execute(
                "SELECT query FROM pg_stat_activity WHERE application_name = 'brokerlock'"
            ).fetchall()
            seen.extend(row[0] for row in rows)
    lock.close()
    assert any(table in query for query in seen), seen  # we did look at our statements
    assert not [q for q in seen if "marker" in q], "a lock name was spliced into SQL"


# -- group-shared directories (the multi-user tests: tests/test_shared_store.py) ---------


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_a_group_shared_directory_gets_group_files_whatever_the_umask(store: str, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    old = os.umask(0o077)
    try:
        lock = BrokerLock(
            SQLiteAdapter(shared / "locks.sqlite3") if store == "sqlite" else FileAdapter(shared / "files")
        )
        _exercise(lock)
        made = list(shared.rglob("*"))
        assert made
        for path in made:
            assert path.stat().st_gid == shared.stat().st_gid, path
            assert _mode(path) == (0o2770 if path.is_dir() else 0o660), (path, oct(_mode(path)))
        lock.close()
    finally:
        os.umask(old)


def test_a_group_shared_directory_open_to_the_world_is_still_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o2777)
    with pytest.raises(BrokerLockError, match="world-writable"):
        SQLiteAdapter(directory / "locks.sqlite3")
    assert list(directory.iterdir()) == []
