"""Redis store: one hash per held lock, changed only by Lua scripts that run atomically.

Keys, all under the prefix (``brokerlock:`` by default):

``<prefix>lock:<name>``
    The lease (a hash: name, token, fence, times, holder), expiring with the lease by
    Redis's own ``PEXPIRE``, so the server's clock ends it and no client clock is used.
``<prefix>fence:<name>``
    The name's fence counter. It never expires. A new fence is
    ``max(counter + 1, server time in microseconds)``: a counter lost to a restart
    without persistence or to a failover that dropped recent writes restarts above
    every fence handed out before, as long as the server's clock does not run back.
``<prefix>queue:<name>``, ``<prefix>alive:<name>``
    The waiters, first come first served: arrival time by the server's clock, and the
    deadline by which each must refresh its place. A newcomer never takes the lock
    while anyone waits ahead of it.
``<prefix>queue:<name>|want``
    Each waiter's request (ttl, host, pid, thread), for a direct hand-over.
``<prefix>signal:<name>:<token>``
    One wake-up list per waiter, on which it blocks in ``BLPOP``. ``release`` hands the
    lock to the first live waiter in its own script and pushes the lease onto that
    waiter's list, so the waiter has the lock when ``BLPOP`` returns; ``force_release``
    only wakes it. A waiter that gives up passes the lock or the wake-up on (and
    releases a lock handed to it as it gave up). A waiter that joins the queue again
    (it was handed the lock, but stopped past the lease before it popped it) has its
    list emptied by the same script, so it never takes a grant that already ended.

Each process keeps one presence connection subscribed to a random channel (see
``redis.presence``) whose name it writes into its leases and queue places: a lease
whose channel has no subscriber belongs to a dead process and is free at once, and
a dead waiter is skipped at once.

Waiting costs (almost) nothing: a waiter runs one script to take its place, then
sleeps in ``BLPOP``. Every script that changes the holder (a grant, a take from the
head of the queue, a waiter leaving) also pushes a look onto the lists of the first
two live waiters, so they learn when the new lease ends: nothing pushes when a lease
expires or its holder dies, so those who may take the lock next look again at the
lease's end. Beyond that a waiter looks only every ``SAFETY_NET`` seconds, which
renews its place and bounds how late a dead holder of a long lease is noticed.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple, TypeVar

from ..._log import log
from ...errors import BrokerLockError
from ..base import Adapter, Lease, Request
from . import codec
from .call import Caller
from .lua import ACQUIRE, EXTEND, FORCE_RELEASE, LEAVE, READ, RELEASE
from .presence import presence_for
from .url import display_url, split_url

if TYPE_CHECKING:
    import redis


T = TypeVar("T")

#: Connecting to a server that does not answer gives up after this many seconds.
CONNECT_TIMEOUT = 5.0
#: A command whose reply does not come within this many seconds fails.
SOCKET_TIMEOUT = 10.0
#: Waiters look again at least this often, whatever they were told: renewing their
#: place and looking for a holder that died (nothing pushes a death). Hand-overs, and
#: the end of the lease each waiter must watch, are pushed (see the module's text).
SAFETY_NET = 5.0
#: A wake-up nobody took is dropped after this many milliseconds.
SIGNAL_TTL_MS = 10_000
#: A queued waiter that has not refreshed its place for this long is dropped from the
#: queue (it stalled; one that died is dropped at once); live waiters refresh at least
#: every SAFETY_NET. A stalled waiter whose turn comes is skipped after GRACE_MS.
PATIENCE_MS = 20_000
#: A waiter whose turn has come (the lock is free, it heads the queue) must take the lock
#: within this many ms or lose its place: a stopped waiter stalls the queue this long,
#: not PATIENCE_MS. Woken by its own BLPOP, a live waiter needs about 1 ms.
GRACE_MS = 100

def _driver() -> Any:
    try:
        import redis
    except ImportError:
        raise BrokerLockError(
            "RedisAdapter needs the redis package: pip install brokerlock[redis]"
        ) from None
    return redis


class RedisAdapter(Adapter):
    """Locks in one Redis server (or one primary with replicas; see the documentation
    on Redis and PostgreSQL in production).

    ``url_or_client`` is a ``redis://`` or ``rediss://`` URL (``?prefix=`` overrides
    ``prefix``) or a ``redis.Redis`` client, whose pool and settings are used as given.
    """

    def __init__(self, url_or_client: str | redis.Redis, prefix: str = "brokerlock:") -> None:
        driver = _driver()
        self._errors = (driver.exceptions.RedisError,)
        if isinstance(url_or_client, str):
            url, prefix = split_url(url_or_client, prefix)
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # One immediate retry on a dropped connection lets the first call after a
            # server restart reconnect instead of failing; every script is safe to
            # run twice (acquire recognises its own token). Timeouts are not retried:
            # they already took the caller's time.
            client = driver.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 1, supported_errors=(driver.exceptions.ConnectionError,)),
            )
            self._own_client = True
        elif isinstance(url_or_client, driver.Redis):
            client = url_or_client
            self._own_client = False
        else:
            raise TypeError(
                "RedisAdapter needs a redis:// URL or a redis.Redis client, not "
                f"{type(url_or_client).__name__}: {url_or_client!r}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}: {prefix!r}")
        self.prefix = prefix
        self._client: redis.Redis = client
        kwargs: Dict[str, Any] = client.connection_pool.connection_kwargs
        if kwargs.get("path"):
            self.server = str(kwargs["path"])
        else:
            self.server = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        ssl = issubclass(client.connection_pool.connection_class, driver.SSLConnection)
        self.url = display_url(kwargs, self.server, self.prefix, ssl)
        socket_timeout = kwargs.get("socket_timeout")
        # A BLPOP must end well before the socket gives up on its reply, or the wake-up
        # it carried would be popped on the server and lost on the way.
        self._block_cap = SAFETY_NET if not socket_timeout else min(SAFETY_NET, socket_timeout / 2)
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._force = client.register_script(FORCE_RELEASE)
        self._extend = client.register_script(EXTEND)
        self._leave = client.register_script(LEAVE)
        self._read = client.register_script(READ)
        self._call = Caller(client) if self._own_client else None
        self._presence = presence_for(f"{self.server} {kwargs.get('username') or ''}", driver, client)

    # -- plumbing ---------------------------------------------------------------
    @property
    def _fences(self) -> str:
        """The store's one fence counter (no colon: no ``kind:name`` key can be it)."""
        return f"{self.prefix}fences"

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def _run(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._errors as exc:
            raise BrokerLockError(f"Redis at {self.server}: could not {action}: {exc}") from None

    def _script(self, action: str, script: Any, keys: List[str], args: List[Any]) -> Any:
        call = self._call
        if call is None:
            return self._run(action, lambda: script(keys=keys, args=args))
        return self._run(action, lambda: call.script(script, keys, args))

    # -- the contract -----------------------------------------------------------
    def now(self) -> float:
        seconds, micros = self._run("read the server's clock", self._client.time)
        return int(seconds) + int(micros) / 1e6

    def _queue(self, name: str) -> List[str]:
        return [self._key("queue", name), self._key("alive", name)]

    def _signal(self, name: str, token: str) -> str:
        """The wake-up list of the waiter with ``token``."""
        return self._key("signal", name) + ":" + token

    def _wake_args(self, name: str) -> List[Any]:
        return [self._key("signal", name) + ":", SIGNAL_TTL_MS, GRACE_MS]

    def try_acquire(self, request: Request) -> Optional[Lease]:
        return self._try(request, False)[0]

    def _try(
        self, request: Request, queued: bool
    ) -> Tuple[Optional[Lease], int, float, int, str, float]:
        """The lease, or ``None`` with what the script said: code (0 held, 1 another
        waiter's turn), seconds to look again by (-1: none), position; our member; and
        the server's clock in seconds, less the monotonic time its reply came in."""
        name = request.name
        for _attempt in (1, 2):
            presence = self._run(f"acquire {name!r}", self._presence.current)
            member = f"{request.token}|{presence}"
            reply = self._script(
                f"acquire {name!r}", self._acquire,
                [self._key("lock", name), self._key("fence", name), *self._queue(name),
                 self._signal(name, request.token), self._fences],
                [request.token, codec.ttl_ms(request.ttl), name, request.host, str(request.pid),
                 request.thread, GRACE_MS, presence, member, PATIENCE_MS, "1" if queued else "",
                 json.dumps([codec.ttl_ms(request.ttl), request.host, str(request.pid), request.thread])
                 if queued else "", *self._wake_args(name)[:2]],
            )
            if isinstance(reply[0], int):
                arrived = time.monotonic()
                code, ms, position, server_ms = (int(x) for x in reply)
                if code == 2:
                    # Our presence connection is gone (a restart, a dropped connection):
                    # a lease named after it would be free for anyone, so get a new one.
                    log.warning("%s: presence connection lost; opening a new one", self.server)
                    self._run("renew the presence", functools.partial(self._presence.renew, presence))
                    continue
                look_by = ms / 1000 + 0.001 if ms >= 0 else -1.0
                return None, code, look_by, position, member, server_ms / 1000 - arrived
            fence, acquired, expires = reply
            lease = Lease(
                name, request.token, int(codec.text(fence)), codec.seconds(acquired) or 0.0,
                codec.seconds(expires), request.host, request.pid, request.thread,
            )
            return lease, 0, 0.0, 0, member, 0.0
        raise BrokerLockError(f"Redis at {self.server}: the presence connection keeps failing")

    def release(self, name: str, token: str) -> bool:
        released = self._script(
            f"release {name!r}", self._release,
            [self._key("lock", name), self._key("fence", name), *self._queue(name), self._fences],
            [token, *self._wake_args(name), name],
        )
        return bool(released)

    def extend(self, name: str, token: str, ttl: Optional[float]) -> Optional[Lease]:
        reply = self._script(
            f"extend {name!r}", self._extend, [self._key("lock", name)], [token, codec.ttl_ms(ttl)]
        )
        return codec.lease_of(codec.fields(reply)) if reply else None

    def get(self, name: str) -> Optional[Lease]:
        flat = self._script(f"read {name!r}", self._read, [self._key("lock", name)], [])
        return codec.lease_of(codec.fields(flat))

    def list(self) -> List[Lease]:
        def scan() -> List[Any]:
            keys = list(self._client.scan_iter(match=codec.glob_escape(self.prefix) + "lock:*", count=500))
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                self._read(keys=[key], client=pipe)
            return pipe.execute()

        leases = []
        for flat in self._run("list the locks", scan):
            # A lease that expired between SCAN and the read reads as empty.
            lease = codec.lease_of(codec.fields(flat))
            if lease is not None:
                leases.append(lease)
        return sorted(leases, key=lambda lease: lease.name)

    def watch(self, name: str, token: str, on_gone: Callable[[str], None]) -> Callable[[], None]:
        # Every lease of this process on the server lives by one presence connection.
        return self._presence.watch(on_gone)

    def force_release(self, name: str) -> bool:
        broken = self._script(
            f"break {name!r}", self._force,
            [self._key("lock", name), *self._queue(name)], ["", *self._wake_args(name)],
        )
        return bool(broken)

    def acquire(self, request: Request, timeout: Optional[float]) -> Optional[Lease]:
        """Wait in the name's queue: first come, first served, woken by the release."""
        if timeout == 0:
            return self.try_acquire(request)
        name = request.name
        deadline = None if timeout is None else time.monotonic() + timeout
        signal = self._signal(name, request.token)
        reachable, members = True, set()
        lease: Optional[Lease] = None
        try:
            while True:
                # One script: take the lock, or take (or keep) our place in the queue,
                # so that a release after it finds us and pushes our wake-up.
                lease, _code, look_by, _position, member, server_offset = self._try(request, True)
                if lease is not None:
                    return lease
                members.add(member)
                now = time.monotonic()
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    return None
                # Look again when the lease we wait for ends (nothing pushes an expiry),
                # or at the safety net; anything else that concerns us is pushed.
                bound = SAFETY_NET if remaining is None else min(SAFETY_NET, remaining)
                if look_by >= 0:
                    bound = min(bound, look_by)
                look_at = now + bound
                while True:
                    # In slices under the socket's timeout; no script between them.
                    popped = self._pop(name, signal, look_at - time.monotonic())
                    if popped is not None or time.monotonic() >= look_at:
                        break
                if popped is not None and " " in popped:
                    # The release handed us the lock in its own script.
                    lease = self._granted(request, popped, server_offset)
                    if lease is not None:
                        return lease
        except BrokerLockError:
            # The server is gone: our place lapses by itself, and trying to leave would
            # only delay the error by another timeout.
            reachable = False
            raise
        finally:
            if lease is None and reachable and members:
                self._give_up(request, members)

    _granted = staticmethod(codec.granted)

    def _block(self, name: str, signal: str, timeout: Optional[float]) -> Optional[str]:
        """Wait for a wake-up; the lease (``"fence acquired expires"``) if it handed
        us the lock."""
        value = self._pop(name, signal, timeout)
        return value if value is not None and " " in value else None

    def _pop(self, name: str, signal: str, timeout: Optional[float]) -> Optional[str]:
        """Wait for a wake-up: what was pushed (a lease, or ``"1"``: look), or ``None``
        when the time ran out."""
        block = self._block_cap if timeout is None else min(timeout, self._block_cap)
        if block <= 0:
            return None
        # In whole milliseconds, at least one (0 means "forever"); the cap keeps it under
        # the socket's timeout (see _redis_call).
        block = max(0.001, math.ceil(block * 1000) / 1000)
        call = self._call
        popped = self._run(
            f"wait for {name!r}",
            lambda: call.command((b"BLPOP", signal, f"{block:.3f}")) if call
            else self._client.blpop([signal], timeout=block),
        )
        return codec.text(popped[1]) if popped else None

    def abandon(self, name: str, token: str) -> None:
        # LEAVE also deletes a lease that ``token`` holds and hands the lock on. A place
        # taken under an older presence channel is dead already: skipped by all.
        member = f"{token}|{self._run(f'acquire {name!r}', self._presence.current)}"
        self._script(
            f"leave the queue of {name!r}", self._leave,
            [self._key("lock", name), self._key("fence", name), *self._queue(name)],
            [member, *self._wake_args(name), name],
        )
        self._run(f"leave the queue of {name!r}", lambda: self._client.delete(self._signal(name, token)))

    def _give_up(self, request: Request, members: Set[str]) -> None:
        name = request.name
        try:
            for member in members:
                self._script(
                    f"leave the queue of {name!r}", self._leave,
                    [self._key("lock", name), self._key("fence", name), *self._queue(name), self._fences],
                    [member, *self._wake_args(name), name],
                )
            self._client.delete(self._signal(name, request.token))
        except (BrokerLockError, *self._errors) as exc:
            # Our place lapses by itself after PATIENCE_MS; the caller's error matters more.
            log.debug("could not leave the queue of %r: %s", name, exc)

    def close(self) -> None:
        if self._own_client:
            self._client.close()
