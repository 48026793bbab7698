"""The PostgreSQL back end: a lease table, LISTEN/NOTIFY wake-ups, advisory-lock presence."""

from .adapter import PostgresAdapter

__all__ = ["PostgresAdapter"]
