"""Durations: ``"500ms"``, ``"60s"``, ``"2 minutes"``, ``"1h30m"``, ``2.5`` or a ``timedelta`` to seconds.

The common spellings are parsed here with one regular expression, because importing
humanfriendly costs ~25 ms of start-up that a cron job should not pay; anything the
regular expression does not know is handed to ``humanfriendly.parse_timespan``.
"""

from __future__ import annotations

import math
import re
import sys
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from datetime import timedelta

Duration = Union[str, int, float, "timedelta", None]

#: Longer than any lease or wait that makes sense; beyond it Redis' PX and
#: float arithmetic on epoch seconds start to misbehave, so refuse early.
MAX_SECONDS = 10.0 * 365 * 24 * 3600

_UNITS = {
    "ms": 0.001, "msec": 0.001, "msecs": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
}
_SIMPLE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
#: One part of a compound duration such as ``1h30m`` or ``2m 30s``: a unit is required.
_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*")
_COMPOUND = re.compile(r"(?:\s*(?:\d+(?:\.\d*)?|\.\d+)\s*[a-zA-Z]+\s*){2,}")


def parse_duration(value: Duration, what: str = "duration") -> Optional[float]:
    """Return ``value`` in seconds, ``None`` for ``None``.

    Raises ``ValueError`` naming the value when it is negative, NaN, infinite, empty,
    too large or unparseable, and ``TypeError`` for types that are no duration.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a duration, not a bool: {value!r}")
    # A timedelta can only exist if datetime was imported: do not pay for it otherwise.
    datetime = sys.modules.get("datetime")
    if datetime is not None and isinstance(value, datetime.timedelta):
        seconds = float(value.total_seconds())
    elif isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"{what} {value!r} is too large") from None
    elif isinstance(value, str):
        seconds = _parse_text(value, what)
    else:
        raise TypeError(
            f"{what} must be a string like '60s', a number of seconds or a timedelta, "
            f"not {type(value).__name__}: {value!r}"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, not {value!r}")
    if seconds < 0:
        raise ValueError(f"{what} must not be negative: {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{what} {value!r} is longer than ten years; use None for no limit")
    return seconds


def _parse_text(text: str, what: str) -> float:
    match = _SIMPLE.fullmatch(text)
    if match:
        number, unit = match.groups()
        factor = _UNITS.get(unit.lower()) if unit else 1.0
        if factor is not None:
            return float(number) * factor
    if _COMPOUND.fullmatch(text):
        return _parse_compound(text, what)
    if not text.strip():
        raise ValueError(f"{what} must not be empty: {text!r}")
    if text.strip().startswith("-"):
        raise ValueError(f"{what} must not be negative: {text!r}")
    from humanfriendly import InvalidTimespan, parse_timespan

    try:
        return float(parse_timespan(text.strip()))
    except (InvalidTimespan, ValueError, OverflowError):
        raise ValueError(
            f"{what} {text!r} is not a duration; write e.g. '500ms', '60s', '2 minutes', '1h30m' or '1.5h'"
        ) from None


def _parse_compound(text: str, what: str) -> float:
    """``1h30m``, ``2m30s``, ``1h 30m``: parts with units, largest first, each once."""
    total, previous = 0.0, None
    for match in _PART.finditer(text):
        number, unit = match.groups()
        factor = _UNITS.get(unit.lower())
        if factor is None:
            raise ValueError(
                f"{what} {text!r} is not a duration: unknown unit {unit!r}; write e.g. '1h30m' or '2m 30s'"
            )
        if previous is not None and factor >= previous:
            raise ValueError(
                f"{what} {text!r} is not a duration: its parts must go from larger units to "
                f"smaller, each once, e.g. '1h30m' or '2m 30s'"
            )
        total, previous = total + float(number) * factor, factor
    return total


def format_duration(seconds: Optional[float]) -> str:
    """Short human form for messages: ``"1.5s"``, ``"250ms"``, ``"forever"``."""
    if seconds is None:
        return "forever"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.3g}s"
    if seconds < 7200:
        return f"{seconds / 60:.3g}min"
    return f"{seconds / 3600:.3g}h"
