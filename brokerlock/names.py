"""Validation of lock names, shared by every back end."""

from __future__ import annotations

#: Long enough for any real key, short enough that a hostile caller cannot make
#: every store operation carry megabytes.
MAX_NAME_BYTES = 4096


def validate_name(name: object) -> str:
    """Return ``name`` if it is a usable lock name, else raise naming the value.

    Any non-empty ``str`` that encodes to UTF-8 is a name, except that NUL is refused
    because PostgreSQL cannot store it in text and C-level APIs would truncate at it.
    """
    if not isinstance(name, str):
        raise TypeError(f"lock name must be a str, not {type(name).__name__}: {name!r}")
    if not name:
        raise ValueError("lock name must not be empty")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"lock name {name!r} cannot be encoded as UTF-8") from None
    if "\x00" in name:
        raise ValueError(f"lock name {name!r} contains a NUL character")
    if size > MAX_NAME_BYTES:
        raise ValueError(f"lock name is {size} bytes long; at most {MAX_NAME_BYTES} are allowed")
    return name
