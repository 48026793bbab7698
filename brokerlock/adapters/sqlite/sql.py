"""The SQL of the SQLite store, kept apart from the code that runs it.

``brokerlock_locks`` holds one lease row per name in use; ``brokerlock_waiters`` is
the FIFO queue. Triggers take a waiter out of the queue in the same statement that
grants it the lock.

Released names leave (almost) nothing behind: a row whose lease a release cleared
while nobody waits for its name is kept free for a while and deleted later by the
adapter that freed it (``RECLAIM``; see ``embedded.deferred``), and a row whose last
waiter leaves while it is free is deleted by a trigger in the same statement. Either
way never while anyone waits (a waiter's queue row keeps it) and never under a
holder. A fence is ``max(previous + 1, now in µs)``, and a new row's ``max(now in µs,
the store's floor + 1)``: ``brokerlock_fence`` keeps the highest fence of any row
deleted, raised by a trigger in the deleting statement, so a name whose row was
deleted never gets a fence again that it had, even if the wall clock steps back.
(Raised on deletion, not on every grant: a grant writes no more than it did.)
"""

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS brokerlock_locks (
    name TEXT PRIMARY KEY,
    token TEXT,
    fence INTEGER NOT NULL,
    acquired_at REAL,
    expires_at REAL,
    host TEXT,
    pid INTEGER,
    thread TEXT,
    witness TEXT,
    bell TEXT  -- the granted waiter's bell, for the release's RETURNING alone
)
""",
    """
CREATE TABLE IF NOT EXISTS brokerlock_waiters (
    ticket INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    token TEXT NOT NULL,
    witness TEXT,
    until REAL NOT NULL,
    bell TEXT,
    ttl REAL,
    host TEXT,
    pid INTEGER,
    thread TEXT
)
""",
    """
CREATE INDEX IF NOT EXISTS brokerlock_waiters_name ON brokerlock_waiters (name, ticket)
""",
    """
CREATE TABLE IF NOT EXISTS brokerlock_fence (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    hwm INTEGER NOT NULL
)
""",
    # A store made by an earlier version starts from the highest fence it holds.
    """
INSERT OR IGNORE INTO brokerlock_fence (id, hwm)
SELECT 0, COALESCE(MAX(fence), 0) FROM brokerlock_locks
""",
    """
CREATE TRIGGER IF NOT EXISTS brokerlock_fence_kept AFTER DELETE ON brokerlock_locks
BEGIN UPDATE brokerlock_fence SET hwm = OLD.fence WHERE id = 0 AND hwm < OLD.fence; END
""",
    # Earlier versions deleted a row in the statement that freed it; a release now
    # keeps it, and the adapter deletes it later (RECLAIM; see embedded.deferred).
    "DROP TRIGGER IF EXISTS brokerlock_freed",
    """
CREATE TRIGGER IF NOT EXISTS brokerlock_left AFTER DELETE ON brokerlock_waiters
BEGIN
    DELETE FROM brokerlock_locks WHERE name = OLD.name AND token IS NULL
    AND NOT EXISTS (SELECT 1 FROM brokerlock_waiters w WHERE w.name = OLD.name);
END
""",
    # Rows a store made by an earlier version kept for released names (their fences
    # are in the high-water mark above).
    """
DELETE FROM brokerlock_locks WHERE token IS NULL
AND NOT EXISTS (SELECT 1 FROM brokerlock_waiters w WHERE w.name = brokerlock_locks.name)
""",
    """
CREATE TRIGGER IF NOT EXISTS brokerlock_granted_new AFTER INSERT ON brokerlock_locks
WHEN NEW.token IS NOT NULL
BEGIN DELETE FROM brokerlock_waiters WHERE name = NEW.name AND token = NEW.token; END
""",
    """
CREATE TRIGGER IF NOT EXISTS brokerlock_granted AFTER UPDATE OF token ON brokerlock_locks
WHEN NEW.token IS NOT NULL
BEGIN DELETE FROM brokerlock_waiters WHERE name = NEW.name AND token = NEW.token; END
""",
    # The store's clock for the current boot of the host (see embedded.clock): one row.
    """
CREATE TABLE IF NOT EXISTS brokerlock_clock (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    boot TEXT NOT NULL,
    wall_minus_boot REAL NOT NULL
)
""",
)
READ_PIN = "SELECT boot, wall_minus_boot FROM brokerlock_clock WHERE id = 0"
WRITE_PIN = "INSERT OR REPLACE INTO brokerlock_clock (id, boot, wall_minus_boot) VALUES (0, ?, ?)"
COLUMNS = "name, token, fence, acquired_at, expires_at, host, pid, thread, witness"
FREE = "(brokerlock_locks.token IS NULL OR brokerlock_locks.expires_at <= :now)"
#: A newcomer never overtakes a waiter: the queue must be empty for it.
NO_QUEUE = (
    "NOT EXISTS (SELECT 1 FROM brokerlock_waiters w WHERE w.name = :name AND w.until > :now)"
)
#: The floor of a new fence besides the name's own previous one (see above).
FLOOR = "MAX(:clock_fence, (SELECT hwm FROM brokerlock_fence WHERE id = 0) + 1)"
#: A name without a row is free, but a newcomer still must not overtake a waiter that
#: queued for it: the row is proposed only when ``{queue}`` allows (the WHERE also
#: keeps SQLite from reading ON CONFLICT as part of the SELECT).
ACQUIRE = f"""
INSERT INTO brokerlock_locks ({COLUMNS})
SELECT :name, :token, {FLOOR}, :now, :expires, :host, :pid, :thread, :witness
WHERE {{queue}}
ON CONFLICT(name) DO UPDATE SET
    token = excluded.token, fence = MAX(brokerlock_locks.fence + 1, excluded.fence),
    acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
    host = excluded.host, pid = excluded.pid, thread = excluded.thread,
    witness = excluded.witness
WHERE {FREE} AND {{queue}}
RETURNING fence
"""
#: A newcomer's acquire of a row its adapter kept free (see embedded.deferred): a plain
#: UPDATE of the existing row, cheaper than the upsert (no insert path, no floor
#: subquery: an existing row's own fence + 1 keeps the name's fences growing). If it
#: changes nothing (the row went, or is taken or queued for), the upsert decides.
ACQUIRE_KEPT = f"""
UPDATE brokerlock_locks SET
    token = :token, fence = MAX(fence + 1, :clock_fence), acquired_at = :now, expires_at = :expires,
    host = :host, pid = :pid, thread = :thread, witness = :witness
WHERE name = :name AND {FREE} AND {NO_QUEUE}
RETURNING fence
"""
TAKE_FROM_DEAD = """
UPDATE brokerlock_locks SET
    token = :token, fence = MAX(fence + 1, :clock_fence), acquired_at = :now, expires_at = :expires,
    host = :host, pid = :pid, thread = :thread, witness = :witness
WHERE name = :name AND token = :dead AND {queue}
RETURNING fence
"""
ACQUIRE_NEW = ACQUIRE.format(queue=NO_QUEUE)
ACQUIRE_TURN = ACQUIRE.format(queue="1")
#: A woken waiter's one statement: free, and it heads the queue (the trigger then
#: removes it from the queue in the same statement). Dead waiters ahead make it fail;
#: the waiter then prunes them in a transaction of its own.
ACQUIRE_HEAD = ACQUIRE.format(
    queue=(
        ":token = (SELECT w.token FROM brokerlock_waiters w "
        "WHERE w.name = :name AND w.until > :now ORDER BY w.ticket LIMIT 1)"
    )
)
TAKE_FROM_DEAD_NEW = TAKE_FROM_DEAD.format(queue=NO_QUEUE)
TAKE_FROM_DEAD_TURN = TAKE_FROM_DEAD.format(queue="1")
HEAD_OF_QUEUE = (
    "FROM brokerlock_waiters w WHERE w.name = :name AND w.until > :now ORDER BY w.ticket LIMIT 1"
)
#: The release: the lease is cleared (expires_at kept, so the caller learns whether it
#: had run out) and the queue's head comes back as "bell witness token" in one column.
FREE_LEASE = f"""
UPDATE brokerlock_locks SET token = NULL, witness = NULL
WHERE name = :name AND token = :token
RETURNING expires_at,
    (SELECT COALESCE(w.bell, '') || ' ' || COALESCE(w.witness, '') || ' ' || w.token {HEAD_OF_QUEUE})
"""
#: The release's hand-over: the free lock granted to the waiter ``:head`` if it still
#: waits (the trigger then takes it out of the queue). Waiters queued by a version
#: without the lease columns (pid NULL) are left to take the lock themselves.
GRANT = """
UPDATE brokerlock_locks SET
    token = w.token, fence = MAX(brokerlock_locks.fence + 1, :clock_fence), acquired_at = :now,
    expires_at = :now + w.ttl, host = w.host, pid = w.pid, thread = w.thread, witness = w.witness
FROM (
    SELECT token, ttl, host, pid, thread, witness FROM brokerlock_waiters
    WHERE name = :name AND token = :head AND until > :now AND pid IS NOT NULL
    ORDER BY ticket LIMIT 1
) AS w
WHERE brokerlock_locks.name = :name AND brokerlock_locks.token IS NULL
RETURNING fence, acquired_at, expires_at
"""
_L = "brokerlock_locks"
_HEAD = f"SELECT w.token, w.ttl, w.host, w.pid, w.thread, w.witness, w.bell {HEAD_OF_QUEUE}"
#: The release in one statement: the lease passes straight to the head of the queue,
#: or is cleared when nobody waits (expires_at then kept, so the caller learns whether
#: it had run out). A lease that ran out while others wait, or one that is not the
#: caller's, matches nothing: FREE_LEASE and GRANT then take the careful way. Waiters
#: queued by a version without the lease columns (pid NULL) are not granted anything.
RELEASE = f"""
UPDATE {_L} SET (token, fence, acquired_at, expires_at, host, pid, thread, witness, bell) = (
    SELECT h.token,
        CASE WHEN h.token IS NULL THEN {_L}.fence ELSE MAX({_L}.fence + 1, :clock_fence) END,
        CASE WHEN h.token IS NULL THEN {_L}.acquired_at ELSE :now END,
        CASE WHEN h.token IS NULL THEN {_L}.expires_at ELSE :now + h.ttl END,
        CASE WHEN h.token IS NULL THEN {_L}.host ELSE h.host END,
        CASE WHEN h.token IS NULL THEN {_L}.pid ELSE h.pid END,
        CASE WHEN h.token IS NULL THEN {_L}.thread ELSE h.thread END,
        h.witness, h.bell
    FROM (SELECT 1) LEFT JOIN ({_HEAD}) AS h ON h.pid IS NOT NULL
)
WHERE name = :name AND token = :token AND (
    expires_at IS NULL OR expires_at > :now
    OR NOT EXISTS (SELECT 1 FROM brokerlock_waiters w WHERE w.name = :name AND w.until > :now)
)
RETURNING expires_at, token, fence, acquired_at, witness, bell
"""
JOIN_QUEUE = (
    "INSERT INTO brokerlock_waiters (name, token, witness, until, bell, ttl, host, pid, thread) "
    "VALUES (:name, :token, :witness, :until, :bell, :ttl, :host, :pid, :thread) RETURNING ticket"
)
#: Added to the tables of a store made by an earlier version (ALTER TABLE, one by one).
NEW_COLUMNS = (
    ("brokerlock_waiters", "ttl REAL"),
    ("brokerlock_waiters", "host TEXT"),
    ("brokerlock_waiters", "pid INTEGER"),
    ("brokerlock_waiters", "thread TEXT"),
    ("brokerlock_locks", "bell TEXT"),
)
HOLDER = f"SELECT {COLUMNS} FROM brokerlock_locks WHERE name = ?"
LIVE = "token IS NOT NULL AND (expires_at IS NULL OR expires_at > :now)"

SCHEMA_NAMES = (
    "brokerlock_locks",
    "brokerlock_waiters",
    "brokerlock_waiters_name",
    "brokerlock_granted_new",
    "brokerlock_granted",
    "brokerlock_fence",
    "brokerlock_fence_kept",
    "brokerlock_left",
    "brokerlock_clock",
)
#: How many of SCHEMA_NAMES exist, plus 1 for each table that has its newest column,
#: plus 1 if the trigger of earlier versions is gone: a store that is complete answers
#: ``len(SCHEMA_NAMES) + 3``.
SCHEMA_CHECK = (
    f"SELECT (SELECT count(*) FROM sqlite_master WHERE name IN ({', '.join('?' * len(SCHEMA_NAMES))})) + "
    "(SELECT count(*) FROM pragma_table_info('brokerlock_waiters') WHERE name = 'thread') + "
    "(SELECT count(*) FROM pragma_table_info('brokerlock_locks') WHERE name = 'bell') + "
    "(SELECT count(*) = 0 FROM sqlite_master WHERE name = 'brokerlock_freed')"
)
SCHEMA_COMPLETE = len(SCHEMA_NAMES) + 3
#: Deferred reclamation (see embedded.deferred): a kept row goes only if it is still
#: free and nobody waits for its name, the condition the trigger of earlier versions
#: tested; its fence goes into the floor in the same statement (brokerlock_fence_kept).
RECLAIM = (
    "DELETE FROM brokerlock_locks WHERE name = ? AND token IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM brokerlock_waiters w WHERE w.name = brokerlock_locks.name)"
)
