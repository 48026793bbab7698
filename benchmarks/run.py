"""brokerlock against the locks people use today, side by side in one run.

    python benchmarks/run.py                 # full run, a few minutes
    python benchmarks/run.py --quick         # smoke run, under a minute
    python benchmarks/run.py --backends file,sqlite --out results.json

Figures: (1) uncontended acquire+release cycle; (2) handoff latency to a parked
waiter with 2 and 8 processes; (3) contended throughput and fairness with 8 processes;
(4) CPU burnt by a waiter blocked for a while; (5) start-up time; (6) what 100,000
one-off names leave in each store (benchmarks/one_off_names.py). Every figure also
checks mutual exclusion and the run exits 1 if any lock let two holders in (or if a
brokerlock back end failed); missed targets are reported, not failed.

Deepkit's broker (npm @deepkit/broker 1.0.19, the system brokerlock was ported from)
runs as a peer when node and npm are installed: the packages are installed once into
~/.cache/brokerlock-bench (or $BROKERLOCK_BENCH_CACHE), else the row is skipped with a
note. On a shared machine, time the run under ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import queue as queue_module
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Measure the working tree's brokerlock, not whatever copy is installed; spawned
# children inherit this sys.path.
sys.path[:0] = [HERE, ROOT]

import kinds as kinds_module  # noqa: E402
import one_off_names  # noqa: E402
import workload  # noqa: E402
from kinds import KINDS, Env, Kind  # noqa: E402
from workload import Plan  # noqa: E402

QUICK = Plan(
    uncontended_seconds=0.1,
    uncontended_max=2000,
    handoff_seconds=0.25,
    handoff_min=3,
    handoff_max=30,
    throughput_seconds=0.3,
    cpu_hold_seconds=0.5,
)
FULL = Plan()


# -- running one kind ----------------------------------------------------------------
class KindResult:
    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.reason: Optional[str] = None  # why it was not run (n/a)
        self.errors: List[str] = []
        self.violations: List[str] = []
        self.phases: Dict[str, Dict[int, Dict[str, Any]]] = {}

    def data(self, phase: str) -> Dict[int, Dict[str, Any]]:
        return self.phases.get(phase, {})


def _collect(
    result: KindResult, procs: Sequence[Any], queue: Any, expected: int, deadline: float, stage: str
) -> None:
    done = 0
    while done < expected:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            result.errors.append(f"{stage}: timed out (a participant hung; killed)")
            break
        try:
            phase, who, data = queue.get(timeout=min(remaining, 1.0))
        except queue_module.Empty:
            if all(p.exitcode is not None for p in procs) and queue.empty():
                result.errors.append(f"{stage}: participants exited without reporting")
                break
            continue
        if phase == "done":
            done += 1
        elif phase == "error":
            result.errors.append(f"{stage} #{who}: {data['error']}")
            print(data["traceback"], file=sys.stderr)
        else:
            result.phases.setdefault(phase, {})[who] = data


def _start(kind: Kind, env: Env, plan: Plan, stage: str, n: int) -> Tuple[List[Any], Any, Any]:
    ctx = mp.get_context("spawn")
    shared = ctx.RawArray("q", workload.SIZE)
    queue = ctx.Queue()
    barrier = None
    if kind.mode == "thread":
        procs = [
            ctx.Process(target=workload.threads_main, args=(kind.name, env, n, plan, stage, shared, queue))
        ]
    else:
        barrier = ctx.Barrier(n)
        procs = [
            ctx.Process(
                target=workload.process_main, args=(kind.name, env, me, plan, stage, shared, barrier, queue)
            )
            for me in range(n)
        ]
    for proc in procs:
        proc.start()
        # The barrier's semaphore is unlinked when the parent's handle is collected,
        # possibly before a child has opened it: keep it alive with the processes.
        proc._bench_barrier = barrier  # type: ignore[attr-defined]
    return procs, shared, queue


def _finish(result: KindResult, procs: Sequence[Any], shared: Any, stage: str, phases: Sequence[str]) -> None:
    for proc in procs:
        proc.join(5)
        if proc.exitcode is None:
            proc.kill()  # only our own children, by handle
            proc.join()
    # Mutual exclusion: no overlap seen, and no increment of the counter lost.
    reported = sum(d.get("acquisitions", 0) for p in phases for d in result.data(p).values())
    if shared[workload.VIOLATIONS]:
        result.violations.append(f"{stage}: {shared[workload.VIOLATIONS]} overlapping holders seen")
    if not result.errors and shared[workload.COUNTER] != reported:
        result.violations.append(
            f"{stage}: shared counter is {shared[workload.COUNTER]} after {reported} acquisitions"
        )


def _round_plan(plan: Plan, rounds: int) -> Plan:
    """One round's share of ``plan``'s contention figures."""
    return dataclasses.replace(
        plan,
        uncontended_seconds=plan.uncontended_seconds / rounds,
        uncontended_max=max(1, plan.uncontended_max // rounds),
        handoff_seconds=plan.handoff_seconds / rounds,
        handoff_min=max(1, -(-plan.handoff_min // rounds)),
        handoff_max=max(1, plan.handoff_max // rounds),
        throughput_seconds=plan.throughput_seconds / rounds,
    )


def _merge(into: KindResult, round_result: KindResult) -> None:
    """Add one round's figures to the lock's: samples pooled, throughput counts summed
    (over the rounds' windows, which add up to the plan's)."""
    into.errors += round_result.errors
    into.violations += round_result.violations
    for phase, by_who in round_result.phases.items():
        mine = into.phases.setdefault(phase, {})
        for who, data in by_who.items():
            old = mine.get(who)
            if old is None:
                mine[who] = dict(data)
                continue
            for key, value in data.items():
                if key.endswith("_ns") and isinstance(value, list):
                    old[key] = old[key] + value
                elif key.startswith("worst"):
                    old[key] = max(old[key], value)
                elif isinstance(value, (int, float)):
                    old[key] = old[key] + value


def contention_stage(kind: Kind, env: Env, plan: Plan, result: KindResult) -> None:
    n = plan.participants
    procs, shared, queue = _start(kind, env, plan, "contention", n)
    budget = (
        60
        + plan.uncontended_seconds
        + plan.throughput_seconds
        + sum(3 * plan.handoff_seconds + 2 for _ in plan.handoff_counts)
    )
    _collect(result, procs, queue, n, time.monotonic() + budget, "contention")
    phases = ["uncontended", "throughput"] + [f"handoff{c}" for c in plan.handoff_counts]
    _finish(result, procs, shared, "contention", phases)


def cpu_stage(jobs: List[Tuple[Kind, KindResult]], env: Env, plan: Plan) -> None:
    """All kinds at once: each waiter measures only its own CPU time, so they need not
    take turns, and the run stays short."""
    started = [(kind, result, *_start(kind, env, plan, "cpu", 2)) for kind, result in jobs]
    deadline = time.monotonic() + plan.cpu_hold_seconds + 90
    for _kind, result, procs, _shared, queue in started:
        _collect(result, procs, queue, 2, deadline, "cpu")
    for _kind, result, procs, shared, _queue in started:
        _finish(result, procs, shared, "cpu", ["cpu"])
        data = result.data("cpu").get(1)
        if data and data["blocked_ns"] < 0.9 * plan.cpu_hold_seconds * 1e9:
            result.violations.append(
                f"cpu: the waiter got the lock after {data['blocked_ns'] / 1e9:.3f} s while it was held "
                f"for {plan.cpu_hold_seconds} s"
            )


# -- start-up ------------------------------------------------------------------------------
def _median_run(argv: List[str], env: Dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def startup(workdir: str, runs: int) -> Dict[str, Any]:
    py = sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # An installed package runs from bytecode (pip compiles it at install time); a
    # checkout under PYTHONDONTWRITEBYTECODE would compile every module on every run
    # and time the compiler, not the lock. So let the warm-up runs write .pyc files.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # The CLI's default store is in the user's home: point it at a scratch store.
    env["BROKERLOCK_URL"] = "sqlite:///" + os.path.join(workdir, "cli.sqlite3")
    commands: Dict[str, Optional[List[str]]] = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import brokerlock'": [py, "-c", "import brokerlock"],
    }
    notes: Dict[str, str] = {}
    have_cli = any(
        os.path.exists(os.path.join(ROOT, "brokerlock", *part)) for part in (("cli.py",), ("cli", "main.py"))
    )
    script = os.path.join(sysconfig.get_path("scripts"), "brokerlock")
    for label, argv in (
        ("brokerlock run x -- true", [script, "run", "x", "--", "true"]),
        ("python -m brokerlock run x -- true", [py, "-m", "brokerlock", "run", "x", "--", "true"]),
    ):
        if not have_cli:
            commands[label], notes[label] = None, "brokerlock/cli.py does not exist yet"
            continue
        if label.startswith("brokerlock") and not os.path.exists(script):
            commands[label], notes[label] = None, "the brokerlock console script is not installed"
            continue
        trial = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if trial.returncode != 0:
            commands[label] = None
            notes[label] = f"exit {trial.returncode}: {trial.stdout.decode(errors='replace').strip()[-200:]}"
            continue
        commands[label] = argv
    for maybe in list(commands.values())[:2]:  # warm the page cache and .pyc files (the
        if maybe:  # CLI commands were warmed by their trial run)
            subprocess.run(maybe, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    seconds: Dict[str, Optional[float]] = {label: None for label in commands}
    # Interleaved rounds, so a burst of load on the machine hits every command alike.
    samples: Dict[str, List[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, cmd in commands.items():
            if cmd:
                samples[label].append(_median_run(cmd, env, 1))
    for label, values in samples.items():
        if values:
            seconds[label] = statistics.median(values)
    return {"seconds": seconds, "notes": notes, "runs": runs}


# -- summarising -------------------------------------------------------------------------
def _pct(values: List[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(result: KindResult, plan: Plan) -> Dict[str, Any]:
    kind = result.kind
    out: Dict[str, Any] = {
        "name": kind.name,
        "family": kind.family,
        "ours": kind.ours,
        "mode": kind.mode,
        "note": kind.note,
        "reason": result.reason,
        "errors": result.errors,
        "violations": result.violations,
    }
    unc = result.data("uncontended").get(0)
    if unc and unc["cycles_ns"]:
        out["uncontended_ns"] = statistics.median(unc["cycles_ns"])
        out["uncontended_cycles"] = len(unc["cycles_ns"])
    handoff: Dict[str, Any] = {}
    for n in plan.handoff_counts:
        samples = [s for d in result.data(f"handoff{n}").values() for s in d["samples_ns"]]
        if samples:
            handoff[str(n)] = {"p50_ns": _pct(samples, 0.5), "p90_ns": _pct(samples, 0.9), "n": len(samples)}
    out["handoff"] = handoff
    thr = result.data("throughput")
    if len(thr) == plan.participants:
        counts = [thr[i]["in_window"] for i in sorted(thr)]
        total = sum(counts)
        out["throughput"] = {
            "per_s": total / plan.throughput_seconds,
            "least_share": (min(counts) / (total / len(counts))) if total else 0.0,
            "worst_wait_ns": max(d["worst_wait_ns"] for d in thr.values()),
            "counts": counts,
        }
    cpu = result.data("cpu").get(1)
    if cpu:
        out["cpu"] = {"cpu_ns": cpu["cpu_ns"], "blocked_ns": cpu["blocked_ns"]}
    return out


def fmt_ns(ns: Optional[float]) -> str:
    if ns is None:
        return "n/a"
    if ns < 1e6:
        return f"{ns / 1e3:,.0f} µs" if ns >= 10e3 else f"{ns / 1e3:.1f} µs"
    if ns < 1e9:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def table(title: str, header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    for row in rows:
        out.append(
            "  ".join((c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(row, widths)))
        )
    out.append(line)
    return "\n".join(out)


#: Which peer each brokerlock back end's uncontended cycle is held against (issue 5,
#: revised for the embedded stores by issue 17).
CYCLE_REFERENCE = {
    "brokerlock file": ("fasteners", 1.3),
    "brokerlock sqlite": ("sqlite row", 1.5),
    "brokerlock redis": ("redis SET NX", 1.3),
    "brokerlock postgres": ("pg upsert row", 1.3),
}
#: Hand-over p50 in µs by back end and number of processes (issue 17 for the embedded
#: stores, issue 5 for the servers).
HANDOFF_TARGET_US = {
    "file": {2: 150, 8: 225},
    "sqlite": {2: 150, 8: 225},
    "redis": {2: 500, 8: 500},
    "postgres": {2: 500, 8: 500},
}
VS_FILELOCK = {"file": 100, "sqlite": 100}
#: brokerlock's hand-over p50 at most this share of Deepkit's broker's (issue 17), on
#: every back end but PostgreSQL (whose NOTIFY wakes every listener of the database).
VS_DEEPKIT = {"file": 0.5, "sqlite": 0.5, "redis": 0.5}
THROUGHPUT_TARGET = {"file": 5000, "sqlite": 5000, "redis": 2000, "postgres": 2000}
#: A blocked waiter's CPU, ms per 5 s blocked (issue 17).
WAITER_CPU_MS_PER_5S = 1.0


def _label(s: Dict[str, Any]) -> str:
    return str(s["name"]) + (" (threads)" if s["mode"] == "thread" else "")


def _na(s: Dict[str, Any]) -> Optional[str]:
    if s["reason"]:
        return f"n/a: {s['reason']}"
    return None


def report(
    summaries: List[Dict[str, Any]],
    start: Dict[str, Any],
    plan: Plan,
    quick: bool,
    one_off: Optional[Dict[str, Dict[str, Any]]] = None,
) -> Tuple[str, List[Dict[str, Any]]]:
    by = {s["name"]: s for s in summaries}
    chunks: List[str] = []

    def get(name: str, *path: str) -> Optional[float]:
        value: Any = by.get(name)
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if value is not None else None

    floor_cycle = get("flock", "uncontended_ns")
    rows = []
    for s in summaries:
        cyc = s.get("uncontended_ns")
        ref = CYCLE_REFERENCE.get(s["name"])
        ref_cycle = get(ref[0], "uncontended_ns") if ref else None
        rows.append(
            [
                _label(s),
                _na(s) or fmt_ns(cyc),
                fmt_ratio(cyc / floor_cycle) if cyc and floor_cycle else "",
                f"{fmt_ratio(cyc / ref_cycle)} of {ref[0]}" if ref and cyc and ref_cycle else "",
            ]
        )
    chunks.append(
        table(
            "(1) Uncontended acquire+release, median per cycle",
            ["lock", "cycle", "vs flock", "vs its raw peer"],
            rows,
        )
    )

    rows = []
    fl = get("filelock", "handoff", "2", "p50_ns")
    for s in summaries:
        h = s.get("handoff", {})
        cells = [_label(s)]
        for n in plan.handoff_counts:
            d = h.get(str(n))
            cells += [fmt_ns(d["p50_ns"]) if d else (_na(s) or "n/a"), fmt_ns(d["p90_ns"]) if d else ""]
        p50 = h.get("2", {}).get("p50_ns")
        cells.append(f"{fmt_ratio(fl / p50)} faster" if fl and p50 else "")
        rows.append(cells)
    header = ["lock"]
    for n in plan.handoff_counts:
        header += [f"p50 {n}p", f"p90 {n}p"]
    chunks.append(
        table(
            "(2) Handoff: release -> a parked waiter has the lock",
            [*header, "filelock p50 / this (2p)"],
            rows,
        )
    )

    rows = []
    floor_thr = get("flock", "throughput", "per_s")
    for s in summaries:
        t = s.get("throughput")
        if not t:
            rows.append([_label(s), _na(s) or "n/a", "", "", ""])
            continue
        rows.append(
            [
                _label(s),
                f"{t['per_s']:,.0f}",
                fmt_ratio(t["per_s"] / floor_thr) if floor_thr else "",
                f"{100 * t['least_share']:.0f} %",
                fmt_ns(t["worst_wait_ns"]),
            ]
        )
    chunks.append(
        table(
            f"(3) {plan.participants} processes, ~0 hold, {plan.throughput_seconds:g} s",
            ["lock", "acq/s", "vs flock", "least share", "worst wait"],
            rows,
        )
    )

    rows = []
    for s in summaries:
        c = s.get("cpu")
        if not c:
            rows.append([_label(s), _na(s) or "n/a", ""])
            continue
        rows.append(
            [_label(s), f"{c['cpu_ns'] / 1e6:.1f} ms", f"{100 * c['cpu_ns'] / c['blocked_ns']:.2f} %"]
        )
    chunks.append(
        table(
            f"(4) CPU of a waiter blocked {plan.cpu_hold_seconds:g} s (getrusage)",
            ["lock", "CPU", "of a core"],
            rows,
        )
    )

    sec = start["seconds"]
    base = sec.get("python -c pass")
    rows = []
    for label, value in sec.items():
        note = start["notes"].get(label)
        rows.append(
            [
                label,
                fmt_ns(value * 1e9) if value is not None else "n/a",
                f"+{(value - base) * 1e3:.1f} ms" if value is not None and base else "",
                fmt_ratio(value / base) if value is not None and base else (note or ""),
            ]
        )
    if rows:
        chunks.append(
            table(
                f"(5) Start-up, median of {start['runs']} runs",
                ["command", "wall", "over python", "ratio"],
                rows,
            )
        )

    one_off = one_off or {}
    rows = []
    for family, r in one_off.items():
        if "error" in r:
            rows.append([family, r["error"], "", "", "", ""])
            continue
        first, second = r["runs"]
        rows.append(
            [
                family,
                f"{r['names']:,} x2",
                f"{second['records']:,}"
                + (f" ({r['records_closed']:,} closed)" if "records_closed" in r else ""),
                f"{first['bytes'] / 1e6:.2f} / {second['bytes'] / 1e6:.2f} MB",
                fmt_ns(r["list_s"] * 1e9),
                fmt_ns(r["list_call_s"] * 1e9),
            ]
        )
    if rows:
        chunks.append(
            table(
                "(6) One-off names, acquired and released once each, two runs of new names",
                ["back end", "names", "records left", "size after 1st / 2nd", "brokerlock list", "list()"],
                rows,
            )
        )

    # Targets of issues 5 and 17.
    targets: List[Dict[str, Any]] = []

    def target(
        figure: str, backend: str, goal: str, value: Optional[float], ok: Optional[bool], shown: str
    ) -> None:
        targets.append(
            {
                "figure": figure,
                "backend": backend,
                "target": goal,
                "measured": shown,
                "value": value,
                "verdict": "n/a" if ok is None else "meets" if ok else "MISSES",
            }
        )

    for family in ("file", "sqlite", "redis", "postgres"):
        name = "brokerlock " + family
        if name not in by:
            continue  # not selected with --backends
        for n in plan.handoff_counts:
            p50 = get(name, "handoff", str(n), "p50_ns")
            goal = HANDOFF_TARGET_US[family].get(n, max(HANDOFF_TARGET_US[family].values()))
            target(
                f"handoff p50, {n} processes",
                family,
                f"<= {goal} µs",
                p50,
                None if p50 is None else p50 <= goal * 1e3,
                fmt_ns(p50),
            )
        if family in VS_FILELOCK:
            p50 = get(name, "handoff", "2", "p50_ns")
            ratio = fl / p50 if fl and p50 else None
            target(
                "handoff p50 vs filelock (2p)",
                family,
                f">= {VS_FILELOCK[family]}x faster",
                ratio,
                None if ratio is None else ratio >= VS_FILELOCK[family],
                fmt_ratio(ratio) if ratio else "n/a",
            )
        if family in VS_DEEPKIT:
            for n in plan.handoff_counts:
                p50 = get(name, "handoff", str(n), "p50_ns")
                theirs = get("deepkit broker", "handoff", str(n), "p50_ns")
                share = p50 / theirs if p50 and theirs else None
                target(
                    f"handoff p50 vs Deepkit's broker ({n}p)",
                    family,
                    f"<= {VS_DEEPKIT[family]:g}x of it",
                    share,
                    None if share is None else share <= VS_DEEPKIT[family],
                    f"{fmt_ratio(share)} ({fmt_ns(p50)} vs {fmt_ns(theirs)})" if share else "n/a",
                )
        ref_name, limit = CYCLE_REFERENCE[name]
        cyc, ref_cycle = get(name, "uncontended_ns"), get(ref_name, "uncontended_ns")
        ratio = cyc / ref_cycle if cyc and ref_cycle else None
        target(
            "uncontended cycle",
            family,
            f"<= {limit}x {ref_name}",
            ratio,
            None if ratio is None else ratio <= limit,
            f"{fmt_ratio(ratio)} ({fmt_ns(cyc)} vs {fmt_ns(ref_cycle)})" if ratio else "n/a",
        )
        cpu = get(name, "cpu", "cpu_ns")
        # A shorter block gets a proportional share of the 5 s target.
        allowed = WAITER_CPU_MS_PER_5S * 1e6 * plan.cpu_hold_seconds / 5
        target(
            f"CPU of a waiter blocked {plan.cpu_hold_seconds:g} s",
            family,
            f"<= {allowed / 1e6:g} ms",
            cpu,
            None if cpu is None else cpu <= allowed,
            f"{cpu / 1e6:.1f} ms" if cpu is not None else "n/a",
        )
        share = get(name, "throughput", "least_share")
        target(
            "least share of a fair split (8p)",
            family,
            ">= 80 %",
            share,
            None if share is None else share >= 0.8,
            f"{100 * share:.0f} %" if share is not None else "n/a",
        )
        per_s = get(name, "throughput", "per_s")
        goal_thr = THROUGHPUT_TARGET[family]
        target(
            "acquisitions/s (8p)",
            family,
            f">= {goal_thr:,}",
            per_s,
            None if per_s is None else per_s >= goal_thr,
            f"{per_s:,.0f}" if per_s is not None else "n/a",
        )
    cpu = get("brokerlock memory", "cpu", "cpu_ns")
    if "brokerlock memory" in by:
        allowed = WAITER_CPU_MS_PER_5S * 1e6 * plan.cpu_hold_seconds / 5
        target(
            f"CPU of a waiter blocked {plan.cpu_hold_seconds:g} s",
            "memory",
            f"<= {allowed / 1e6:g} ms",
            cpu,
            None if cpu is None else cpu <= allowed,
            f"{cpu / 1e6:.2f} ms" if cpu is not None else "n/a",
        )
    for family, r in one_off.items():
        if "error" in r:
            continue
        target(
            f"{r['names']:,} one-off names: records left",
            family,
            f"<= {one_off_names.MAX_RECORDS:,}",
            r["records"],
            r["records"] <= one_off_names.MAX_RECORDS,
            f"{r['records']:,}",
        )
        target(
            f"{r['names']:,} one-off names: brokerlock list",
            family,
            f"< {one_off_names.MAX_LIST_SECONDS * 1e3:.0f} ms",
            r["list_s"],
            r["list_s"] < one_off_names.MAX_LIST_SECONDS,
            fmt_ns(r["list_s"] * 1e9),
        )
    imp = sec.get("python -c 'import brokerlock'")
    if imp is not None and base:
        target(
            "import brokerlock",
            "-",
            "<= +30 ms",
            imp - base,
            imp - base <= 0.030,
            f"+{(imp - base) * 1e3:.1f} ms",
        )
    for label in ("brokerlock run x -- true", "python -m brokerlock run x -- true") if sec else ():
        run = sec.get(label)
        ratio = run / base if run is not None and base else None
        target(
            label,
            "-",
            "<= 2x python -c pass",
            ratio,
            None if ratio is None else ratio <= 2,
            fmt_ratio(ratio) if ratio else "n/a",
        )
    rows = [[t["figure"], t["backend"], t["target"], t["measured"], t["verdict"]] for t in targets]
    chunks.append(
        table("Targets (issues 5 and 17)", ["figure", "back end", "target", "measured", "verdict"], rows)
    )
    notes = [f"- {s['name']}: {s['note']}" for s in summaries if s["note"] and not s["reason"]]
    notes += [f"- {s['name']}: not run ({s['reason']})" for s in summaries if s["reason"]]
    if notes:
        chunks.append("Notes\n" + "\n".join(notes))
    mode = "--quick" if quick else "full"
    chunks.insert(
        0, f"brokerlock benchmarks ({mode} run; {os.cpu_count()} CPUs; Python {platform.python_version()})"
    )
    return "\n\n".join(chunks), targets


# -- main ----------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 1 minute)")
    parser.add_argument(
        "--backends",
        default=",".join(kinds_module.FAMILIES),
        help="comma-separated back ends to run with their peers "
        f"(default: all of {','.join(kinds_module.FAMILIES)}; 'selftest' runs a deliberately "
        "broken lock, which must make the run fail)",
    )
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="measure each lock in this many interleaved rounds (full run; default 3)",
    )
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.backends.split(",") if f.strip()]
    unknown = set(families) - {*kinds_module.FAMILIES, "selftest"}
    if unknown:
        parser.error(
            f"unknown back end(s) {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(kinds_module.FAMILIES)}"
        )
    plan = QUICK if args.quick else FULL
    started = time.monotonic()

    workdir = tempfile.mkdtemp(prefix="brokerlock-bench-")
    servers = []
    redis_url = pg_dsn = None
    reasons = {}
    try:
        if "redis" in families:
            server, why = start_server("redis")
            if server:
                servers.append(server)
                redis_url = server.url
            reasons["redis"] = why
        if "postgres" in families:
            server, why = start_server("postgres")
            if server:
                servers.append(server)
                pg_dsn = server.url
            reasons["postgres"] = why
        deepkit_port = deepkit_modules = None
        if "deepkit" in families:
            server, why = start_server("deepkit")
            if server:
                servers.append(server)
                deepkit_port = server.url
                import servers as servers_module

                deepkit_modules = servers_module.deepkit_modules()[0]
            else:
                print(f"note: Deepkit's broker skipped: {why}")
            reasons["deepkit"] = why
        env = Env(
            workdir=workdir, redis_url=redis_url, pg_dsn=pg_dsn,
            deepkit_port=deepkit_port, deepkit_modules=deepkit_modules,
        )
        print(f"[{time.monotonic() - started:.0f} s] servers: {', '.join(s.name for s in servers) or 'none'}")
        selected = [k for k in [*KINDS, kinds_module.SELFTEST] if k.family in families]
        results: List[Tuple[Kind, KindResult]] = []
        for kind in selected:
            result = KindResult(kind)
            results.append((kind, result))
            why_not = kinds_module.unavailable(kind, env)
            if why_not:
                if kind.needs and reasons.get(kind.needs):
                    why_not = reasons[kind.needs]
                result.reason = why_not
                print(f"{kind.name}: n/a ({why_not})", flush=True)
        # Every lock measured in a few short rounds, one after the other, rather than
        # each in one go: a burst of load on the machine (a neighbour on the host) then
        # lands on all the locks alike instead of spoiling one of them.
        rounds = 1 if args.quick else args.rounds
        part = _round_plan(plan, rounds)
        for round_no in range(rounds):
            for kind, result in results:
                if result.reason is not None or result.errors:
                    continue
                t0 = time.monotonic()
                this = KindResult(kind)
                try:
                    prepare = kinds_module.PREPARE.get(kind.name)
                    if prepare:
                        prepare(env)
                    contention_stage(kind, env, part, this)
                except Exception as exc:
                    this.errors.append(f"set-up: {type(exc).__name__}: {exc}")
                _merge(result, this)
                status = "; ".join(this.errors + this.violations) or "ok"
                print(
                    f"[{time.monotonic() - started:.0f} s] round {round_no + 1}/{rounds} "
                    f"{kind.name}: {time.monotonic() - t0:.1f} s, {status}",
                    flush=True,
                )
        runnable = [(k, r) for k, r in results if r.reason is None and not r.errors]
        print(
            f"CPU of blocked waiters ({len(runnable)} locks at once, {plan.cpu_hold_seconds:g} s)...",
            flush=True,
        )
        cpu_stage(runnable, env, plan)
        one_off: Dict[str, Any] = {}
        names = 1_000 if args.quick else 100_000
        for family, url in (
            ("file", "file://" + os.path.join(workdir, "one-off-files")),
            ("sqlite", "sqlite:///" + os.path.join(workdir, "one-off.sqlite3")),
            ("redis", redis_url and redis_url + "?prefix=one-off%3A"),
            ("postgres", pg_dsn and pg_dsn + "?table=one_off"),
        ):
            if family in families and url:
                elapsed = time.monotonic() - started
                print(f"[{elapsed:.0f} s] {names:,} one-off names on {family}...", flush=True)
                try:
                    one_off[family] = one_off_names.measure(url, names)
                except Exception as exc:
                    one_off[family] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{time.monotonic() - started:.0f} s] start-up...", flush=True)
        if set(families) & set(kinds_module.FAMILIES):
            start = startup(workdir, 3 if args.quick else 15)
        else:
            start = {"seconds": {}, "notes": {}, "runs": 0}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summaries = [summarise(r, plan) for _k, r in results]
    text, targets = report(summaries, start, plan, args.quick, one_off)
    print()
    print(text)
    failures = []
    for s in summaries:
        for v in s["violations"]:
            failures.append(f"MUTUAL EXCLUSION VIOLATED by {s['name']}: {v}")
        if s["ours"]:
            for e in s["errors"]:
                failures.append(f"{s['name']} failed: {e}")
        else:
            for e in s["errors"]:
                print(f"note: peer {s['name']} failed: {e}")
    elapsed = time.monotonic() - started
    print(f"\ntook {elapsed:.0f} s")
    if args.out:
        payload = {
            "meta": {
                "mode": "quick" if args.quick else "full",
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": f"{platform.system()} {platform.machine()}",
                "date": time.strftime("%Y-%m-%d"),
                "plan": workload.plan_dict(plan),
                "seconds": round(elapsed, 1),
            },
            "kinds": summaries,
            "startup": start,
            "one_off_names": one_off,
            "targets": targets,
            "failures": failures,
        }
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"results written to {args.out}")
    if failures:
        print("\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


def start_server(which: str) -> Tuple[Any, str]:
    import servers

    start = {
        "redis": servers.start_redis, "postgres": servers.start_postgres, "deepkit": servers.start_deepkit,
    }[which]
    return start()


if __name__ == "__main__":
    sys.exit(main())
