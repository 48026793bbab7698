"""The Redis store's URLs: the ``prefix`` query parameter, and a URL to show."""

from __future__ import annotations

from typing import Any, Dict, Tuple
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

DEFAULT_PREFIX = "brokerlock:"


def split_url(url: str, prefix: str) -> Tuple[str, str]:
    """The URL for redis-py (without ``?prefix=``) and the prefix (it overrides ``prefix``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    for key, value in query:
        if key == "prefix":
            prefix = value
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def display_url(kwargs: Dict[str, Any], server: str, prefix: str, ssl: bool) -> str:
    """A URL that reaches this store again, without the password; ``kwargs`` are the
    pool's connection settings, ``server`` is host:port."""
    user = kwargs.get("username")
    auth = quote(user, safe="") + "@" if user else ""
    if kwargs.get("path"):
        base = f"unix://{auth}{kwargs['path']}?db={kwargs.get('db', 0)}"
        sep = "&"
    else:
        scheme = "rediss" if ssl else "redis"
        base = f"{scheme}://{auth}{server}/{kwargs.get('db', 0)}"
        sep = "?"
    if prefix != DEFAULT_PREFIX:
        base += sep + urlencode({"prefix": prefix})
    return base
