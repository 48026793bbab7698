"""Store URLs: ``sqlite:///rel.db``, ``sqlite:////abs.db``, ``file:///dir``, ``memory://``,
``redis://``, ``rediss://``, ``postgresql://``, ``postgres://``; and the default store."""

from __future__ import annotations

import os
import sys
from urllib.parse import unquote, urlsplit

from .adapters.base import Adapter

ENV_URL = "BROKERLOCK_URL"


def state_dir() -> str:
    """Where per-user state lives on this platform."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Application Support")
    else:
        base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "brokerlock")


def default_url() -> str:
    """``$BROKERLOCK_URL``, else the SQLite database in the user's state directory."""
    url = os.environ.get(ENV_URL, "").strip()
    if url:
        return url
    path = os.path.join(state_dir(), "locks.sqlite3")
    # Only what a URL would misread is escaped ("%", "?", "#" in a home directory);
    # spaces (macOS "Application Support") and Windows backslashes read back as they are.
    for char, escaped in (("%", "%25"), ("?", "%3F"), ("#", "%23")):
        path = path.replace(char, escaped)
    return "sqlite:///" + path


def adapter_from_url(url: str) -> Adapter:
    """The adapter a URL names; ``ValueError`` naming the URL when it names none."""
    if not isinstance(url, str):
        raise TypeError(f"store URL must be a str, not {type(url).__name__}: {url!r}")
    if "\x00" in url:
        raise ValueError(f"store URL {url!r} contains a NUL character")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from .adapters.memory import MemoryAdapter

        return MemoryAdapter()
    if scheme in ("sqlite", "file"):
        if parts.netloc:
            raise ValueError(
                f"store URL {url!r} names host {parts.netloc!r}; embedded stores are local: "
                f"write {scheme}:///relative or {scheme}:////absolute"
            )
        if parts.query or parts.fragment:
            extra = parts.query or parts.fragment
            raise ValueError(f"store URL {url!r} has options ({extra!r}) we do not know")
        path = unquote(parts.path)
        if "\x00" in path:
            raise ValueError(f"store URL {url!r} names a path with a NUL character")
        if scheme == "sqlite":
            # sqlite:///rel.db -> "rel.db", sqlite:////abs.db -> "/abs.db" (SQLAlchemy's rule)
            path = path[1:] if path.startswith("/") else path
            if not path:
                raise ValueError(f"store URL {url!r} names no database file")
            from .adapters.sqlite import SQLiteAdapter

            return SQLiteAdapter(path)
        if sys.platform == "win32" and path[:1] == "/" and path[2:3] == ":" and path[1:2].isalpha():
            path = path[1:]  # file:///C:/dir, the usual form of a Windows file URL
        elif not path.startswith("/"):
            raise ValueError(f"store URL {url!r} needs an absolute directory: file:///path/to/dir")
        from .adapters.file import FileAdapter

        return FileAdapter(path)
    if scheme in ("redis", "rediss"):
        from .adapters.redis import RedisAdapter

        return RedisAdapter(url)
    if scheme in ("postgresql", "postgres"):
        from .adapters.postgres import PostgresAdapter

        return PostgresAdapter(url)
    raise ValueError(
        f"unknown store URL {url!r}: use sqlite:///file.db, file:///dir, memory://, "
        "redis://host or postgresql://host/db"
    )
