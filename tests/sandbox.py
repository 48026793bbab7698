"""The suite writes only in its temporary directories, whoever runs it (root too).

A test that writes elsewhere is a bug even when it passes: run as root, a hostile URL
once planted SQLite stores at the file system root. So the session lists, before and
after, the names at the top of the file system root, of the home directory (and of the
default per-user store, where a test that forgot ``$BROKERLOCK_URL`` would write), and
two levels of the working tree, and fails the run if any name appeared.

Cheap by design: a few hundred names, no recursion into big trees. Not watched: the
temporary directory (it is the sandbox) and its parents.

Accepted in the working tree, by name, because they are caches the tools keep on
purpose and are ignored by git: ``__pycache__`` (bytecode of the package and tests),
``.pytest_cache`` (``--lf``/``--ff``) and ``.hypothesis`` (hypothesis replays a failing
example on the next run from it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Set

import pytest

TOOL_CACHES = {"__pycache__", ".pytest_cache", ".hypothesis"}

_before: Dict[str, Set[str]] = {}


def _names(root: Path, depth: int) -> Set[str]:
    """Paths under ``root`` down to ``depth`` levels, without following symlinks."""
    found: Set[str] = set()
    level = [root]
    for _ in range(depth):
        deeper = []
        for directory in level:
            try:
                entries = list(os.scandir(directory))
            except OSError:  # unreadable or gone: nothing to compare
                continue
            for entry in entries:
                if entry.name in TOOL_CACHES:
                    continue
                found.add(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    deeper.append(Path(entry.path))
        level = deeper
    return found


def _watched(config: pytest.Config) -> Dict[str, Set[str]]:
    from brokerlock.urls import state_dir

    home = Path.home()
    return {
        "the file system root": _names(Path(os.path.abspath(os.sep)), 1),
        "the home directory": _names(home, 1) | _names(Path(state_dir()), 1),
        "the working tree": _names(Path(config.rootpath), 2),
    }


def _sandboxes(config: pytest.Config) -> List[str]:
    places = [tempfile.gettempdir()]
    basetemp = config.getoption("basetemp", None)
    if basetemp:
        places.append(str(basetemp))
    return [os.path.realpath(p) for p in places]


def _in_sandbox(path: str, sandboxes: Iterable[str]) -> bool:
    """Inside a temporary directory, or one of its parents (made to hold it)."""
    real = os.path.realpath(path)
    for sandbox in sandboxes:
        if real == sandbox or real.startswith(sandbox + os.sep) or sandbox.startswith(real + os.sep):
            return True
    return False


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(_watched(session.config))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _before:
        return
    sandboxes = _sandboxes(session.config)
    strays = []
    for place, names in _watched(session.config).items():
        new = sorted(p for p in names - _before.get(place, set()) if not _in_sandbox(p, sandboxes))
        strays += [f"{place}: {p}" for p in new]
    if strays:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "tests wrote outside their temporary directories:\n  " + "\n  ".join(strays[:20])
        if reporter is not None:
            reporter.write("\n")
            reporter.write_sep("=", "sandbox violated", red=True)
            reporter.write_line(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
