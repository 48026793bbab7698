"""brokerlock: named, time-limited locks across threads, processes and machines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .adapters.base import Adapter, Lease
from .adapters.file import FileAdapter
from .adapters.memory import MemoryAdapter
from .adapters.sqlite import SQLiteAdapter
from .errors import BrokerLockError, LockLost, LockTimeout
from .lock import BrokerLock, BrokerLockItem
from .urls import default_url

if TYPE_CHECKING:
    from .adapters.postgres import PostgresAdapter as PostgresAdapter
    from .adapters.redis import RedisAdapter as RedisAdapter

__version__ = "0.1.0"

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


def __getattr__(name: str) -> Any:
    # The server adapters import their drivers; load them only when asked for.
    if name == "RedisAdapter":
        from .adapters.redis import RedisAdapter

        return RedisAdapter
    if name == "PostgresAdapter":
        from .adapters.postgres import PostgresAdapter

        return PostgresAdapter
    raise AttributeError(f"module 'brokerlock' has no attribute {name!r}")
