"""The SQL of the PostgreSQL store, kept apart from the plumbing that runs it.

``{t}`` is the table and ``{q}`` its queue, filled in with ``psycopg.sql.Identifier``;
every value is a bound parameter.

Liveness: each process's presence session holds an exclusive session-level advisory
lock on its key (see ``postgres.presence``). ``pg_try_advisory_xact_lock_shared(key)``
fails exactly while that session lives, so it tells a live holder from a dead one with
one lookup in the lock manager's hash table (not a scan of ``pg_locks``); when it
succeeds, the shared lock it took on a dead key ends with the statement.

Direct hand-over: a queued waiter leaves in its queue row what its lease needs (ttl,
host, pid, thread, presence key), so the statement that frees a lock gives it to the
live head of the queue at once and NOTIFYs the head with the lease; the head returns
without another round trip, and no newcomer can slip in between. Statements that lock
both a lock row and queue rows lock the lock row first, so they cannot deadlock.

Released names leave no row behind: a release or break that finds no queue
row for the name deletes its row instead of clearing it, and keeps its fence in the
store's floor, the row named ``''`` (no lock can have that name), which ``list`` never
shows (it has no token). A name's first row gets ``max(now in µs, floor + 1)``, so no
fence repeats even with the server's clock stepped back. One race costs fairness,
never exclusion: a release whose snapshot predates a waiter's place deletes the row,
and a newcomer may then take the lock ahead of that waiter (which sees the lock taken,
or takes it, at its next look).
"""

#: The store's fence floor: the highest fence of any row deleted (see above).
FLOOR = "coalesce((SELECT f.fence FROM {t} f WHERE f.name = ''), 0) + 1"


def dead(key: str) -> str:
    """SQL that is true once the presence session holding ``key`` has ended."""
    return f"pg_catalog.pg_try_advisory_xact_lock_shared({key})"


def alive(key: str) -> str:
    """SQL that is true while the presence session holding ``key`` lives."""
    return f"NOT {dead(key)}"


_LIVE = (
    "token IS NOT NULL AND (expires_at IS NULL OR expires_at > clock_timestamp()) "
    f"AND {alive('holder')}"
)
COLUMNS = (
    "name, token, fence, extract(epoch FROM acquired_at)::float8, "
    "extract(epoch FROM expires_at)::float8, host, pid, thread"
)
_QUEUE_COLUMNS = "ttl float8, host text, pid integer, thread text"
SCHEMA = f"""CREATE TABLE IF NOT EXISTS {{t}} (
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
CREATE TABLE IF NOT EXISTS {{q}} (
    token text PRIMARY KEY,
    name text NOT NULL,
    arrival timestamptz NOT NULL,
    holder bigint NOT NULL,
    deadline timestamptz NOT NULL,
    {_QUEUE_COLUMNS},
    UNIQUE (name, arrival, token)
)"""
#: Queue tables made before waiters carried their lease get its columns.
MIGRATE = "ALTER TABLE {q} " + ", ".join(
    f"ADD COLUMN IF NOT EXISTS {column}" for column in _QUEUE_COLUMNS.split(", ")
)
#: Whether the tables exist and the queue has the hand-over columns: no DDL (and no
#: CREATE privilege) is needed when they do.
READY = """SELECT to_regclass(%(t)s) IS NOT NULL AND EXISTS (
    SELECT 1 FROM pg_catalog.pg_attribute
    WHERE attrelid = to_regclass(%(q)s) AND attname = 'thread' AND NOT attisdropped)"""

#: The grant a woken head reads: ``<member>|<fence>|<acquired>|<expires or empty>``.
_GRANT = (
    "g.member || '|' || g.fence || '|' || g.acquired || '|' || coalesce(g.expires::text, '')"
)
#: The live waiter whose turn it is (first come, first served): a waiter whose session
#: ended is skipped at once, one that stopped renewing its place after its deadline. A
#: waiter leaving at this moment is skipped (its row is deleted: FOR UPDATE passes it).
_HEAD = """SELECT q.token AS member, q.ttl, q.host, q.pid, q.thread, q.holder FROM {{q}} q
    WHERE q.name = %(name)s AND q.deadline > clock_timestamp() AND {live}{extra}
    ORDER BY q.arrival, q.token LIMIT 1"""


def _hand_over(freed: str) -> str:
    """Free the row that the CTE ``freed`` (the name's row, locked, one column
    ``intact``) found, giving it to the head of the queue if there is one: the head
    leaves the queue and is notified with its lease, in this one statement.

    One row if ``freed`` found one (none else): whether the lease was intact.
    """
    return f"""WITH o AS ({freed}),
h AS ({_HEAD.format(live=alive("q.holder"), extra=" AND EXISTS (SELECT 1 FROM o)")} FOR UPDATE OF q),
g AS (
UPDATE {{t}} AS t SET
    token = split_part(h.member, ':', 1),
    fence = CASE WHEN h.member IS NULL THEN t.fence
                 ELSE GREATEST(t.fence + 1, (extract(epoch FROM c.now) * 1000000)::int8) END,
    acquired_at = c.now, expires_at = c.now + h.ttl * interval '1 second',
    host = h.host, pid = h.pid, thread = h.thread, holder = h.holder
FROM o CROSS JOIN (SELECT clock_timestamp() AS now) c LEFT JOIN h ON true
WHERE t.name = %(name)s AND (h.member IS NOT NULL OR EXISTS (SELECT 1 FROM {{q}} w WHERE w.name = %(name)s))
RETURNING o.intact, h.member, t.fence, extract(epoch FROM t.acquired_at)::float8 AS acquired,
          extract(epoch FROM t.expires_at)::float8 AS expires
), gone AS (
DELETE FROM {{t}} AS t USING o
WHERE t.name = %(name)s AND NOT EXISTS (SELECT 1 FROM h)
  AND NOT EXISTS (SELECT 1 FROM {{q}} w WHERE w.name = %(name)s)
RETURNING o.intact, t.fence
), kept AS (
INSERT INTO {{t}} AS t (name, fence) SELECT '', gone.fence FROM gone
ON CONFLICT (name) DO UPDATE SET fence = GREATEST(t.fence, excluded.fence)
), d AS (
DELETE FROM {{q}} WHERE token = (SELECT member FROM g)
)
SELECT g.intact,
       CASE WHEN g.member IS NOT NULL THEN pg_notify(%(prefix)s || split_part(g.member, ':', 2), {_GRANT}) END
FROM g
UNION ALL SELECT gone.intact, NULL FROM gone"""


# The token matched: the lease is freed (and maybe handed over) whether or not it was
# still intact, which is reported (unexpired, its holder's session alive).
RELEASE = _hand_over(
    "SELECT (expires_at IS NULL OR expires_at > clock_timestamp()) AND "
    f"{alive('holder')} AS intact FROM {{t}} WHERE name = %(name)s AND token = %(token)s "
    "FOR UPDATE"
)
FORCE = _hand_over(f"SELECT true AS intact FROM {{t}} WHERE name = %(name)s AND {_LIVE} FOR UPDATE")

# The queue is looked at in the conflict clause, which sees the row's latest version
# (locked): a waiter whose attempt crosses a hand-over to it finds its own token there
# and keeps the lock instead of queueing again. Only a name's first row is taken without
# that look. (Looking at the queue before proposing the row too, with the statement's
# snapshot, hid such a crossing hand-over: the waiter queued again while holding, and
# a timeout then stranded the lock; tests/test_postgres_handover.py caught it.)
_TAKE = f"""took AS (
INSERT INTO {{t}} AS t (name, token, fence, acquired_at, expires_at, host, pid, thread, holder)
SELECT %(name)s, %(token)s, GREATEST((extract(epoch FROM c.now) * 1000000)::int8, {FLOOR.format(t="{t}")}),
       c.now, c.now + %(ttl)s::float8 * interval '1 second',
       %(host)s, %(pid)s, %(thread)s, %(holder)s::int8
FROM c WHERE NOT c.stale AND {alive('%(holder)s::int8')}
ON CONFLICT (name) DO UPDATE SET
    token = excluded.token, fence = GREATEST(t.fence + 1, excluded.fence),
    acquired_at = excluded.acquired_at,
    expires_at = excluded.expires_at, host = excluded.host, pid = excluded.pid,
    thread = excluded.thread, holder = excluded.holder
WHERE t.token = excluded.token
   OR ((t.token IS NULL OR t.expires_at <= excluded.acquired_at OR {dead('t.holder')})
       AND NOT EXISTS (SELECT 1 FROM {{q}} q WHERE q.name = %(name)s{{ahead}}
                       AND q.deadline > excluded.acquired_at AND {alive('q.holder')}))
RETURNING t.fence, extract(epoch FROM t.acquired_at)::float8 AS acquired,
          extract(epoch FROM t.expires_at)::float8 AS expires
)"""
_ENQUEUE = """enq AS (
INSERT INTO {q} AS q (token, name, arrival, holder, deadline, ttl, host, pid, thread)
SELECT %(member)s::text, %(name)s, c.now, %(holder)s::int8,
       c.now + %(patience)s::float8 * interval '1 second',
       %(ttl)s::float8, %(host)s, %(pid)s, %(thread)s
FROM c WHERE NOT c.stale AND %(member)s::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM took)
ON CONFLICT (token) DO UPDATE SET deadline = excluded.deadline, holder = excluded.holder
RETURNING q.arrival
)"""
# One row either way: (True, fence, acquired, expires, _, _, now) or (False, _, _,
# seconds left on the current lease or NULL, whether our own presence session is alive,
# our arrival in the queue, now). CASE keeps the look at the current lease off the fast
# path. ``now``, the server's clock as the statement ends, lets a waiter tell whether a
# lease handed to it later has run out by the time it reads it, with no round trip.
_RESULT = f"""SELECT took.fence IS NOT NULL, took.fence, took.acquired,
       CASE WHEN took.fence IS NOT NULL THEN took.expires
            ELSE (SELECT extract(epoch FROM l.expires_at - clock_timestamp())::float8 FROM {{t}} l
                  WHERE l.name = %(name)s AND l.token IS NOT NULL) END,
       took.fence IS NOT NULL OR {alive('%(holder)s::int8')}, (SELECT arrival FROM enq),
       extract(epoch FROM clock_timestamp())::float8, (SELECT stale FROM c)
FROM (SELECT 1) one LEFT JOIN took ON true"""
# Every statement that may take a lock starts here. ``stale``: the name's row, in this
# statement's snapshot, was deleted by a release that committed after the snapshot was
# taken (the locking read, which waits for such a release and sees the latest state,
# finds none). The snapshot's fence floor then lacks the deleted row's fence, and the
# insert that would follow (a fresh row, after waiting for that release) would stamp a
# fence and a start from before the release: a fence lower than the last holder's, a
# lease that seems to begin before the previous one ended. So such a statement takes
# nothing and says so, and the client runs it again at once, with a fresh snapshot.
# (chaos/test_chaos.py caught it: two threads, one's fresh insert waiting on the other's
# release.) The locking read also orders ``now`` after any release it waited for.
# Left open: a row this snapshot never saw (taken after it began) that is then also
# released and deleted before this statement's insert: the whole of another holder's
# turn between two steps of one statement, only if this server process stalls there.
_START = """snap AS (SELECT count(*) AS n FROM {t} WHERE name = %(name)s),
lk AS (SELECT count(*) AS n FROM (SELECT 1 FROM {t} WHERE name = %(name)s FOR NO KEY UPDATE) r),
c AS (SELECT (SELECT n FROM snap) > (SELECT n FROM lk) AS stale, clock_timestamp() AS now)"""
# A newcomer: free, and nobody alive waits (it would be ahead). A waiter (``member``
# set) that does not get the lock takes its place in the queue in the same statement.
ACQUIRE = f"""WITH {_START},
{_TAKE.replace("{ahead}", "")},
{_ENQUEUE}
{_RESULT}"""
# A newcomer that does not queue: the first attempt on a name that was free last time
# (most are), one part fewer to run than ACQUIRE.
TAKE = f"""WITH {_START},
{_TAKE.replace("{ahead}", "")}
{_RESULT.replace("(SELECT arrival FROM enq)", "NULL::timestamptz")}"""
# A queued waiter: free, and nobody alive ahead of it. Taking the lock, it leaves the
# queue; else it renews its place (or takes a new one if its place lapsed), and clears
# lapsed places of others.
RETRY = f"""WITH {_START},
{_TAKE.replace("{ahead}", " AND (q.arrival, q.token) < (%(arrival)s::timestamptz, %(member)s::text)")},
gone AS (
DELETE FROM {{q}} WHERE token = %(member)s::text AND EXISTS (SELECT 1 FROM took)
), purge AS (
DELETE FROM {{q}} WHERE name = %(name)s AND token <> %(member)s::text
  AND deadline < (SELECT now FROM c) AND NOT EXISTS (SELECT 1 FROM took)
), {_ENQUEUE}
{_RESULT}"""
EXTEND = f"""UPDATE {{t}} SET expires_at = clock_timestamp() + %(ttl)s::float8 * interval '1 second'
WHERE name = %(name)s AND token = %(token)s AND {_LIVE} RETURNING {COLUMNS}"""
SELECT = f"SELECT {COLUMNS} FROM {{t}} WHERE {_LIVE} {{where}} ORDER BY name COLLATE \"C\""
#: Our live lease: how a waiter that left the queue tells whether it was handed the lock.
MINE = f"""SELECT fence, extract(epoch FROM acquired_at)::float8, extract(epoch FROM expires_at)::float8
FROM {{t}} WHERE name = %(name)s AND token = %(token)s AND {_LIVE}"""
# A waiter that gives up leaves the queue. If its place was already gone, it may have
# been handed the lock (it looks with MINE). Else, if the lock is free (an expired or
# dead holder), it wakes the next in line, so that one does not wait for its re-check.
LEAVE = f"""WITH d AS (DELETE FROM {{q}} WHERE token = %(member)s RETURNING 1),
h AS ({_HEAD.format(live=alive("q.holder"), extra=" AND q.token <> %(member)s")})
SELECT EXISTS (SELECT 1 FROM d),
       (SELECT pg_notify(%(prefix)s || split_part(h.member, ':', 2), h.member) FROM h
        WHERE EXISTS (SELECT 1 FROM d)
          AND NOT EXISTS (SELECT 1 FROM {{t}} WHERE name = %(name)s AND {_LIVE})) IS NOT NULL"""
