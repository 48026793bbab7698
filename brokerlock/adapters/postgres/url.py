"""The PostgreSQL store's URLs and table names: the ``table`` query parameter, a URL
to show, and the check that a table name is a plain identifier."""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_TABLE = "brokerlock_locks"

# 57, not 63: the queue table is named after the table plus "_queue".
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,56}\Z")


def table_parts(table: object) -> Tuple[str, ...]:
    """``table`` as (schema, table) or (table,); ``ValueError`` unless plain identifiers."""
    if not isinstance(table, str):
        raise TypeError(f"table must be a str, not {type(table).__name__}: {table!r}")
    parts = tuple(table.split("."))
    if len(parts) > 2 or not all(_IDENTIFIER.match(part) for part in parts):
        raise ValueError(
            f"table {table!r} is not a plain identifier (letters, digits, _ and $, at most "
            "57 characters, optionally schema.table)"
        )
    return parts


def split_url(dsn: str, table: str) -> Tuple[str, str]:
    """The DSN for libpq (without ``?table=``) and the table (it overrides ``table``)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        return dsn, table
    query = parse_qsl(parts.query, keep_blank_values=True)
    table = next((value for key, value in query if key == "table"), table)
    rest = urlencode([(k, v) for k, v in query if k != "table"])
    return urlunsplit(parts._replace(query=rest)), table


def display_url(params: Dict[str, Any], table: str) -> str:
    """A URL that reaches the store again, without the password."""
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or "")
    query = {"host": host} if host.startswith("/") else {}
    netloc = "" if host.startswith("/") else host
    if params.get("port"):
        netloc += f":{params['port']}"
    if table != DEFAULT_TABLE:
        query["table"] = table
    tail = "?" + urlencode(query) if query else ""
    return f"postgresql://{user}{netloc}/{params.get('dbname') or ''}{tail}"
