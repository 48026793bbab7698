"""Chaos: processes x threads on one lock, SIGKILLed and SIGSTOPped at random, checked
from their journal (see ``chaos_checker`` for what is proved).

CI runs a bounded form (per embedded back end at least 20,000 acquisitions and 20 s,
with kills and pauses; see ``CI_PLAN``). ``pytest tests/chaos --chaos-seconds 600`` runs longer.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from chaos_checker import check
from chaos_harness import Plan, run
from stores import file_url

from brokerlock._platform import HAVE_WITNESS

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and SIGSTOP are POSIX"),
]

#: The bounded CI run per back end: (acquisitions at least, seconds at least, mean
#: seconds between SIGKILLs). The server back ends pay a round trip per call, so they
#: are asked for fewer acquisitions.
CI_PLAN = {
    "sqlite": (20_000, 20.0, 0.15),
    "file": (20_000, 20.0, 0.15),
    "redis": (3_000, 15.0, 0.15),
    "postgres": (2_000, 15.0, 0.15),
}
#: Without the liveness witness (Windows, BROKERLOCK_PORTABLE=1) waiters poll, so a
#: contended lock changes hands some 20 times a second, and a killed waiter or holder
#: stalls the queue until its entry or lease runs out: fewer faults, fewer acquisitions.
PORTABLE_PLAN = (100, 20.0, 2.0)


def _url(backend: str, tmp_path: Path, request: Optional[pytest.FixtureRequest] = None) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/store/locks.sqlite3"
    if backend == "file":
        return file_url(tmp_path / "store")
    assert request is not None
    fresh = uuid.uuid4().hex[:12]
    if backend == "redis":
        server: Any = request.getfixturevalue("redis_server")
        return f"{server.url}?prefix=chaos-{fresh}%3A"
    if backend == "postgres":
        server = request.getfixturevalue("postgres_server")
        return f"{server.dsn}?table=chaos_{fresh}"
    raise AssertionError(backend)


@pytest.mark.parametrize("backend", ["sqlite", "file", "redis", "postgres"])
def test_chaos(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    chaos_seconds: Optional[float],
    record_chaos: Callable[[str, Dict[str, object]], None],
) -> None:
    embedded = backend in ("sqlite", "file")
    acquisitions, ci_seconds, kill_every = (
        CI_PLAN[backend] if HAVE_WITNESS or not embedded else PORTABLE_PLAN
    )
    seconds = ci_seconds if chaos_seconds is None else chaos_seconds
    plan = Plan(
        url=_url(backend, tmp_path, request),
        directory=str(tmp_path / "journal"),
        processes=4,
        threads=2,
        ttl=0.25,
        min_acquisitions=acquisitions,
        min_seconds=seconds,
        max_seconds=max(120.0, seconds),
        kill_every=kill_every,
        pause_every=0.5 if kill_every < 1 else kill_every,
    )
    outcome = run(plan)
    figures = outcome.figures()
    record_chaos(backend, figures)
    report = outcome.report
    assert not report.violations, (
        f"{len(report.violations)} violations (seed {outcome.seed}):\n"
        + "\n".join(report.violations[:20])
        + "\n" + "\n".join(outcome.stderr[:5])
    )
    assert report.acquisitions >= acquisitions, figures
    assert outcome.kills >= (20 if kill_every < 1 else 5) and outcome.pauses >= 5, figures
    if embedded and HAVE_WITNESS:
        # The kills reached the critical section, or this run proved little.
        assert report.killed_inside > 0, figures
    assert not outcome.stderr, "\n".join(outcome.stderr[:5])


@pytest.mark.parametrize(
    "mutant, url, expect",
    [
        # One private store per process: every process "holds" the lock at once.
        ("", "memory://", "issued twice"),
        # Holders all look dead: live leases are taken over before they expire. (On
        # SQLite the blind store mostly stalls instead: its waiters, all "dead", prune
        # one another out of the queue; the file store shows the overlaps quickly.)
        ("blind-witness", "file", "lease of"),
    ],
)
def test_checker_catches_broken_stores(mutant: str, url: str, expect: str, tmp_path: Path) -> None:
    """The harness end to end on deliberately broken stores: it must see the damage."""
    plan = Plan(
        url=url if "://" in url else _url(url, tmp_path),
        directory=str(tmp_path / "journal"),
        processes=3,
        threads=2,
        min_acquisitions=500,
        max_seconds=2.0,
        kill_every=1e9,
        pause_every=1e9,
        mutant=mutant,
    )
    report = run(plan).report
    assert report.violations, report.summary()
    assert any(expect in v for v in report.violations), report.violations[:5]


# -- the checker on hand-made journals ------------------------------------------------

S = 1_000_000_000  # ns per second


def _e(fence: int, enter: float, acquired: float, expires: Optional[float], pid: int = 1) -> str:
    return f"E {fence} {pid} 0 {int(enter * S)} {acquired!r} {expires!r}"


def _x(fence: int, leave: float) -> str:
    return f"X {fence} {int(leave * S)}"


def _ok(journals: Dict[str, List[str]], kills: Optional[Dict[str, int]] = None) -> List[str]:
    return check(journals, kills or {}).violations


def test_checker_accepts_handovers() -> None:
    journal = {
        "a.log": [
            _e(1, 1.0, 101.0, 102.0), _x(1, 1.5), "R 1 ok",
            _e(3, 3.0, 103.0, 104.0), _x(3, 3.2), "R 3 ok",
        ],
        "b.log": [_e(2, 2.0, 102.0, 103.0), _x(2, 2.5), "R 2 ok"],
    }
    assert _ok(journal) == []


def test_checker_flags_two_holders() -> None:
    journal = {
        "a.log": [_e(1, 1.0, 101.0, 111.0), _x(1, 2.5), "R 1 lost"],
        "b.log": [_e(2, 2.0, 102.0, 112.0), _x(2, 3.0), "R 2 ok"],
    }
    (violation,) = _ok(journal)
    assert "fence 1" in violation and "overlaps fence 2" in violation


def test_checker_excuses_an_expired_lease_but_not_a_clean_release_after_it() -> None:
    paused = {
        "a.log": [_e(1, 1.0, 101.0, 101.5), _x(1, 2.5), "R 1 lost"],  # paused past its ttl
        "b.log": [_e(2, 2.0, 102.0, 112.0), _x(2, 3.0), "R 2 ok"],
    }
    report = check(paused, {})
    assert report.violations == [] and report.excused_overlaps == 1
    paused["a.log"][-1] = "R 1 ok"  # the store told the late holder its lease was intact
    assert "reported an intact lease" in _ok(paused)[0]


def test_checker_counts_a_killed_holder_inside_until_its_kill() -> None:
    journal = {
        "a.log": [_e(1, 1.0, 101.0, 111.0)],  # killed inside, lease still running
        "b.log": [_e(2, 2.0, 102.0, 112.0), _x(2, 3.0), "R 2 ok"],
    }
    assert _ok(journal, {"a.log": int(1.9 * S)}) == []  # b entered after the kill
    assert "overlaps" in _ok(journal, {"a.log": int(2.1 * S)})[0]  # b entered before it
    assert "never left" in _ok(journal)[0]  # neither left nor killed


def test_checker_flags_duplicate_fences_and_worker_errors() -> None:
    journal = {
        "a.log": [_e(1, 1.0, 101.0, 102.0), _x(1, 1.1), "R 1 ok", "F 0 BrokerLockError:'x'"],
        "b.log": [_e(1, 2.0, 102.0, 103.0), _x(1, 2.1), "R 1 ok", "T 1 'timed out'"],
    }
    violations = _ok(journal)
    assert any("issued twice" in v for v in violations)
    assert any("error" in v for v in violations) and any("timeout" in v for v in violations)


def test_checker_flags_a_late_lower_fence() -> None:
    """Entry order against fence order: allowed only to a holder whose lease had ended."""
    journal = {
        "a.log": [_e(2, 1.0, 101.0, 111.0), _x(2, 1.5), "R 2 ok"],
        "b.log": [_e(1, 1.2, 100.5, 110.5), _x(1, 1.3), "R 1 ok"],  # lower fence, entered later
    }
    assert "overlaps" in _ok(journal)[0]
    # Held only after the higher fence had left: no overlap, but a fence went back.
    journal["b.log"] = [_e(1, 1.6, 100.5, 110.5), _x(1, 1.7), "R 1 ok"]
    assert "a fence went back" in _ok(journal)[0]


def test_journal_lines_cut_by_a_kill_are_ignored(tmp_path: Path) -> None:
    from chaos_checker import read_journals

    (tmp_path / "w.log").write_bytes((_e(1, 1.0, 101.0, 102.0) + "\n" + "X 1 12").encode())
    journals = read_journals(str(tmp_path))
    assert journals == {"w.log": [_e(1, 1.0, 101.0, 102.0)]}
    assert os.path.exists(tmp_path / "w.log")
