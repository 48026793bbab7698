"""The SQL of the PostgreSQL store, kept apart from the plumbing that runs it.

``{t}`` is the table and ``{q}`` its queue, filled in with ``psycopg.sql.Identifier``;
every value is a bound parameter.

Liveness: each process's presence session holds an exclusive session-level advisory
lock on its key (see ``_postgres_presence``). ``pg_try_advisory_xact_lock_shared(key)``
fails exactly while that session lives, so it tells a live holder from a dead one with
one lookup in the lock manager's hash table (not a scan of ``pg_locks``); when it
succeeds, the shared lock it took on a dead key ends with the statement.
"""


def alive(key: str) -> str:
    """SQL that is true while the presence session holding ``key`` lives."""
    return f"NOT pg_catalog.pg_try_advisory_xact_lock_shared({key})"


_LIVE = (
    "token IS NOT NULL AND (expires_at IS NULL OR expires_at > clock_timestamp()) "
    f"AND {alive('holder')}"
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
    deadline timestamptz NOT NULL,
    UNIQUE (name, arrival, token)
)"""
#: The live waiter whose turn it is (first come, first served): a waiter whose session
#: ended is skipped at once, one that stopped renewing its place after its deadline.
_HEAD = f"""SELECT q.token FROM {{q}} q
    WHERE q.name = %(name)s AND q.deadline > clock_timestamp() AND {alive('q.holder')}{{extra}}
    ORDER BY q.arrival, q.token LIMIT 1"""
#: Wakes the head only: its member is ``<token>:<listener id>``, and its thread's
#: listening session LISTENs on the channel named after the id; the payload tells that
#: wait from an earlier one of the same thread.
_NOTIFY_HEAD = "(SELECT pg_notify(%(prefix)s || split_part(h.token, ':', 2), h.token) FROM h)"
# Free, and nobody alive waits ahead of us (a newcomer, arrival NULL, is behind all).
# One row either way: (True, fence, acquired, expires, _, _) or (False, _, _, seconds
# left on the current lease or NULL, whether our own presence session is alive, our
# arrival in the queue). A waiter (member set) that takes the lock leaves the queue in
# the same statement; one that does not takes its place in the queue, or renews it.
ACQUIRE = f"""WITH c AS (SELECT clock_timestamp() AS now),
took AS (
INSERT INTO {{t}} AS t (name, token, fence, acquired_at, expires_at, host, pid, thread, holder)
SELECT %(name)s, %(token)s, (extract(epoch FROM c.now) * 1000000)::int8,
       c.now, c.now + %(ttl)s::float8 * interval '1 second',
       %(host)s, %(pid)s, %(thread)s, %(holder)s::int8
FROM c
WHERE {alive('%(holder)s::int8')}
  AND NOT EXISTS (SELECT 1 FROM {{q}} q WHERE q.name = %(name)s
                  AND q.token IS DISTINCT FROM %(member)s::text AND q.deadline > c.now
                  AND (%(arrival)s::timestamptz IS NULL
                       OR (q.arrival, q.token) < (%(arrival)s::timestamptz, %(member)s::text))
                  AND {alive('q.holder')})
ON CONFLICT (name) DO UPDATE SET
    token = excluded.token, fence = GREATEST(t.fence + 1, excluded.fence),
    acquired_at = excluded.acquired_at,
    expires_at = excluded.expires_at, host = excluded.host, pid = excluded.pid,
    thread = excluded.thread, holder = excluded.holder
WHERE t.token IS NULL OR t.token = excluded.token OR t.expires_at <= excluded.acquired_at
   OR NOT {alive('t.holder')}
RETURNING t.fence, extract(epoch FROM t.acquired_at)::float8 AS acquired,
          extract(epoch FROM t.expires_at)::float8 AS expires
), gone AS (
DELETE FROM {{q}} WHERE token = %(member)s::text AND EXISTS (SELECT 1 FROM took)
), purge AS (
DELETE FROM {{q}} WHERE name = %(name)s AND token <> %(member)s::text
  AND deadline < (SELECT now FROM c) AND NOT EXISTS (SELECT 1 FROM took)
), enq AS (
INSERT INTO {{q}} AS q (token, name, arrival, holder, deadline)
SELECT %(member)s::text, %(name)s, c.now, %(holder)s::int8,
       c.now + %(patience)s::float8 * interval '1 second'
FROM c WHERE %(member)s::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM took)
ON CONFLICT (token) DO UPDATE SET deadline = excluded.deadline, holder = excluded.holder
RETURNING q.arrival
)
SELECT true, took.fence, took.acquired, took.expires, true, NULL::timestamptz FROM took
UNION ALL
SELECT false, NULL::int8, NULL::float8,
       (SELECT extract(epoch FROM l.expires_at - clock_timestamp())::float8 FROM {{t}} l
        WHERE l.name = %(name)s AND l.token IS NOT NULL),
       {alive('%(holder)s::int8')}, (SELECT arrival FROM enq)
WHERE NOT EXISTS (SELECT 1 FROM took)"""
# The token is cleared but the row kept, so the fence survives; RETURNING reports
# whether the lease was still intact (unexpired, its holder's session alive).
RELEASE = f"""WITH r AS (
    UPDATE {{t}} SET token = NULL WHERE name = %(name)s AND token = %(token)s
    RETURNING (expires_at IS NULL OR expires_at > clock_timestamp()) AND {alive('holder')} AS intact
), h AS ({_HEAD.format(q='{q}', extra='')})
SELECT r.intact, {_NOTIFY_HEAD} FROM r"""
FORCE = f"""WITH r AS (
    UPDATE {{t}} SET token = NULL WHERE name = %(name)s AND {_LIVE} RETURNING 1
), h AS ({_HEAD.format(q='{q}', extra='')})
SELECT {_NOTIFY_HEAD} FROM r"""
EXTEND = f"""UPDATE {{t}} SET expires_at = clock_timestamp() + %(ttl)s::float8 * interval '1 second'
WHERE name = %(name)s AND token = %(token)s AND {_LIVE} RETURNING {COLUMNS}"""
SELECT = f"SELECT {COLUMNS} FROM {{t}} WHERE {_LIVE} {{where}} ORDER BY name COLLATE \"C\""
# A waiter that gives up wakes the next in line if the lock is free, so that one does
# not wait for its safety-net re-check.
LEAVE = f"""WITH d AS (DELETE FROM {{q}} WHERE token = %(member)s RETURNING 1),
h AS ({_HEAD.format(q='{q}', extra=' AND q.token <> %(member)s')})
SELECT {_NOTIFY_HEAD} FROM d
WHERE NOT EXISTS (SELECT 1 FROM {{t}} WHERE name = %(name)s AND {_LIVE})"""
