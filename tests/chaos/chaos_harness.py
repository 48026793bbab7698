"""The chaos parent: runs workers against one store, kills and pauses them, checks the journal."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from chaos_checker import Report, check, read_journals

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chaos_worker.py")


@dataclass
class Plan:
    url: str
    directory: str  # journals and worker stderr go here
    processes: int = 4
    threads: int = 2
    ttl: float = 0.25
    hold_max: float = 0.002  # seconds a holder sometimes lingers inside
    min_acquisitions: int = 20_000
    min_seconds: float = 0.0  # run at least this long (--chaos-seconds)
    max_seconds: float = 150.0  # give up (and fail on the count) after this
    kill_every: float = 0.4  # mean seconds between SIGKILLs
    pause_every: float = 1.0  # mean seconds between SIGSTOPs
    seed: Optional[int] = None
    mutant: str = ""  # a deliberately broken store (see chaos_worker), for the checker's own test


@dataclass
class Outcome:
    report: Report
    seconds: float
    kills: int
    pauses: int
    restarts: int
    seed: int
    stderr: List[str] = field(default_factory=list)

    def figures(self) -> Dict[str, object]:
        return {
            **self.report.summary(),
            "kills": self.kills,
            "pauses": self.pauses,
            "restarts": self.restarts,
            "seconds": round(self.seconds, 1),
            "acquisitions_per_second": round(self.report.acquisitions / max(self.seconds, 1e-9)),
            "seed": self.seed,
        }


class _Slot:
    def __init__(self, plan: Plan, index: int) -> None:
        self.plan = plan
        self.index = index
        self.generation = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.journal = ""
        self.paused_until: Optional[float] = None
        self.counted = 0  # bytes of the journal already counted
        self.entries = 0

    def start(self, stop: str) -> None:
        self.generation += 1
        self.journal = f"w{self.index}-{self.generation}.log"
        self.counted = 0
        errors = open(os.path.join(self.plan.directory, self.journal[:-4] + ".err"), "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable, WORKER, self.plan.url, "chaos", repr(self.plan.ttl),
                os.path.join(self.plan.directory, self.journal), str(self.plan.threads),
                repr(self.plan.hold_max), stop,
            ],
            stdout=subprocess.DEVNULL,
            stderr=errors,
            close_fds=True,
            env={**os.environ, "CHAOS_MUTANT": self.plan.mutant},
        )
        errors.close()
        self.paused_until = None

    def count(self) -> int:
        """Entries journaled so far by this slot (all generations)."""
        path = os.path.join(self.plan.directory, self.journal)
        try:
            with open(path, "rb") as f:
                f.seek(self.counted)
                data = f.read()
        except FileNotFoundError:
            return self.entries
        cut = data.rfind(b"\n") + 1
        self.entries += data[:cut].count(b"\nE ") + (1 if data.startswith(b"E ") else 0)
        self.counted += cut
        return self.entries


def run(plan: Plan) -> Outcome:
    seed = plan.seed if plan.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    os.makedirs(plan.directory, exist_ok=True)
    stop = os.path.join(plan.directory, "STOP")
    slots = [_Slot(plan, i) for i in range(plan.processes)]
    kills: Dict[str, int] = {}
    n_kills = n_pauses = restarts = 0
    started = time.monotonic()
    for slot in slots:
        slot.start(stop)
    next_kill = started + 1.0 + rng.expovariate(1 / plan.kill_every)
    next_pause = started + 1.0 + rng.expovariate(1 / plan.pause_every)
    next_count = started
    total = 0
    try:
        while True:
            now = time.monotonic()
            for slot in slots:
                if slot.paused_until is not None and now >= slot.paused_until:
                    assert slot.proc is not None
                    slot.proc.send_signal(signal.SIGCONT)
                    slot.paused_until = None
                assert slot.proc is not None
                if slot.proc.poll() is not None:
                    raise AssertionError(
                        f"worker {slot.journal} exited by itself with {slot.proc.returncode}: "
                        + _tail(plan.directory, slot.journal)
                    )
            if now >= next_count:
                total = sum(slot.count() for slot in slots)
                next_count = now + 0.5
                elapsed = now - started
                if elapsed >= plan.min_seconds and total >= plan.min_acquisitions:
                    break
                if elapsed >= max(plan.max_seconds, plan.min_seconds):
                    break
            if now >= next_kill:
                slot = rng.choice(slots)
                assert slot.proc is not None
                kills[slot.journal] = time.monotonic_ns()  # before the signal: a lower bound
                slot.proc.send_signal(signal.SIGKILL)
                slot.proc.wait()
                slot.count()
                slot.start(stop)
                n_kills += 1
                restarts += 1
                next_kill = now + rng.expovariate(1 / plan.kill_every)
            if now >= next_pause:
                candidates = [s for s in slots if s.paused_until is None]
                if candidates:
                    slot = rng.choice(candidates)
                    assert slot.proc is not None
                    slot.proc.send_signal(signal.SIGSTOP)
                    # Past the ttl, so a lease held by the paused process runs out.
                    slot.paused_until = now + plan.ttl * rng.uniform(1.3, 2.5)
                    n_pauses += 1
                next_pause = now + rng.expovariate(1 / plan.pause_every)
            time.sleep(0.005)
    finally:
        # Let everyone finish the iteration it is in, then collect the journals.
        with open(stop, "w"):
            pass
        for slot in slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGCONT)
        for slot in slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kills[slot.journal] = time.monotonic_ns()
                slot.proc.kill()
                slot.proc.wait()
    seconds = time.monotonic() - started
    report = check(read_journals(plan.directory), kills)
    stderr = [
        f"{entry}: {_tail(plan.directory, entry[:-4] + '.log')}"
        for entry in sorted(os.listdir(plan.directory))
        if entry.endswith(".err") and os.path.getsize(os.path.join(plan.directory, entry))
    ]
    return Outcome(report, seconds, n_kills, n_pauses, restarts, seed, stderr)


def _tail(directory: str, journal: str) -> str:
    path = os.path.join(directory, journal[:-4] + ".err")
    try:
        with open(path, "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")
    except OSError:
        return ""
