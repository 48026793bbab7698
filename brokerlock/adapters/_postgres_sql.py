"""The SQL of the PostgreSQL store, kept apart from the plumbing that runs it.

``{t}`` is the table, filled in with ``psycopg.sql.Identifier``; every value is a
bound parameter.
"""

#: Every advisory key granted to some session of this database (bigint form, objsubid 1).
LIVE_KEYS = """(SELECT (l.classid::int8 << 32) | l.objid::int8 FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                        WHERE d.datname = current_database()))"""
_LIVE = (
    "token IS NOT NULL AND (expires_at IS NULL OR expires_at > clock_timestamp()) "
    f"AND holder IN {LIVE_KEYS}"
)
COLUMNS = (
    "name, token, fence, extract(epoch FROM acquired_at)::float8, "
    "extract(epoch FROM expires_at)::float8, host, pid, thread"
)
SCHEMA = """CREATE TABLE IF NOT EXISTS {t} (
    name text PRIMARY KEY,
    token text,
    fence bigint NOT NULL,
    acquired_at timestamptz,
    expires_at timestamptz,
    host text,
    pid integer,
    thread text,
    holder bigint
);
CREATE TABLE IF NOT EXISTS {q} (
    token text PRIMARY KEY,
    name text NOT NULL,
    arrival timestamptz NOT NULL,
    holder bigint NOT NULL,
    deadline timestamptz NOT NULL
)"""
# Free, and nobody alive waits ahead of us (a newcomer, arrival NULL, is behind all).
ACQUIRE = f"""INSERT INTO {{t}} AS t (name, token, fence, acquired_at, expires_at, host, pid, thread, holder)
SELECT %(name)s, %(token)s, (extract(epoch FROM c.now) * 1000000)::int8,
       c.now, c.now + %(ttl)s::float8 * interval '1 second',
       %(host)s, %(pid)s, %(thread)s, %(holder)s::int8
FROM (SELECT clock_timestamp() AS now) c
WHERE %(holder)s::int8 IN {LIVE_KEYS}
  AND NOT EXISTS (SELECT 1 FROM {{q}} q WHERE q.name = %(name)s AND q.token <> %(token)s
                  AND q.deadline > c.now AND q.holder IN {LIVE_KEYS}
                  AND (%(arrival)s::timestamptz IS NULL
                       OR (q.arrival, q.token) < (%(arrival)s::timestamptz, %(token)s)))
ON CONFLICT (name) DO UPDATE SET
    token = excluded.token, fence = GREATEST(t.fence + 1, excluded.fence),
    acquired_at = excluded.acquired_at,
    expires_at = excluded.expires_at, host = excluded.host, pid = excluded.pid,
    thread = excluded.thread, holder = excluded.holder
WHERE t.token IS NULL OR t.token = excluded.token OR t.expires_at <= excluded.acquired_at
   OR t.holder NOT IN {LIVE_KEYS}
RETURNING t.fence, extract(epoch FROM t.acquired_at)::float8, extract(epoch FROM t.expires_at)::float8"""
# The token is cleared but the row kept, so the fence survives; RETURNING reports
# whether the lease was still intact (unexpired, its holder's session alive).
RELEASE = f"""WITH r AS (
    UPDATE {{t}} SET token = NULL WHERE name = %(name)s AND token = %(token)s
    RETURNING (expires_at IS NULL OR expires_at > clock_timestamp()) AND holder IN {LIVE_KEYS} AS intact
) SELECT r.intact, pg_notify(%(channel)s, '') FROM r"""
FORCE = f"""WITH r AS (
    UPDATE {{t}} SET token = NULL WHERE name = %(name)s AND {_LIVE} RETURNING 1
) SELECT pg_notify(%(channel)s, '') FROM r"""
EXTEND = f"""UPDATE {{t}} SET expires_at = clock_timestamp() + %(ttl)s::float8 * interval '1 second'
WHERE name = %(name)s AND token = %(token)s AND {_LIVE} RETURNING {COLUMNS}"""
SELECT = f"SELECT {COLUMNS} FROM {{t}} WHERE {_LIVE} {{where}} ORDER BY name COLLATE \"C\""
# Joins the queue, or renews our place in it; RETURNING keeps our original arrival.
ENQUEUE = """WITH purge AS (DELETE FROM {q} WHERE name = %(name)s AND deadline < clock_timestamp())
INSERT INTO {q} AS q (token, name, arrival, holder, deadline)
VALUES (%(token)s, %(name)s, clock_timestamp(), %(holder)s::int8,
        clock_timestamp() + %(patience)s::float8 * interval '1 second')
ON CONFLICT (token) DO UPDATE SET deadline = excluded.deadline, holder = excluded.holder
RETURNING q.arrival"""
# A waiter that gives up tells the others, so the next in line does not wait for its
# safety-net re-check.
LEAVE = """WITH d AS (DELETE FROM {q} WHERE token = %(token)s RETURNING 1)
SELECT pg_notify(%(channel)s, '') FROM d"""
