"""Hostile input, property-based: names, durations and URLs.

The property everywhere: either a working lock, or ``ValueError``/``TypeError`` naming
the input; never another exception, and never a file outside the lock directory.
Example counts are bounded so the file runs in well under a minute.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Set
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stores import needs_flock

from brokerlock import BrokerLock, FileAdapter, LockLost, MemoryAdapter, SQLiteAdapter
from brokerlock._platform import WAKEUP
from brokerlock.durations import MAX_SECONDS, parse_duration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

from fuzz_parsers import check_one, stubbed_stores

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

#: Every code point, surrogates and NUL included.
any_char = st.characters(codec=None, categories=None)
any_text = st.text(any_char, max_size=64)
path_like = st.lists(
    st.sampled_from(["..", ".", "/", "\\", "~", "a", "etc", "passwd", "%2e", "\x00", ":", "C:", "//", " "]),
    min_size=1, max_size=8,
).map("".join)
huge = st.sampled_from(["x" * 4096, "é" * 2048, "x" * 4097, "🔒" * 1025, "y" * 100_000, "\ud800" * 10])
nasty = st.text(
    st.sampled_from(
        ["\ud800", "\udcff", "\x00", "\x01", "a", "/", ".", "\\", "'", '"', ";", "%", "\n", "é", "🔒"]
    ),
    min_size=1, max_size=20,
)
names = st.one_of(any_text, nasty, path_like, huge, st.just(""))


def _tree(root: Path) -> Set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}  # "/" on Windows too


@pytest.fixture(params=["memory", "sqlite", pytest.param("file", marks=needs_flock), "redis", "postgres"])
def hostile_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerLock]:
    fresh = uuid.uuid4().hex[:12]
    if request.param == "memory":
        lock = BrokerLock(MemoryAdapter())
    elif request.param == "sqlite":
        lock = BrokerLock(SQLiteAdapter(tmp_path / "store" / "locks.sqlite3"))
    elif request.param == "file":
        lock = BrokerLock(FileAdapter(tmp_path / "store"))
    elif request.param == "redis":
        server = request.getfixturevalue("redis_server")
        lock = BrokerLock.from_url(f"{server.url}?prefix=hostile-{fresh}%3A")
    else:
        server = request.getfixturevalue("postgres_server")
        lock = BrokerLock.from_url(f"{server.dsn}?table=hostile_{fresh}")
    before = _tree(tmp_path)
    yield lock
    lock.close()
    # Nothing outside the store's own directory, whatever the names were.
    outside = {p for p in _tree(tmp_path) - before if not p.startswith("store")}
    assert not outside, f"files created outside the lock directory: {sorted(outside)[:5]}"


@given(name=names)
@settings(SETTINGS, max_examples=120)
def test_any_name_is_a_lock_or_a_value_error(hostile_store: BrokerLock, name: Any) -> None:
    try:
        item = hostile_store.item(name, ttl="30s", timeout=0)
    except (ValueError, TypeError) as exc:
        assert str(exc)
        return
    assert item.try_acquire() is item, f"a free name could not be taken: {name!r}"
    assert item.is_reserved()
    leases = [lease for lease in hostile_store.adapter.list() if lease.name == name]
    assert len(leases) == 1 and leases[0].token == item.lease.token  # type: ignore[union-attr]
    item.release()
    assert not item.is_reserved()


@given(name=st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text()), st.floats()))
@settings(SETTINGS, max_examples=30)
def test_non_str_names_are_type_errors(name: Any) -> None:
    with pytest.raises(TypeError):
        BrokerLock(MemoryAdapter()).item(name)


@needs_flock
def test_file_names_never_leave_the_directory(tmp_path: Path) -> None:
    """The file store on its own, with the nastiest path-like names."""
    directory = tmp_path / "store"
    lock = BrokerLock(FileAdapter(directory))
    for name in ["../../x", "/etc/shadow", "..", ".", "a/../../b", "\\..\\..\\x", "~/.ssh/id", "x" * 4096]:
        with lock.item(name).hold():
            pass
    # (On the FIFO path a holder's liveness FIFO lies in the store's bells directory.)
    inside = {directory, directory / "bells"} if WAKEUP == "fifo" else {directory}
    assert {p.parent for p in tmp_path.rglob("*") if p.parent != tmp_path} <= inside


# -- durations --------------------------------------------------------------------------

unit = st.sampled_from(["", "s", "ms", "m", "h", "d", "w", "sec", "minutes", " hours", "parsecs", "y", "µs"])
duration_text = st.one_of(
    any_text,
    st.builds(lambda n, u: f"{n}{u}", st.floats(allow_nan=True, allow_infinity=True), unit),
    st.builds(lambda n, u: f"{n}{u}", st.integers(min_value=-(10**30), max_value=10**30), unit),
    st.sampled_from(
        ["1e999s", "-0", "0x10", "\u0661\u0662s", "1_000", "1,5s", "NaN", "--1", "1 2 3", " ", "5 " * 1000]
    ),
)
durations = st.one_of(
    st.floats(),  # every float: NaN, infinities, subnormals, -0.0
    st.integers(min_value=-(10**400), max_value=10**400),
    duration_text,
    st.timedeltas(),
    st.booleans(),
    st.none(),
    st.binary(max_size=8),
    st.just(object()),
    st.complex_numbers(max_magnitude=10),
)


@given(value=durations)
@settings(SETTINGS, max_examples=400)
def test_any_duration_is_seconds_or_a_value_error(value: Any) -> None:
    try:
        seconds = parse_duration(value, "ttl")
    except (ValueError, TypeError) as exc:
        assert "ttl" in str(exc)
        return
    if value is None:
        assert seconds is None
        return
    assert isinstance(seconds, float) and math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS


@given(ttl=durations, timeout=durations)
@settings(SETTINGS, max_examples=150)
def test_any_ttl_and_timeout_make_a_working_item_or_a_value_error(ttl: Any, timeout: Any) -> None:
    lock = BrokerLock(MemoryAdapter())
    try:
        item = lock.item("d", ttl=ttl, timeout=timeout)
    except (ValueError, TypeError):
        return
    if item.timeout is not None and item.timeout > 1:
        item = lock.item("d", ttl=ttl, timeout=1)  # a wait cannot happen here anyway
    assert item.try_acquire() is item
    try:
        item.release()
    except LockLost:
        # Only a lease so short that it ended before its release may be lost.
        assert item.ttl is not None and item.ttl < 1, item.ttl


def test_extreme_durations() -> None:
    assert parse_duration(0) == 0.0
    assert parse_duration(5e-324) == 5e-324
    assert parse_duration(-0.0) == 0.0
    for bad in [10**400, -(10**400), timedelta.max, timedelta.min, "1e999s", float("nan")]:
        with pytest.raises(ValueError):
            parse_duration(bad)


# -- URLs -------------------------------------------------------------------------------

schemes = st.sampled_from(
    ["sqlite", "file", "memory", "redis", "rediss", "postgresql", "postgres", "SQLITE", "ftp", "", "c"]
)
url_tail = st.one_of(any_text, path_like, st.text("/:@?#%[]0123456789abc=&.", max_size=30))
urls = st.one_of(
    any_text,
    st.builds(lambda s, t: f"{s}://{t}", schemes, url_tail),
    st.builds(lambda s, t: f"{s}:{t}", schemes, url_tail),
)


@given(url=urls)
@settings(SETTINGS, max_examples=300)
def test_any_url_is_a_store_or_a_value_error(url: str) -> None:
    """The URL parser alone: constructors that would touch disk or network are stubbed."""
    from brokerlock.urls import adapter_from_url

    with stubbed_stores():
        try:
            adapter_from_url(url)
        except (ValueError, TypeError):
            pass


@given(url=st.one_of(st.none(), st.integers(), st.binary(), st.just(Path("/x"))))
@settings(SETTINGS, max_examples=20)
def test_non_str_urls_are_type_errors(url: Any) -> None:
    with pytest.raises(TypeError):
        BrokerLock.from_url(url)


@given(tail=st.one_of(path_like, st.text("abc./%0123456789", max_size=20)))
@settings(SETTINGS, max_examples=60)
def test_embedded_urls_open_where_they_say(
    tail: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real embedded stores from hostile URLs, inside a scratch working directory: a
    working store or ValueError/TypeError/BrokerLockError (a path that is not a usable
    file is a store failure), and nothing written above the directory.

    A tail that decodes to an absolute path ("/etc", or on Windows "\\etc" and "C:x")
    would open at the file system root: such tails are rooted in the scratch directory
    instead (``sqlite:///`` + scratch + "/" + tail), so they still test absolute URLs."""
    from brokerlock import BrokerLockError

    work = tmp_path / "w" / uuid.uuid4().hex
    work.mkdir(parents=True)
    monkeypatch.chdir(work)

    def above() -> Set[str]:
        return {p for p in _tree(tmp_path) if not p.startswith(f"w/{work.name}")}

    before = above()
    decoded = unquote(tail)
    rooted = decoded.startswith(("/", "\\")) or os.path.isabs(decoded) or os.path.splitdrive(decoded)[0]
    first = f"{work.as_posix()}/{tail}" if rooted else tail
    for url in (f"sqlite:///{first}", f"sqlite:///db/{tail}"):
        if "/.." in "/" + tail or "%2e" in tail.lower():
            continue  # a relative path that climbs out names that place on purpose
        try:
            lock = BrokerLock.from_url(url)
        except (ValueError, TypeError, BrokerLockError):
            continue
        with lock.item("n", timeout=0).hold():
            pass
        lock.close()
    assert above() == before


@pytest.mark.parametrize("table", ["x; DROP TABLE y", 'a"b', "1abc", "", "a" * 64, "ünï", "a.b.c.d", "a-b"])
def test_postgres_table_names_are_identifiers(table: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("postgres_server")
    from urllib.parse import quote

    try:
        lock = BrokerLock.from_url(f"{server.dsn}?table={quote(table)}")
    except (ValueError, TypeError):
        return
    with lock.item("n", timeout=0).hold():  # accepted: then it is a working store
        pass
    lock.close()


# -- the fuzz target, driven by hypothesis ------------------------------------------------


@given(data=st.binary(max_size=64))
@settings(SETTINGS, max_examples=400)
def test_fuzz_target(data: bytes) -> None:
    check_one(data)


@given(text=st.text(any_char, max_size=40))
@settings(SETTINGS, max_examples=200)
def test_fuzz_target_on_text(text: str) -> None:
    check_one(text.encode("utf-8", "surrogatepass"))
