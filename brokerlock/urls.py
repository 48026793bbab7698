"""Store URLs: ``sqlite:////abs.db`` (or ``sqlite:/abs.db``), ``sqlite:///rel.db``,
``file:///dir``, ``memory://``, ``redis://``, ``rediss://``, ``postgresql://``,
``postgres://``; and the default store. The rules: docs/urls.rst."""

from __future__ import annotations

import os
import sys
from urllib.parse import unquote, urlsplit

from .adapters.base import Adapter
from .errors import BrokerLockError

ENV_URL = "BROKERLOCK_URL"

#: What to do when the per-user default store cannot be used.
_CHOOSE_A_STORE = (
    f"choose a store with --url or ${ENV_URL} "
    "(e.g. sqlite:////var/lib/myapp/locks.sqlite3; see docs/urls.rst)"
)


def state_dir() -> str:
    """Where per-user state lives on this platform; ``BrokerLockError`` if the user
    has no home directory to put it in."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Application Support")
    else:
        base = os.environ.get("XDG_STATE_HOME", "")
        if not os.path.isabs(base):  # (the XDG rule: a relative one is ignored)
            base = os.path.expanduser("~/.local/state")
    if not os.path.isabs(base):  # "~" left as it was: no $HOME, no passwd entry
        raise BrokerLockError(f"no home directory to keep the default lock store in: {_CHOOSE_A_STORE}")
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


def default_adapter() -> Adapter:
    """The adapter of :func:`default_url`; when it is the per-user store and cannot be
    used (no home directory, an unwritable one), the error says how to choose another."""
    if os.environ.get(ENV_URL, "").strip():
        return adapter_from_url(default_url())
    try:
        return adapter_from_url(default_url())
    except BrokerLockError as exc:
        if _CHOOSE_A_STORE in str(exc):
            raise
        raise BrokerLockError(f"the default lock store cannot be used ({exc}): {_CHOOSE_A_STORE}") from None


def _embedded_path(url: str, scheme: str) -> str:
    """The path a ``sqlite:`` or ``file:`` URL names, as given (maybe relative).

    ``scheme:/abs`` (one slash) is the absolute path; ``scheme:///rel`` is relative
    and ``scheme:////abs`` absolute (SQLAlchemy's rule for sqlite: the part after the
    empty host, minus its first slash). ``file:///dir`` keeps its slash: always absolute.
    """
    parts = urlsplit(url)
    if parts.netloc:
        raise ValueError(
            f"store URL {url!r} names host {parts.netloc!r}; embedded stores are local: "
            f"write {scheme}:////absolute/path (or {scheme}:/absolute/path)"
        )
    if parts.query or parts.fragment:
        extra = parts.query or parts.fragment
        raise ValueError(f"store URL {url!r} has options ({extra!r}) we do not know")
    path = unquote(parts.path)
    if "\x00" in path:
        raise ValueError(f"store URL {url!r} names a path with a NUL character")
    authority = url[len(scheme) + 1 :].startswith("//")
    if scheme == "sqlite" and authority and path.startswith("/"):
        path = path[1:]
    if sys.platform == "win32" and path[:1] == "/" and path[2:3] == ":" and path[1:2].isalpha():
        path = path[1:]  # file:///C:/dir, the usual form of a Windows file URL
    return path


def check_cli_url(url: str, source: str) -> None:
    """Refuse what a command line must not use, though the library may: a store private
    to one process (``memory://``), or a path relative to the working directory, which
    would be another store in every directory a job starts from. ``ValueError`` naming
    the URL and ``source`` (``--url``, ``$BROKERLOCK_URL``)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        raise ValueError(
            f"{source} {url!r}: a memory:// store lives inside one process, so each "
            "brokerlock command would have its own and lock nothing; use sqlite:, file:, "
            "redis: or postgresql:"
        )
    if scheme in ("sqlite", "file"):
        path = _embedded_path(url, scheme)
        if path and not os.path.isabs(path):
            raise ValueError(
                f"{source} {url!r} names a relative path ({path}), which would be another "
                "store in every directory a job starts from; give an absolute one: "
                f"{scheme}:////absolute/{path} or {scheme}:/absolute/{path}"
            )


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
        path = _embedded_path(url, scheme)
        if scheme == "sqlite":
            if not path:
                raise ValueError(f"store URL {url!r} names no database file")
            from .adapters.sqlite import SQLiteAdapter

            return SQLiteAdapter(path)
        if not (path.startswith("/") or os.path.isabs(path)):
            raise ValueError(
                f"store URL {url!r} needs an absolute directory: file:///path/to/dir or file:/path/to/dir"
            )
        from .adapters.file import FileAdapter

        return FileAdapter(path)
    if scheme in ("redis", "rediss"):
        from .adapters.redis import RedisAdapter

        return RedisAdapter(url)
    if scheme in ("postgresql", "postgres"):
        from .adapters.postgres import PostgresAdapter

        return PostgresAdapter(url)
    raise ValueError(
        f"unknown store URL {url!r}: use sqlite:////abs/file.db, file:///dir, memory://, "
        "redis://host or postgresql://host/db"
    )
