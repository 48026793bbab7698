"""What each participant (a process, or a thread for in-process locks) does.

Participants share one array of 64-bit integers (``multiprocessing.RawArray``, no
lock of its own). Inside every critical section a participant checks that nobody else
is inside and increments a counter *non-atomically* (read, then write): if the lock
under test ever lets two holders in, the owner check or the final count catches it.

Times that cross processes are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for
the whole system on Linux); ``perf_counter_ns`` is only used within one process.
"""

from __future__ import annotations

import random
import resource
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from kinds import BY_NAME, Env, Lock

# Slots of the shared array.
COUNTER, OWNER, VIOLATIONS, T_RELEASE, SEQ, STOP, NSAMPLES, HELD, WARM = range(9)
MAX_PARTICIPANTS = 16
WAITING = 16  # one flag per participant: "I am about to block in acquire()"
SIZE = WAITING + MAX_PARTICIPANTS

#: How long a participant waits for the others to reach a rendezvous before it
#: declares the run broken (a lock that never hands over, a crashed peer).
RENDEZVOUS = 60.0


@dataclass(frozen=True)
class Plan:
    """How long and how much each figure measures; ``--quick`` shrinks every bound."""

    participants: int = 8
    uncontended_seconds: float = 1.0
    uncontended_max: int = 20000
    handoff_counts: Tuple[int, ...] = (2, 8)
    handoff_seconds: float = 3.0  # soft bound: stop once past it with enough samples
    handoff_min: int = 10
    handoff_max: int = 200
    throughput_seconds: float = 2.0
    cpu_hold_seconds: float = 5.0


Shared = Any  # a multiprocessing RawArray('q'), indexable like a list
Report = Callable[[str, int, Dict[str, Any]], None]


class Violation(AssertionError):
    pass


def enter(sh: Shared, me: int) -> None:
    """Called right after acquire(): nobody else may be inside."""
    if sh[OWNER] != 0:
        sh[VIOLATIONS] += 1
    sh[OWNER] = me + 1
    count = sh[COUNTER]  # a non-atomic increment: two holders at once lose updates
    sh[COUNTER] = count + 1


def leave(sh: Shared, me: int) -> None:
    """Called right before release(): we must still be the one inside."""
    if sh[OWNER] != me + 1:
        sh[VIOLATIONS] += 1
    sh[OWNER] = 0


def wait_until(cond: Callable[[], bool], what: str, timeout: float = RENDEZVOUS) -> None:
    # Sleeps between looks: a spinning bystander would steal one of the two cores
    # from the very processes whose handoff we time.
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout} s")
        time.sleep(0.0005)


def uncontended(lock: Lock, sh: Shared, me: int, plan: Plan) -> Dict[str, Any]:
    for _ in range(50):  # warm up connections, prepared statements, caches
        lock.acquire()
        enter(sh, me)
        leave(sh, me)
        lock.release()
    cycles: List[int] = []
    end = time.monotonic() + plan.uncontended_seconds
    while len(cycles) < plan.uncontended_max and time.monotonic() < end:
        t0 = time.perf_counter_ns()
        lock.acquire()
        t1 = time.perf_counter_ns()
        enter(sh, me)  # outside the timed spans: the check is not the lock's cost
        leave(sh, me)
        t2 = time.perf_counter_ns()
        lock.release()
        t3 = time.perf_counter_ns()
        cycles.append((t1 - t0) + (t3 - t2))
    return {"cycles_ns": cycles, "acquisitions": 50 + len(cycles)}


def handoff(lock: Lock, sh: Shared, me: int, n: int, plan: Plan, settle: float) -> Dict[str, Any]:
    """Turn-taking: the holder waits until every other participant is blocked in
    acquire(), pauses, stamps the time and releases; whoever gets the lock next stamps
    the time it returned. A participant that released competes again only after
    somebody else has taken the lock, so the lock changes hands every time."""
    rng = random.Random()
    samples: List[int] = []
    acquisitions = 0
    start = time.monotonic()
    soft, hard = start + plan.handoff_seconds, start + 3 * plan.handoff_seconds + 2
    while not sh[STOP]:
        sh[WAITING + me] = 1
        lock.acquire()
        t_acquired = time.monotonic_ns()
        sh[WAITING + me] = 0
        enter(sh, me)
        acquisitions += 1
        if sh[VIOLATIONS]:
            sh[STOP] = 1  # turn-taking cannot go on once two hold at once; the run fails
        stopping = bool(sh[STOP])
        t_released = sh[T_RELEASE]
        if t_released and not stopping:
            samples.append(t_acquired - t_released)
            sh[NSAMPLES] += 1  # safe: we hold the lock
        sh[SEQ] += 1
        seq = sh[SEQ]
        now = time.monotonic()
        if not stopping and (
            sh[NSAMPLES] >= plan.handoff_max
            or (now > soft and sh[NSAMPLES] >= plan.handoff_min)
            or now > hard
        ):
            sh[STOP] = stopping = True
        if not stopping:
            wait_until(
                lambda: all(sh[WAITING + j] for j in range(n) if j != me) or bool(sh[STOP]),
                "the others to block",
            )
            # Let the last of them get from the flag into its blocking call, and land
            # the release at a random point of a polling lock's period.
            time.sleep(0.001 + rng.uniform(0, settle))
        leave(sh, me)
        sh[T_RELEASE] = time.monotonic_ns()
        lock.release()
        if stopping:
            break
        wait_until(_changed(sh, seq), "another participant to take the lock")
    return {"samples_ns": samples, "acquisitions": acquisitions}


def _changed(sh: Shared, seq: int) -> Callable[[], bool]:
    return lambda: sh[SEQ] != seq or bool(sh[STOP])


def throughput(lock: Lock, sh: Shared, me: int, plan: Plan) -> Dict[str, Any]:
    """Everybody loops acquire/release with nothing held in between."""
    in_window = 0
    acquisitions = 0
    worst = 0
    deadline = time.monotonic_ns() + int(plan.throughput_seconds * 1e9)
    while True:
        t0 = time.monotonic_ns()
        if t0 >= deadline:
            break
        lock.acquire()
        t1 = time.monotonic_ns()
        enter(sh, me)
        leave(sh, me)
        lock.release()
        acquisitions += 1
        worst = max(worst, t1 - t0)
        if t1 <= deadline:
            in_window += 1
    return {"in_window": in_window, "acquisitions": acquisitions, "worst_wait_ns": worst}


def _cpu_ns(scope: int) -> int:
    usage = resource.getrusage(scope)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


def blocked_cpu(lock: Lock, sh: Shared, me: int, plan: Plan, scope: int) -> Dict[str, Any]:
    """Participant 1 waits once briefly (warm-up), then participant 0 holds the lock
    for ``cpu_hold_seconds``; participant 1 blocks meanwhile and measures its own CPU
    time (its whole process, helper threads included, unless the participants are
    threads, where only its own thread can be told apart)."""
    if me == 0:
        for hold, held in ((0.2, 1), (plan.cpu_hold_seconds, 2)):
            if held == 2:
                wait_until(lambda: bool(sh[WARM]), "the waiter to warm up")
            lock.acquire()
            enter(sh, me)
            sh[HELD] = held
            wait_until(lambda: bool(sh[WAITING + 1]), "the waiter to block")
            sh[WAITING + 1] = 0
            time.sleep(hold)
            leave(sh, me)
            lock.release()
        return {"acquisitions": 2}
    # One short wait first, for every lock alike: connecting to a server, loading
    # scripts or making a waiter's bell happens once per process (or thread) and is
    # not the cost of waiting.
    wait_until(lambda: sh[HELD] == 1, "the holder to hold")
    sh[WAITING + 1] = 1
    lock.acquire()
    enter(sh, me)
    leave(sh, me)
    lock.release()
    sh[WARM] = 1
    wait_until(lambda: sh[HELD] == 2, "the holder to hold")
    # A lock that waits in a helper process of its own (Deepkit's Node client) adds
    # that process's CPU.
    helper: Callable[[], int] = getattr(lock, "cpu_ns", lambda: 0)
    cpu0, t0 = _cpu_ns(scope) + helper(), time.monotonic_ns()
    sh[WAITING + 1] = 1
    lock.acquire()
    t1, cpu1 = time.monotonic_ns(), _cpu_ns(scope) + helper()
    enter(sh, me)  # the holder is still inside if acquire() returned too early
    leave(sh, me)
    lock.release()
    return {"acquisitions": 2, "cpu_ns": cpu1 - cpu0, "blocked_ns": t1 - t0}


class _Barrier:
    """A multiprocessing or threading barrier, bounded in time."""

    def __init__(self, barrier: Any) -> None:
        self.barrier = barrier

    def wait(self) -> None:
        self.barrier.wait(RENDEZVOUS)


def participant(
    kind_name: str,
    env: Env,
    me: int,
    plan: Plan,
    stage: str,
    sh: Shared,
    barrier: Any,
    report: Report,
    scope: int,
) -> None:
    """Run every phase of ``stage`` ("contention" or "cpu") as participant ``me``."""
    lock: Optional[Lock] = None
    sync = _Barrier(barrier)
    try:
        lock = BY_NAME[kind_name].make(env, "bench")
        kind = BY_NAME[kind_name]
        sync.wait()
        if stage == "cpu":
            report("cpu", me, blocked_cpu(lock, sh, me, plan, scope))
            return
        if me == 0:
            report("uncontended", me, uncontended(lock, sh, me, plan))
        for n in plan.handoff_counts:
            sync.wait()
            if me == 0:  # reset between two barriers: nobody is using the lock
                sh[STOP] = sh[NSAMPLES] = sh[T_RELEASE] = 0
            sync.wait()
            if me < n:
                report(f"handoff{n}", me, handoff(lock, sh, me, n, plan, kind.settle))
        sync.wait()
        report("throughput", me, throughput(lock, sh, me, plan))
    except BaseException as exc:  # report everything: the parent decides what fails
        sh[STOP] = 1  # let the others finish rather than wait for us
        report("error", me, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        try:
            barrier.abort()
        except Exception:
            pass
    finally:
        if lock is not None:
            try:
                lock.close()
            except Exception:
                pass
        report("done", me, {})


def process_main(
    kind_name: str, env: Env, me: int, plan: Plan, stage: str, sh: Shared, barrier: Any, queue: Any
) -> None:
    """Entry point of one participant process."""

    def report(phase: str, who: int, data: Dict[str, Any]) -> None:
        queue.put((phase, who, data))

    participant(kind_name, env, me, plan, stage, sh, barrier, report, resource.RUSAGE_SELF)


def threads_main(kind_name: str, env: Env, n: int, plan: Plan, stage: str, sh: Shared, queue: Any) -> None:
    """Entry point of the one process whose threads are the participants."""
    barrier = threading.Barrier(n)

    def report(phase: str, who: int, data: Dict[str, Any]) -> None:
        queue.put((phase, who, data))

    threads = [
        threading.Thread(
            target=participant,
            args=(kind_name, env, me, plan, stage, sh, barrier, report, resource.RUSAGE_THREAD),
            daemon=True,
        )
        for me in range(n)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def plan_dict(plan: Plan) -> Dict[str, Any]:
    return asdict(plan)
