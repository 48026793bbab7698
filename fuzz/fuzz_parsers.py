"""Fuzz target for the parsers that take untrusted text: durations, lock names, store URLs.

With atheris (``pip install atheris``)::

    python fuzz/fuzz_parsers.py -max_total_time=300

Without it, ``python fuzz/fuzz_parsers.py 100000`` feeds that many random inputs, and
``tests/test_hostile.py`` drives :func:`check_one` with hypothesis in CI.

The property: every input yields a value or ``ValueError``/``TypeError``; never another
exception, never a duration outside ``[0, MAX_SECONDS]``, and a URL never reaches a
store constructor with a path or DSN that contains NUL.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
from typing import Any, ClassVar, Dict, Iterator, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from brokerlock.durations import MAX_SECONDS, parse_duration
from brokerlock.names import validate_name

EXPECTED = (ValueError, TypeError)


class Recorder:
    """Stands in for a store constructor: records what the URL parser handed it."""

    calls: ClassVar[List[Tuple[str, Tuple[Any, ...], Dict[str, Any]]]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Recorder.calls.append((type(self).__name__, args, kwargs))
        for arg in args:
            assert isinstance(arg, str), arg
            if "\x00" in arg:  # ``%00`` in a URL: the real constructors say the same
                raise ValueError("embedded null byte")


@contextlib.contextmanager
def stubbed_stores() -> Iterator[None]:
    """Swap the embedded and PostgreSQL constructors for recorders (they would touch the
    file system or the network); Redis' constructor only parses, so it stays real."""
    from brokerlock.adapters import file, sqlite

    modules: List[Tuple[Any, str]] = [(sqlite, "SQLiteAdapter"), (file, "FileAdapter")]
    try:
        from brokerlock.adapters import postgres

        modules.append((postgres, "PostgresAdapter"))
    except ImportError:
        pass
    saved = [(m, n, getattr(m, n)) for m, n in modules]
    try:
        for module, name in modules:
            setattr(module, name, type(name, (Recorder,), {}))
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def check_duration(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except EXPECTED:
        return
    if seconds is None:
        assert value is None
        return
    assert isinstance(seconds, float), (value, seconds)
    assert math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS, (value, seconds)


def check_name(value: Any) -> None:
    try:
        name = validate_name(value)
    except EXPECTED:
        return
    assert name == value and "\x00" not in name
    name.encode("utf-8")  # a valid name always encodes


def check_url(text: Any) -> None:
    from brokerlock.urls import adapter_from_url

    try:
        adapter_from_url(text)
    except EXPECTED:
        return
    except ImportError:
        return  # a driver that is not installed (named in a BrokerLockError elsewhere)


def check_one(data: bytes) -> None:
    """One fuzz input: its text (and number) through every parser, under stubbed stores."""
    text = data.decode("utf-8", "surrogateescape")
    check_duration(text)
    check_name(text)
    if len(data) >= 8:
        import struct

        (number,) = struct.unpack("<d", data[:8])
        check_duration(number)
        check_duration(int.from_bytes(data, "little", signed=True))
    with stubbed_stores():
        check_url(text)
        for scheme in ("sqlite:///", "file:///", "memory://", "redis://", "postgresql://"):
            check_url(scheme + text)


def main() -> None:
    try:
        import atheris
    except ImportError:
        count = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
        rng = random.Random(0)
        alphabet = b"0123456789.-+eE smhdwinfa:/?#%@\x00\xff\xed\xa0\x80" + bytes(range(32, 127))
        for _ in range(count):
            size = rng.randrange(0, 40)
            check_one(bytes(rng.choice(alphabet) for _ in range(size)))
        print(f"{count} random inputs passed (install atheris for coverage-guided fuzzing)")
        return
    atheris.instrument_all()
    atheris.Setup(sys.argv, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
