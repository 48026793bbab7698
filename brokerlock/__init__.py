"""brokerlock: named, time-limited locks across threads, processes and machines."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .adapters.base import Adapter, Lease
from .errors import BrokerLockError, LockLost, LockTimeout
from .lock import BrokerLock, BrokerLockItem
from .urls import default_url

if TYPE_CHECKING:
    from .adapters.file import FileAdapter as FileAdapter
    from .adapters.memory import MemoryAdapter as MemoryAdapter
    from .adapters.postgres import PostgresAdapter as PostgresAdapter
    from .adapters.redis import RedisAdapter as RedisAdapter
    from .adapters.sqlite import SQLiteAdapter as SQLiteAdapter

__version__ = "0.1.0"

# A library must not print: the "brokerlock" logger gets a NullHandler before its first
# record, and ``logging`` loads only once someone could listen (see ``_log``).

__all__ = [
    "Adapter",
    "BrokerLock",
    "BrokerLockError",
    "BrokerLockItem",
    "FileAdapter",
    "Lease",
    "LockLost",
    "LockTimeout",
    "MemoryAdapter",
    "SQLiteAdapter",
    "default_url",
]

# Adapters load on first use: `import brokerlock` stays cheap for a cron job, and the
# server adapters import their drivers only when asked for (they are not in __all__,
# so `from brokerlock import *` never needs redis or psycopg).
_ADAPTERS = {
    "FileAdapter": "file",
    "MemoryAdapter": "memory",
    "SQLiteAdapter": "sqlite",
    "RedisAdapter": "redis",
    "PostgresAdapter": "postgres",
}


def __getattr__(name: str) -> Any:
    module = _ADAPTERS.get(name)
    if module is None:
        raise AttributeError(f"module 'brokerlock' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".adapters.{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ADAPTERS))
