"""Options and reporting of the chaos tests.

``pytest tests/chaos --chaos-seconds 600`` (or ``BROKERLOCK_CHAOS_SECONDS=600`` from
anywhere) runs each back end for at least that long instead of CI's bounded run.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_FIGURES: Dict[str, Dict[str, object]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-seconds",
        type=float,
        default=None,
        help="run each chaos back end for at least this many seconds (default: CI's bounded run)",
    )


def _seconds(config: pytest.Config) -> Optional[float]:
    try:
        value = config.getoption("--chaos-seconds")
    except ValueError:  # registered only when pytest is pointed at this directory
        value = None
    if value is None and os.environ.get("BROKERLOCK_CHAOS_SECONDS"):
        value = float(os.environ["BROKERLOCK_CHAOS_SECONDS"])
    return value  # type: ignore[no-any-return]


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:  # type: ignore[type-arg]
    seconds = _seconds(config)
    if seconds is None:
        return
    for item in items:  # a long run must not trip pytest-timeout's 300 s
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(pytest.mark.timeout(2 * seconds + 300))


@pytest.fixture
def chaos_seconds(request: pytest.FixtureRequest) -> Optional[float]:
    return _seconds(request.config)


@pytest.fixture
def record_chaos(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Store one back end's figures in ``<pytest basetemp>/chaos-figures.json``."""
    path = tmp_path_factory.getbasetemp() / "chaos-figures.json"

    def record(backend: str, figures: Dict[str, object]) -> None:
        _FIGURES[backend] = figures
        path.write_text(json.dumps(_FIGURES, indent=2, sort_keys=True) + "\n")
        print(f"\nchaos {backend}: {json.dumps(figures, sort_keys=True)}\nfigures in {path}")

    return record


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _FIGURES:
        return
    terminalreporter.section("chaos figures")
    keys = ["acquisitions", "kills", "pauses", "lost_leases", "killed_inside_critical_section",
            "holders_overlapped_after_expiry", "violations", "seconds"]
    terminalreporter.write_line("back end  " + "  ".join(keys))
    for backend, figures in sorted(_FIGURES.items()):
        terminalreporter.write_line(
            f"{backend:8}  " + "  ".join(f"{figures.get(k, '')!s:>{len(k)}}" for k in keys)
        )
