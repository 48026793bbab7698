"""The SQLite back end: one table of leases and queue places in a WAL database."""

from .adapter import SQLiteAdapter

__all__ = ["SQLiteAdapter"]
